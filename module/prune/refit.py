"""The math of compensation after removal: one least-squares refit for every consumer, one for removed layers.

A consumer is a linear map that the pruned model keeps with fewer inputs and/or outputs (o_proj for heads,
down_proj for MLP neurons, every reader and writer of the residual stream for hidden channels). Over the
calibration tokens t it sees x'_t (its input in the pruned model) and should give y_t (what the unpruned model
gives there; module/prune/reconstruct.py says which). With G = sum x' x'^T, C = sum y x'^T and W_s the plain
sliced weight W[rows][:, cols], the refit minimises

    sum_t |y_t - W' x'_t|^2 + lam |W' - W_s|^2      ->      W' = (C + lam W_s) (G + lam I)^-1,

ridge towards the plain slice (a consumer that lost nothing and sees what it saw keeps its weights exactly),
lam = damp x the mean diagonal of G. For y = W x and an unchanged stream (x' = x[K]) this is the OBS/GRAIL
update W G[:, K] (G[K, K] + lam I)^-1 but for the ridge's target. A removed run of layers after kept layer i is
replaced by one linear map T on layer i's MLP output M (ReplaceMe): M T ~ y - a, with a = the residual stream
without M and y the stream after the run; T is folded into layer i's down_proj (W_down <- T^T W_down), so no
parameter is added. FLAP's bias compensation is the mean residual of the same fit, added to the bias.

`--reconstruct_select obs` lets the fit also choose which MLP neurons a layer keeps (the count unchanged): with
H = G + lam I over every neuron of the dense MLP on the pruned stream and W = C H^-1 the fit on all of them,
dropping input j costs |W[:, j]|^2 / (H^-1)_jj more squared error once the others are refit (the OBS removal
cost, applied to whole inputs as ZipLM / SlimGPT do); `greedy_keep` drops the cheapest, downdates W and H^-1 and
repeats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("hfprune")


def token_weights(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Per-token weights [tokens] in the dtype and on the device of `like` [tokens, d] (None: all 1)."""
    if weight is None:
        return torch.ones(len(like), dtype=like.dtype, device=like.device)
    return weight.detach().reshape(-1).to(like.dtype).to(like.device)


@dataclass
class PairStats:
    """Sums over calibration tokens of a consumer's target y [n] and pruned input x' [m]."""

    gram: torch.Tensor  # sum x' x'^T  [m, m]
    cross: torch.Tensor  # sum y x'^T   [n, m]
    target_sum: torch.Tensor  # sum y    [n]
    pruned_sum: torch.Tensor  # sum x'   [m]
    tokens: int = 0
    weight_sum: float = 0.0  # sum of the token weights (= tokens when unweighted)

    @classmethod
    def zeros(cls, n: int, m: int, device, gram: bool = True, dtype=torch.float32) -> PairStats:
        """`gram`: False when only the means are needed (bias); `dtype`: fp32, or fp64 for an fp64 model."""
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(z(m, m) if gram else z(0, 0), z(n, m) if gram else z(0, 0), z(n), z(m))

    def add(self, target: torch.Tensor, pruned: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """One batch: targets [..., n] and pruned inputs [..., m] of the same tokens in the same order; `weight`
        [...]: each token's weight in the fit (None: 1)."""
        y = target.detach().reshape(-1, target.shape[-1]).to(self.target_sum.dtype)
        xp = pruned.detach().reshape(-1, pruned.shape[-1]).to(y.dtype).to(y.device)
        w = token_weights(weight, y)
        if self.gram.numel():
            weighted = w[:, None] * xp
            self.gram += xp.t() @ weighted
            self.cross += y.t() @ weighted
        self.target_sum += w @ y
        self.pruned_sum += w @ xp
        self.tokens += y.shape[0]
        self.weight_sum += float(w.sum())

    def restricted(self, keep: torch.Tensor) -> PairStats:
        """The sums of the same fit on the inputs `keep` alone (a sub-block: no second pass over the tokens)."""
        k = keep.to(self.gram.device)
        return PairStats(self.gram[k][:, k], self.cross[:, k], self.target_sum, self.pruned_sum[k], self.tokens,
                         self.weight_sum)  # fmt: skip


def greedy_keep(stats: PairStats, keep: int, damp: float) -> torch.Tensor:
    """The `keep` inputs (sorted) left by greedy backward elimination of the least-squares fit in `stats`: at each
    step the input whose removal raises sum_t |y_t - W x_t|^2 + lam |W|^2 least (|W[:, j]|^2 / (H^-1)_jj, exact for
    the refit of the rest), then W and H^-1 downdated without it. fp64; lam = damp x the mean diagonal of G.

    The downdates stay factored (H^-1 = P0 - U U^T, W = W0 - A B^T, one column per step s): a step reads one column
    of each and updates the diagonal and the column norms, O(n m + (n + m) s) matrix-vector work instead of
    rewriting the m x m H^-1 and the n x m W (SmolLM2-135M, 20%: 155 s of obs's 353 s went to those rewrites; now
    200 s in all, the same neurons)."""
    m = stats.gram.shape[0]
    if not 0 < keep <= m:
        raise ValueError(f"greedy_keep: cannot keep {keep} of {m} inputs")
    h = stats.gram.double() + ridge(stats.gram, damp) * torch.eye(m, dtype=torch.float64, device=stats.gram.device)
    factor, info = torch.linalg.cholesky_ex(h)
    # no ridge and a singular Gram matrix: the pseudo-inverse still ranks the inputs
    h_inv = torch.linalg.pinv(h) if int(info) else torch.cholesky_inverse(factor)
    w0 = stats.cross.double().to(h.device) @ h_inv
    steps = m - keep
    u = h_inv.new_zeros(m, steps)  # H^-1 = h_inv - u u^T
    a, b = w0.new_zeros(w0.shape[0], steps), h_inv.new_zeros(m, steps)  # W = w0 - a b^T
    diag, norms = torch.diagonal(h_inv).clone(), w0.pow(2).sum(0)  # of the current H^-1 and W's columns
    alive = torch.ones(m, dtype=torch.bool, device=h.device)
    floor = 1e-12 * float(diag.max())  # below it: a dead input (the pseudo-inverse's zero)
    s = 0  # downdates so far
    for _ in range(steps):
        cost = norms.clamp_min(0) / diag.clamp_min(floor)
        cost[diag <= floor] = 0.0  # nothing to lose: a dead input goes first
        cost[~alive] = torch.inf
        j = int(torch.argmin(cost))
        alive[j] = False
        col = h_inv[:, j] - u[:, :s] @ u[j, :s]  # H^-1[:, j]
        if col[j] <= floor:  # nothing of a dead input to downdate
            continue
        w_j = w0[:, j] - a[:, :s] @ b[j, :s]  # W[:, j]
        ratio = col / col[j]
        # |W[:, k] - w_j ratio_k|^2 = |W[:, k]|^2 - 2 ratio_k <W[:, k], w_j> + ratio_k^2 |w_j|^2
        dots = w0.t() @ w_j - b[:, :s] @ (a[:, :s].t() @ w_j)
        norms -= 2 * ratio * dots - ratio.pow(2) * w_j.pow(2).sum()
        diag -= col.pow(2) / col[j]
        u[:, s] = col / col[j].sqrt()
        a[:, s], b[:, s] = w_j, ratio
        s += 1
    return torch.nonzero(alive).flatten().cpu()


# the default ridges (damp x the mean Gram diagonal), measured on SmolLM2-135M (docs/RECONSTRUCTION*.md): the refit
# of the importance pass's neurons is flat over 0.1-0.3; obs, which also chooses the neurons on that ridge, fits the
# calibration's noise on a weaker one (30%: 158 -> 93 perplexity at 0.3; 20%: a little better, held-out C4 flat)
LS_DAMP, OBS_DAMP = 0.1, 0.3


def default_damp(select: str) -> float:
    """--reconstruct_damp when not given, for a --reconstruct_select."""
    return OBS_DAMP if select == "obs" else LS_DAMP


def ridge(gram: torch.Tensor, damp: float) -> float:
    """The ridge lam = damp x the mean diagonal of the Gram matrix."""
    return float(damp * torch.diagonal(gram).mean()) if gram.numel() else 0.0


def solve_spd(a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor | None:
    """x with a x = b for a symmetric positive (semi)definite a, in fp64: Cholesky, else a least-squares
    solution (a singular a: dead inputs, too few tokens); None when even that is not finite."""
    a, b = a.double(), b.double()
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(b, factor)
    else:
        log.warning("%s: the Gram matrix is singular (no ridge, dead inputs or too few tokens); using the "
                    "minimum-norm least-squares solution", what)  # fmt: skip
        x = torch.linalg.lstsq(a.cpu(), b.cpu(), driver="gelsd").solution.to(a.device)
    return x if bool(torch.isfinite(x).all()) else None


def refit(sliced: torch.Tensor, stats: PairStats, damp: float, what: str = "consumer") -> torch.Tensor:
    """W' = (C + lam W_s)(G + lam I)^-1 in fp64, `sliced` = W_s [out, in'] the plain sliced weight; W_s itself
    (with a warning) when the solve is not finite: never NaN."""
    w_s = sliced.detach().double()
    lam = ridge(stats.gram, damp)
    rhs = stats.cross.double().to(w_s.device) + lam * w_s
    a = stats.gram.double().to(w_s.device) + lam * torch.eye(stats.gram.shape[0], dtype=torch.float64,
                                                              device=w_s.device)  # fmt: skip
    solution = solve_spd(a, rhs.t(), what)
    if solution is None:
        log.warning("%s: the refit is not finite; keeping the plain slice", what)
        return w_s
    return solution.t()


def mean_shift(sliced: torch.Tensor, stats: PairStats) -> torch.Tensor:
    """FLAP's compensation, for any target: the (weighted) mean over tokens of y - W_s x' (for y = W x on an
    unchanged stream and removed inputs R: W[:, R] mean(x_R)); to be added to the consumer's bias."""
    n = stats.weight_sum or 1.0
    w_s = sliced.detach().double()
    return stats.target_sum.double().to(w_s.device) / n - w_s @ (stats.pruned_sum.double().to(w_s.device) / n)


@dataclass
class MapStats:
    """Sums for one removed run of layers: M [d] layer i's MLP output, y - a [d] what it should become."""

    gram: torch.Tensor  # sum M^T M
    cross: torch.Tensor  # sum M^T (y - a)
    shift_sum: torch.Tensor  # sum (y - a - M), for the bias variant
    tokens: int = 0
    weight_sum: float = 0.0
    layers: list[int] = field(default_factory=list)

    @classmethod
    def zeros(cls, d: int, device, dtype=torch.float32) -> MapStats:
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(z(d, d), z(d, d), z(d))

    def add(self, mlp_out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """`mlp_out` M and `target` y - a (what M should become), [..., d] each; `weight` [...] per token."""
        m = mlp_out.detach().reshape(-1, mlp_out.shape[-1]).to(self.gram.dtype)
        y = target.detach().reshape(-1, target.shape[-1]).to(self.gram.dtype).to(m.device)
        w = token_weights(weight, m)
        weighted = w[:, None] * m
        self.gram += m.t() @ weighted
        self.cross += weighted.t() @ y
        self.shift_sum += w @ (y - m)
        self.tokens += m.shape[0]
        self.weight_sum += float(w.sum())


def layer_map(stats: MapStats, damp: float, what: str = "removed layers") -> torch.Tensor:
    """T = (M^T M + lam I)^-1 (M^T (y - a) + lam I): ridge towards the identity (no change); fp64 [d, d]."""
    d = stats.gram.shape[0]
    lam = ridge(stats.gram, damp)
    eye = torch.eye(d, dtype=torch.float64, device=stats.gram.device)
    solution = solve_spd(stats.gram.double() + lam * eye, stats.cross.double() + lam * eye, what)
    if solution is None:
        log.warning("%s: the map is not finite; the layers are dropped without one", what)
        return eye
    return solution
