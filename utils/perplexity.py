"""Perplexity with the usual pruning-paper protocol (SparseGPT / Wanda / LLM-Pruner).

Documents are joined with "\\n\\n", tokenized once, and cut into non-overlapping windows of
`seq_len` tokens (the incomplete tail is dropped); perplexity = exp(mean next-token NLL) over every
predicted token of every window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.errors import UserError


def text_windows(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """exp(mean NLL) of the model over windows [N, T]; also returns the NLL and token count."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for s in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        ids = windows[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}
