"""HFPrune's library, one package per idea. The entry scripts (prune.py, fintune_*.py) and bench/ call into it;
it never imports them. docs/ARCHITECTURE.md has the map and the path of a pruning and a fine-tuning run.

- model/: where things live in a model family (data: MLP shapes, attention/residual layouts) and cutting them out;
- entropy.py: the model's own output distribution as a loss (entropy, CE, KL), chunked, with analytic gradients;
- prune/: structured pruning (neurons, heads, layers, hidden width): statistics, criteria, plans, the mix search;
- sparse/: weight sparsity (unstructured, N:M) layer by layer: Wanda, SparseGPT, D²Prune, per-weight entropy;
- train/: recovery fine-tuning: the SFT data path, the trainer, optimizers, distillation;
- run.py, pipeline.py: what every pruning run shares, and `prune_model(cfg)`, the one call prune.py makes;
- speed.py: prefill and decoding speed of a model against its dense original.
"""
