"""Probe Pruning's math (Le et al., ICLR 2025; the released code Qi-Le1/Probe_Pruning @ acc0730), as pure functions.

Per decoder layer and batch, for the attention output projection (o_proj, per query head) and the MLP's down_proj
(per neuron):
1. `probe_rows`: rank token positions by the L2 norm over the batch of the un-normalised residual's per-token L2
   norms, keep ceil(0.5 T) (at least 2; with 10 or fewer the first is replaced by position 0), then rank the
   windows by the L2 norm over those positions and keep ceil(0.05 B). The probe is those rows of the normed
   states.
2. The probe runs through the sub-layers feeding the pruned projection with the full weights; `probe_energy` is
   P[t, j] = mean over the probe's windows of x[b, t, j]^2 of that projection's input (pads excluded).
3. `fuse`: with the history H[t, j] (calibration means of x^2 per position, kept up to date by an EMA), per
   position F = (1 - r) H + r P, r = P / (P + H + 1e-6) (= (P^2 + H^2 + 1e-6 H) / (P + H + 1e-6)), summed over the
   probe's positions.
4. `channel_scores` (PPsp): neuron j scores |F_j W[:, j]^2|_2 = F_j sqrt(sum_i W_ij^4); a head, the L2 norm of
   those terms over its channels and the output rows. The lowest are dropped (`kept_neurons`, `kept_heads`).
The same scores with wanda_sp's or FLAP's metric, and the counts (`layer_ratio`, `kept_count`), are here too.
"""

from __future__ import annotations

import math

import torch

SEQ_RATIO = 0.5  # the release's probe ratios: positions first, then windows
BATCH_RATIO = 0.05
EMA_MOMENTUM = 0.99
SKIP_LAYERS = 3  # layers 0, 1, 2 are never pruned
MULTIPLE = 64  # kept MLP neurons: a multiple of 64 (tensor cores)
METRICS = ("ppsp", "wanda_sp", "flap")


def top_sorted(norms: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, ascending."""
    return torch.topk(norms, k).indices.sort().values


def probe_rows(residual_norms: torch.Tensor, seq_ratio: float = SEQ_RATIO,
               batch_ratio: float = BATCH_RATIO) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The probe's windows and positions from the per-token L2 norms [B, T] of the un-normalised residual (pads
    set to 0 by the caller, so they rank last): positions first (their norm over the windows), then windows (their
    norm over the chosen positions)."""
    n_windows, n_positions = residual_norms.shape
    k_positions = min(max(math.ceil(n_positions * seq_ratio), 2), n_positions)
    positions = top_sorted(torch.linalg.vector_norm(residual_norms, dim=0), k_positions)
    if k_positions <= 10:  # the release keeps the first token in this extreme case
        positions[0] = 0
    k_windows = min(math.ceil(n_windows * batch_ratio), n_windows)
    windows = top_sorted(torch.linalg.vector_norm(residual_norms[:, positions], dim=1), k_windows)
    return windows, positions


def probe_energy(probe_out: torch.Tensor, probe_pads: torch.Tensor | None = None) -> torch.Tensor:
    """P[t, j]: the mean over the probe's windows of x^2 at each probe position [b, t, j] -> [t, j]; pads count
    neither in the sum nor in the number of windows (the release adds 1e-3 to that number)."""
    x = probe_out.float()
    if probe_pads is None:
        return (x**2).sum(0) / x.shape[0]
    x = x.masked_fill(probe_pads.unsqueeze(-1), 0.0)
    count = (x.shape[0] - probe_pads.sum(0)).to(x.dtype) + 1e-3
    return (x**2).sum(0) / count.unsqueeze(-1)


def probe_fluctuation(probe_out: torch.Tensor, probe_pads: torch.Tensor | None = None) -> torch.Tensor:
    """FLAP's energy of the probe: per position the mean over windows of (x - mu)^2, mu the mean over every probe
    token [b, t, j] -> [t, j] (pads excluded from both)."""
    x = probe_out.float()
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if probe_pads is None else ~probe_pads
    mu = (x * keep.unsqueeze(-1)).sum((0, 1)) / keep.sum().clamp(min=1)
    dev = ((x - mu) ** 2).masked_fill(~keep.unsqueeze(-1), 0.0)
    return dev.sum(0) / (keep.sum(0).to(x.dtype) + (0 if probe_pads is None else 1e-3)).unsqueeze(-1)


def fuse(probe: torch.Tensor | None, history: torch.Tensor | None) -> torch.Tensor:
    """F_j: the probe's and the history's energy combined per position and summed over positions [t, j] -> [j].
    Either may be None: the probe alone (no history) or the history alone (static PPsp from calibration)."""
    if history is None:
        return probe.sum(0)
    if probe is None:
        return history.sum(0)
    r = probe / (probe + history + 1e-6)
    return ((1 - r) * history + r * probe).sum(0)


def channel_scores(fused: torch.Tensor, weight: torch.Tensor, metric: str = "ppsp") -> torch.Tensor:
    """One score per input channel j of the pruned projection `weight` [out, in] from its fused energy F [in]:
    ppsp |F_j W[:, j]^2|_2, wanda_sp sum_i sqrt(F_j) |W_ij|, flap F_j sum_i W_ij^2 (F then FLAP's fluctuation)."""
    w = weight.float()
    if metric == "ppsp":
        return fused * torch.linalg.vector_norm(w**2, dim=0)
    if metric == "wanda_sp":
        return fused.sqrt() * w.abs().sum(0)
    if metric == "flap":
        return fused * (w**2).sum(0)
    raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")


def head_scores(fused: torch.Tensor, weight: torch.Tensor, n_heads: int, metric: str = "ppsp") -> torch.Tensor:
    """One score per query head from o_proj's `weight` [out, heads x head_dim]: ppsp the L2 norm of F_j W_ij^2 over
    the head's channels and all rows; wanda_sp and flap the sum of their channel scores."""
    if metric == "ppsp":
        terms = fused.unsqueeze(0) * weight.float() ** 2
        return torch.linalg.vector_norm(terms.reshape(weight.shape[0], n_heads, -1), dim=(0, 2))
    return channel_scores(fused, weight, metric).reshape(n_heads, -1).sum(1)


def layer_ratio(n_layers: int, ratio: float, skipped: int = SKIP_LAYERS) -> float:
    """The ratio of each pruned layer, so the skipped layers' share is made up: round(L / (L - skipped) r, 2)."""
    return 0.0 if ratio == 0 else round(n_layers / (n_layers - skipped) * ratio, 2)


def kept_count(total: int, ratio: float, multiple: int = 1) -> int:
    """Units kept of `total` at a layer ratio: int(ratio total) pruned, fewer so the kept count is a multiple of
    `multiple` (rounded up, as the release's nearest_multiple; never more than `total`)."""
    pruned = int(ratio * total)
    remain = (total - pruned) % multiple
    return min(total, total - (pruned - (multiple - remain) if remain else pruned))


def kept_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` best-scored units, ascending (the release's sort drops the lowest int(ratio n))."""
    return top_sorted(scores, keep)


def ema_update(history: torch.Tensor, kept: torch.Tensor, x: torch.Tensor, pads: torch.Tensor | None = None,
               momentum: float = EMA_MOMENTUM) -> None:  # fmt: skip
    """The release's update after a pruned batch, in place: on the kept channels `kept` and positions 0..T-1,
    H <- m H + (1 - m) mean over the windows of x^2 (x: the pruned projection's input [B, T, len(kept)]; with pads,
    the mean is over each position's non-pad windows)."""
    n_positions = min(x.shape[1], history.shape[0])  # positions past the calibration length have no history row
    x = x[:, :n_positions].float()
    pads = None if pads is None else pads[:, :n_positions]
    if pads is not None:
        x = x.masked_fill(pads.unsqueeze(-1), 0.0)
        count = (x.shape[0] - pads.sum(0)).clamp(min=1).to(x.dtype).unsqueeze(-1)
    else:
        count = x.shape[0]
    rows = history[:n_positions]
    rows[:, kept] = momentum * rows[:, kept] + (1 - momentum) * (x**2).sum(0) / count
    history[:n_positions] = rows
