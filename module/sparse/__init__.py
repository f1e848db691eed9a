"""Weight sparsity (`prune.py --sparsity`): single weights zeroed, unstructured or N:M, layer by layer as Wanda and
SparseGPT calibrate (layerwise.py), with magnitude/Wanda/SparseGPT/D²Prune masks and updates (masks.py) or the
paper's entropy per weight (weight_taylor.py); pipeline.py is the run.
"""
