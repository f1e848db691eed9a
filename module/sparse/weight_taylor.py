"""The entropy criterion per weight: |W ⊙ ∂H/∂W|, H the entropy of the model's own next-token distribution.

One forward/backward per batch of calibration windows, the loss over the vocabulary in token chunks with
its analytic gradient (module/entropy.py, as the importance pass). Only the decoder layers' linear weights
need gradients; each one is added into an fp32 accumulator as soon as it is complete and then freed, so no
more than one weight's gradient in the model dtype is alive at a time beside the accumulators.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from module.entropy import LogitHead, default_chunk_tokens, loss_backward
from module.model.mlp import decoder_layers
from module.sparse.layerwise import linears_of


def entropy_weight_scores(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, chunk_tokens: int | None = None,
                          progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """|W ⊙ Σ_windows ∂H_window/∂W| for every decoder linear, by name `layers.<i>.<name>` (fp32, each window's
    entropy the mean over its tokens, as the neuron scores)."""
    named = {f"layers.{i}.{n}": lin for i, layer in enumerate(decoder_layers(model))
             for n, lin in linears_of(layer).items()}  # fmt: skip
    requires = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    acc = {k: torch.zeros_like(lin.weight, dtype=torch.float32) for k, lin in named.items()}
    handles = []
    for key, lin in named.items():
        lin.weight.requires_grad_(True)

        def add(param, key=key):
            acc[key] += param.grad.float()
            param.grad = None

        handles.append(lin.weight.register_post_accumulate_grad_hook(add))
    was_training = model.training
    model.eval()
    head = LogitHead.from_model(model)
    chunk = chunk_tokens or default_chunk_tokens(head.weight.shape[0], head.weight.device)
    device = model.get_input_embeddings().weight.device
    bar = tqdm(total=len(windows), desc="entropy weight scores", unit="window", disable=not progress)
    try:
        for s in range(0, len(windows), batch_size):
            ids = windows[s : s + batch_size].to(device)
            loss_backward(model, head, ids, "entropy", chunk)
            bar.update(len(ids))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    return {k: (named[k].weight.detach().float() * g).abs_() for k, g in acc.items()}
