"""Where things live in a model (data, one entry per family or MLP shape) and cutting them out (shared code).

- mlp.py: the MLP shapes (`find_mlps`), the decoder layers, the parameter count;
- layout.py: where heads, layers and the hidden width live per family, and the sizes a config accepts;
- slicing.py: cutting neurons, heads, layers and hidden channels out in place, the config updated.
"""
