"""The model's own output distribution as a loss: entropy (the paper's), next-token CE, and KL to another model.

Every user of the paper's criterion goes through here: the importance pass (neurons, heads, layers, hidden
channels), the per-weight entropy scores of weight sparsity, the mix search's KL, the distillation loss.
For a window of T tokens with logits z_t and p_t = softmax(z_t) in fp32:
- entropy: L = (1/T) sum_t H(p_t), H(p) = -sum_v p_v log p_v, and dH/dz_v = -p_v (log p_v + H);
- ce: (1/(T-1)) sum_t CE(z_t, x_{t+1}), dCE/dz = p - onehot(y).
A batch's loss is the sum over its windows of each window's token mean (scores equal a batch-1 loop). The loss
and its analytic gradient run over the vocabulary in token chunks, so the fp32 [tokens x vocab] logits are never
alive at once (what lets a 128k-vocabulary model run at batch > 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def entropy_and_grad(logits: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token entropy H(softmax(z)) and `weight * dH/dz` = -weight * p * (log p + H).

    `logits` is fp32 [N, V]; the gradient reuses the log-probabilities' storage.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    h = -(p * logp).sum(-1)
    grad = logp.add_(h.unsqueeze(-1)).mul_(p).mul_(-weight)
    return h, grad


def cross_entropy_and_grad(
    logits: torch.Tensor, targets: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE(z, y) and `weight * dCE/dz` = weight * (p - onehot(y)); target -100 = no loss."""
    valid = targets >= 0
    safe = targets.clamp_min(0)
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    grad = logp.exp_()
    grad.scatter_add_(-1, safe.unsqueeze(-1), -torch.ones_like(safe, dtype=grad.dtype).unsqueeze(-1))
    grad.mul_((valid * weight).unsqueeze(-1).to(grad.dtype))
    return ce, grad


@dataclass
class LogitHead:
    """The map from final hidden states to logits: z = cap * tanh(scale * (h W^T + b) / cap)."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> LogitHead:
        head = model.get_output_embeddings()
        cfg = model.config
        scale = 1.0
        if getattr(cfg, "logits_scaling", None):  # Granite divides the logits
            scale /= float(cfg.logits_scaling)
        if getattr(cfg, "logit_scale", None):  # Cohere multiplies them
            scale *= float(cfg.logit_scale)
        cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        return cls(head.weight.detach(), getattr(head, "bias", None), scale, float(cap) if cap else None)

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 logits of hidden [N, H] (fp64 for an fp64 model), and dz/du of the soft cap (None without one)."""
        u = F.linear(hidden, self.weight, self.bias)
        u = u if u.dtype == torch.float64 else u.float()
        if self.scale != 1.0:
            u.mul_(self.scale)
        if self.softcap is None:
            return u, None
        t = torch.tanh(u / self.softcap)
        return t * self.softcap, (1 - t * t).mul_(self.scale)

    def grad_hidden(self, grad_logits: torch.Tensor, dz_du: torch.Tensor | None) -> torch.Tensor:
        g = grad_logits if dz_du is None else grad_logits.mul_(dz_du)
        if dz_du is None and self.scale != 1.0:
            g = g.mul_(self.scale)
        return g.to(self.weight.dtype) @ self.weight


def default_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per loss chunk: one fp32 [chunk x vocab] tensor of about 256 MiB on CUDA, 32 MiB on CPU.

    On CPU, glibc serves blocks above 32 MiB with fresh mmaps, so every larger chunk would be
    page-faulted in again on each use (measured: ~10% slower on SmolLM2 with 1365-token chunks).
    """
    budget = 1 << 28 if device.type == "cuda" else 1 << 25
    return max(1, budget // (4 * vocab_size))


def head_loss_and_grad(
    head: LogitHead,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    criterion: str,
    chunk_tokens: int,
) -> tuple[float, torch.Tensor]:
    """Summed window-mean loss over a batch and its gradient w.r.t. `hidden` [B, T, H].

    entropy: each window contributes (1/T) sum_t H(p_t) over all T positions;
    ce: (1/(T-1)) sum_t CE(z_t, x_{t+1}) over the T-1 positions that have a next token.
    """
    b, t, d = hidden.shape
    flat = hidden.reshape(b * t, d)
    if criterion == "ce":
        targets = torch.full_like(input_ids, -100)
        targets[:, :-1] = input_ids[:, 1:]
        targets = targets.reshape(-1)
        weight = 1.0 / (t - 1)
    else:
        weight = 1.0 / t
    grad = torch.empty_like(flat)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)  # one host sync per batch, not per chunk
    for s in range(0, b * t, chunk_tokens):
        e = min(s + chunk_tokens, b * t)
        z, dz_du = head.logits(flat[s:e].to(head.weight.device))
        if criterion == "ce":
            per_token, gz = cross_entropy_and_grad(z, targets[s:e], weight)
        else:
            per_token, gz = entropy_and_grad(z, weight)
        del z
        total += per_token.sum().to(total.device, torch.float64) * weight
        grad[s:e] = head.grad_hidden(gz, dz_du).to(grad.device)
    return float(total), grad.view(b, t, d)


def loss_backward(model: nn.Module, head: LogitHead, ids: torch.Tensor, criterion: str, chunk_tokens: int) -> float:
    """Forward the decoder on `ids` [B, T], take `criterion`'s loss over the vocabulary in chunks with its analytic
    gradient at the final hidden states, and backpropagate it from there; returns the summed window-mean loss."""
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    loss, grad = head_loss_and_grad(head, hidden.detach(), ids, criterion, chunk_tokens)
    hidden.backward(grad)
    return loss


def log_prob_chunks(head: LogitHead, hidden: torch.Tensor, chunk_tokens: int) -> list[torch.Tensor]:
    """fp32 next-token log-probabilities of final hidden states [N, H], one tensor per chunk of tokens."""
    return [
        torch.log_softmax(head.logits(hidden[s : s + chunk_tokens].to(head.weight.device))[0], dim=-1)
        for s in range(0, len(hidden), chunk_tokens)
    ]


def kl_sum(head: LogitHead, dense_hidden: torch.Tensor, pruned_hidden: torch.Tensor, chunk_tokens: int,
           dense_log_probs: list[torch.Tensor] | None = None) -> float:  # fmt: skip
    """Sum over tokens of KL(p_dense || p_pruned), from final hidden states [N, H], in token chunks of fp32
    (`dense_log_probs`: the dense side's `log_prob_chunks`, when they were kept)."""
    total = torch.zeros((), dtype=torch.float64, device=head.weight.device)
    for i, s in enumerate(range(0, len(dense_hidden), chunk_tokens)):
        if dense_log_probs is not None:
            lp = dense_log_probs[i]
        else:
            lp = log_prob_chunks(head, dense_hidden[s : s + chunk_tokens], chunk_tokens)[0]
        lq = log_prob_chunks(head, pruned_hidden[s : s + chunk_tokens], chunk_tokens)[0]
        total += (lp.exp() * (lp - lq)).sum(dtype=torch.float64)
    return float(total)
