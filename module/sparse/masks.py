"""Weight sparsity for one linear layer: scores, masks, and SparseGPT's reconstruction.

A pattern is unstructured (a fraction `sparsity` of every comparison group zeroed) or N:M (N of every M
consecutive input weights of a row zeroed: 2:4 and 4:8 are 50%). Comparison groups follow each method's
paper: magnitude compares the whole layer, Wanda each output row, SparseGPT each block of columns.
Masks are True where a weight is REMOVED.

- magnitude: |W|
- wanda: |W_ij| * ||X_j|| (the input column's norm over the calibration tokens)
- d2prune (D²Prune, its dual Taylor expansion): SparseGPT whose saliency adds r1 * y_i |w_ij| dx_j -
  r2 * w_ij^2 dx_j^2 (y: a row's mean output norm per window, dx: an input column's mean norm per window,
  both / s); the value projection is pruned without an update by w^2 mean||x_j||^2 + r1 y_i |w_ij| - r2 w^2 dx^2
  (per row), the attention-aware choice of its released scripts for Llama (defaults r1 1, r2 0, s 1500 too)
- entropy: |W ⊙ ∂H/∂W| (module/sparse/weight_taylor.py), compared within each output row as Wanda
- sparsegpt: column by column in blocks, the OBS saliency w^2 / [H^-1]_jj chooses the mask inside each block
  (for N:M, inside each group of M), and every removed weight's error is spread over the columns not yet
  processed through the upper Cholesky factor of H^-1, H = 2 X X^T / n with 1% of its mean diagonal added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.errors import UserError

METHODS = ("magnitude", "wanda", "sparsegpt", "d2prune", "entropy")
UPDATES = ("none", "sparsegpt")


class SparsityError(UserError):
    """A sparsity pattern a layer cannot take."""


@dataclass(frozen=True)
class Pattern:
    """Unstructured `sparsity`, or `n` zeros in every `m` consecutive input weights (n:m)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, kind: str, sparsity: float) -> Pattern:
        if kind == "unstructured":
            return cls(sparsity)
        try:
            n, m = (int(v) for v in kind.split(":"))
        except ValueError:
            raise ValueError(f"--sparsity_type {kind!r} is not unstructured or N:M such as 2:4") from None
        if not 0 < n < m:
            raise ValueError(f"--sparsity_type {kind}: need 0 < N < M")
        return cls(n / m, n, m)

    @property
    def structured(self) -> bool:
        return self.m > 0

    def check(self, in_features: int, name: str) -> None:
        if self.structured and in_features % self.m:
            raise SparsityError(f"{name} has {in_features} inputs, not a multiple of {self.m} for {self.n}:{self.m}")


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` lowest scores along the last dimension of each row (stable: ties go to the lower index)."""
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :count]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Remove the n lowest scores in every group of m consecutive inputs of each row."""
    rows, cols = scores.shape
    return lowest(scores.reshape(rows, cols // m, m), n).reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, pattern: Pattern, group: str) -> torch.Tensor:
    """`group` "layer" (one comparison over all weights) or "row" (each output row on its own)."""
    if pattern.structured:
        return nm_mask(scores, pattern.n, pattern.m)
    if group == "row":
        return lowest(scores, int(scores.shape[1] * pattern.sparsity))
    flat = lowest(scores.reshape(1, -1), int(scores.numel() * pattern.sparsity))
    return flat.reshape(scores.shape)


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: `input_sq_sum` is the sum over calibration tokens of x_j^2."""
    return weight.abs().float() * input_sq_sum.float().sqrt().unsqueeze(0)


@dataclass(frozen=True)
class DualTaylor:
    """D²Prune's activation terms of the saliency (see the module docstring)."""

    y: torch.Tensor  # [rows]
    dx: torch.Tensor  # [cols]
    r1: float = 1.0
    r2: float = 0.0

    def terms(self, w: torch.Tensor, columns: slice) -> torch.Tensor:
        dx = self.dx[columns].unsqueeze(0)
        return self.r1 * self.y.unsqueeze(1) * w.abs() * dx - self.r2 * w**2 * dx**2


def d2_value_scores(weight: torch.Tensor, input_sq_mean: torch.Tensor, dual: DualTaylor) -> torch.Tensor:
    """D²Prune's score of the layer it prunes without an update: w^2 mean||x_j||^2 + r1 y_i |w| - r2 w^2 dx^2."""
    w = weight.float()
    return w**2 * input_sq_mean.unsqueeze(0) + dual.r1 * dual.y.unsqueeze(1) * w.abs() - dual.r2 * w**2 * dual.dx**2


def damped_hessian(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """H with dead inputs (zero diagonal) made harmless and `damp` x the mean diagonal added. Zeroes the
    weight columns of dead inputs in place (they never see a non-zero input)."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return h


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, block: int = 128, damp: float = 0.01,
              fixed_mask: torch.Tensor | None = None,
              dual: DualTaylor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The pruned and updated weight (fp32) and its mask. `fixed_mask`: another method's mask, only updated."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = damped_hessian(hessian.float(), w, damp)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        hinv1 = h_inv[b0:b1, b0:b1]
        d = torch.diag(hinv1)
        if fixed_mask is not None:
            mask1 = fixed_mask[:, b0:b1].clone()
        elif not pattern.structured:  # one comparison over the block, as the paper
            saliency = w1**2 / d**2 + (dual.terms(w1, slice(b0, b1)) if dual else 0)
            mask1 = mask_from_scores(saliency, pattern, "layer")
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(b1 - b0):
            if fixed_mask is None and pattern.structured and i % pattern.m == 0:
                group = w1[:, i : i + pattern.m]
                saliency = group**2 / d[i : i + pattern.m] ** 2
                if dual is not None:
                    saliency = saliency + dual.terms(group, slice(b0 + i, b0 + i + pattern.m))
                mask1[:, i : i + pattern.m] = nm_mask(saliency, pattern.n, pattern.m)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, b0:b1] = w1
        mask[:, b0:b1] = mask1
        w[:, b1:] -= err @ h_inv[b0:b1, b1:]
    return w, mask
