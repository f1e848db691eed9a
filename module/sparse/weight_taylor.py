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

FORMS = ("abs", "fisher", "sum")  # the first is the default (docs/SPARSITY_ENTROPY.md)


def entropy_weight_scores(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, chunk_tokens: int | None = None,
                          progress: bool = True, form: str = "abs") -> dict[str, torch.Tensor]:  # fmt: skip
    """The entropy-Taylor score of every decoder linear's weights, by name `layers.<i>.<name>` (fp32; each
    window's entropy the mean over its tokens, as the neuron scores), g_w = dH_window/dW:

    - sum: |W (.) sum_w g_w| (the gradients summed before the absolute value; cancellations included);
    - abs: sum_w |W (.) g_w| (the paper's per-unit absolute value, taken per window);
    - fisher: sum_w (W (.) g_w)^2 (the empirical-Fisher form of the second-order term).
    The per-window forms backpropagate one window at a time (`batch_size` only batches `sum`)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    named = {f"layers.{i}.{n}": lin for i, layer in enumerate(decoder_layers(model))
             for n, lin in linears_of(layer).items()}  # fmt: skip
    requires = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    acc = {k: torch.zeros_like(lin.weight, dtype=torch.float32) for k, lin in named.items()}
    handles = []
    for key, lin in named.items():
        lin.weight.requires_grad_(True)

        def add(param, key=key):
            g = param.grad.float()
            if form == "abs":
                g = (param.detach().float() * g).abs_()
            elif form == "fisher":
                g = (param.detach().float() * g).square_()
            acc[key] += g
            param.grad = None

        handles.append(lin.weight.register_post_accumulate_grad_hook(add))
    was_training = model.training
    model.eval()
    head = LogitHead.from_model(model)
    chunk = chunk_tokens or default_chunk_tokens(head.weight.shape[0], head.weight.device)
    device = model.get_input_embeddings().weight.device
    step = batch_size if form == "sum" else 1
    bar = tqdm(total=len(windows), desc=f"entropy weight scores ({form})", unit="window", disable=not progress)
    try:
        for s in range(0, len(windows), step):
            ids = windows[s : s + step].to(device)
            loss_backward(model, head, ids, "entropy", chunk)
            bar.update(len(ids))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    if form != "sum":
        return acc
    return {k: (named[k].weight.detach().float() * g).abs_() for k, g in acc.items()}
