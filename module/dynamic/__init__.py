"""Dynamic (per-batch) pruning: Probe Pruning (Le et al., ICLR 2025), faithful to its released code.

- probe.py: the math (the probe's rows, the fusion with the history, PPsp / wanda_sp / FLAP scores, the counts,
  the EMA);
- history.py: the calibration history per position, saved with a dynamic folder;
- wrap.py: the attention/MLP wrappers that choose kept units per batch and run on gathered weights;
- folder.py: the folder `prune.py --dynamic probe` writes and every evaluation path loads;
- pipeline.py: that run (calibrate, attach, evaluate, write).
"""
