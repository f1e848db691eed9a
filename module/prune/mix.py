"""The mix search: how much of each structure (MLP neurons, heads, layers, hidden width) to remove for one size.

Candidates. Each structure other than the MLP is offered at the loadable sizes whose removal alone is
nearest to 0, 1/steps, ..., steps/steps of the target; every combination of those is a candidate. When
the MLP is searched too it takes exactly the rest (to `round_to` neurons), otherwise a combination must
land within `tolerance` of the target. Parameter counts are measured by slicing a weightless (meta) copy,
so they are exact and every candidate passes the same loadability checks as an explicit size.

Scoring. The kept units of every candidate come from the one importance pass; a candidate's score is the mean
KL(dense || candidate) of the next-token distributions over held-out windows (lower is better), measured on the
unpruned model by module/prune/masks.py.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from module.model.layout import HEAD_MODES, Layout, StructureError, head_counts, layout_of, valid_head_counts
from module.model.mlp import count_parameters, decoder_layers, find_mlps
from module.prune.criteria import top_k_sorted
from module.prune.plan import StructureSizes, apply, check_sizes, kept_sets

MIX_KEYS = ("mlp_keep", "heads_keep", "layers_remove", "hidden_keep", "head_mode")


@dataclass(frozen=True)
class Mix:
    """One candidate: neurons kept per layer (None: the MLP is not pruned) and the other structures' sizes."""

    mlp_keep: int | None = None
    sizes: StructureSizes = StructureSizes()

    @property
    def parts(self) -> list[str]:
        return (["mlp"] if self.mlp_keep else []) + self.sizes.parts

    def describe(self) -> str:
        """The canonical text of the mix, what `--mix` reads back: e.g. mlp_keep=1152,heads_keep=6,layers_remove=2."""
        s = self.sizes
        named = (("mlp_keep", self.mlp_keep), ("heads_keep", s.heads_keep), ("layers_remove", s.layers_remove),
                 ("hidden_keep", s.hidden_keep))  # fmt: skip
        items = [(k, v) for k, v in named if v]
        if s.heads_keep and s.head_mode != "kv_group":
            items.append(("head_mode", s.head_mode))
        return ",".join(f"{k}={v}" for k, v in items) or "dense"

    @classmethod
    def parse(cls, text: str) -> Mix:
        """The mix of a description written by `describe` (one clear error for anything else)."""
        values: dict[str, str] = {}
        for item in str(text).split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in MIX_KEYS or key in values:
                raise ValueError(
                    f"--mix {text!r}: {item.strip()!r} is not KEY=VALUE with a distinct KEY among {', '.join(MIX_KEYS)}"
                )
            values[key] = value.strip()
        mode = values.pop("head_mode", "kv_group")
        if mode not in HEAD_MODES:
            raise ValueError(f"--mix {text!r}: head_mode {mode!r} is not one of {', '.join(HEAD_MODES)}")
        sizes: dict[str, int] = {}
        for key, value in values.items():
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"--mix {text!r}: {key} must be a positive integer (got {value!r})")
            sizes[key] = int(value)
        if not sizes:
            raise ValueError(f"--mix {text!r} prunes nothing")
        mlp = sizes.pop("mlp_keep", None)
        return cls(mlp, StructureSizes(**{k: sizes.get(k, 0) for k in ("heads_keep", "layers_remove", "hidden_keep")},
                                       head_mode=mode))  # fmt: skip


def first_units_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Scores that keep the first units of every structure (for counting parameters: which units does not matter)."""
    n = len(decoder_layers(model))
    h = head_counts(model.config)
    desc = lambda k: torch.arange(k, 0, -1, dtype=torch.float64)  # noqa: E731
    out = {f"heads.layer.{i}": desc(h.query) for i in range(n)} | {f"groups.layer.{i}": desc(h.kv) for i in range(n)}
    return out | {"layers": desc(n), "hidden": desc(model.config.hidden_size)}


def check_mix(shapes: nn.Module, mix: Mix) -> None:
    """Every size of `mix` reachable and loadable (a weightless model is enough)."""
    check_sizes(shapes, mix.sizes)
    if mix.mlp_keep is not None:
        neurons = find_mlps(shapes).neurons
        if not 1 <= mix.mlp_keep < neurons:
            raise StructureError(f"mlp_keep {mix.mlp_keep} must be in 1..{neurons - 1} ({neurons} neurons per layer)")


def sliced_meta(shapes: nn.Module, mix: Mix) -> tuple[nn.Module, dict[str, int]]:
    """A weightless copy of `shapes` sliced to `mix`, and the parameters each structure removed."""
    check_mix(shapes, mix)
    model = copy.deepcopy(shapes)
    mlps = find_mlps(model) if mix.mlp_keep else None
    mlp_keep = [torch.arange(mix.mlp_keep) for _ in mlps.layers] if mlps else None
    removed = apply(model, mlps, mlp_keep, mix.sizes, kept_sets(model, mix.sizes, first_units_scores(model)))
    return model, removed


@dataclass
class Candidate:
    """One leaderboard row."""

    mix: Mix
    params: int
    achieved_ratio: float
    removed: dict[str, int]
    kl: float | None = None
    speed: dict | None = None
    kl_reconstructed: float | None = None  # with --reconstruct and --reconstruct_rescore
    description: str = field(init=False)

    def __post_init__(self) -> None:
        self.description = self.mix.describe()

    def as_dict(self) -> dict:
        return {"mix": self.description, "params": self.params, "achieved_ratio": self.achieved_ratio,
                "removed": self.removed, "kl": self.kl, "kl_reconstructed": self.kl_reconstructed,
                "speed": self.speed}  # fmt: skip


def candidate_of(shapes: nn.Module, mix: Mix, params_before: int) -> Candidate:
    model, removed = sliced_meta(shapes, mix)
    params = count_parameters(model)
    return Candidate(mix, params, 1 - params / params_before, removed)


def structure_options(
    shapes: nn.Module, part: str, head_mode: str, round_to: int = 1
) -> list[tuple[StructureSizes, float]]:
    """Every loadable size of one structure alone with the parameters it removes, fewest removed first.
    Removal is linear in layers and hidden channels, so one weightless slice measures its unit."""
    config = shapes.config
    if part == "heads":
        layout = layout_of(shapes, "heads")
        sizes = [StructureSizes(heads_keep=c, head_mode=head_mode)
                 for c in valid_head_counts(config, head_mode, layout.hidden_divisible_by_heads)[1:]]  # fmt: skip
        return [(s, sum(sliced_meta(shapes, Mix(None, s))[1].values())) for s in sizes]
    if part == "layers":
        unit = sum(sliced_meta(shapes, Mix(None, StructureSizes(layers_remove=1)))[1].values())
        return [(StructureSizes(layers_remove=k), k * unit) for k in range(1, config.num_hidden_layers)]
    if part == "hidden":
        d = config.hidden_size
        step = round_to
        if layout_of(shapes, "hidden").hidden_divisible_by_heads:  # every head count it may meet must divide it
            step = math.lcm(step, *valid_head_counts(config, head_mode, True))
        keeps = list(range(d - d % step - (0 if d % step else step), 0, -step))
        if not keeps:
            return []
        unit = sum(sliced_meta(shapes, Mix(None, StructureSizes(hidden_keep=keeps[0])))[1].values()) / (d - keeps[0])
        return [(StructureSizes(hidden_keep=k), (d - k) * unit) for k in keeps]
    raise ValueError(part)


class MixSpace:
    """The loadable mixes of `parts` that remove `ratio` of all parameters.

    A point is one option index per structure besides the MLP (-1: not pruned); the MLP, when searched,
    takes exactly the rest (to `round_to` neurons), otherwise a point must land within `tolerance`.
    """

    def __init__(self, shapes: nn.Module, parts: list[str], ratio: float, *, head_mode: str = "kv_group",
                 tolerance: float = 0.01, round_to: int = 1):  # fmt: skip
        self.shapes, self.parts, self.ratio = shapes, parts, ratio
        self.head_mode, self.tolerance, self.round_to = head_mode, tolerance, round_to
        self.params_before = count_parameters(shapes)
        self.target = ratio * self.params_before
        self.fill = "mlp" in parts
        limit = self.target + (0 if self.fill else tolerance * self.params_before)
        self.others = [p for p in parts if p != "mlp"]
        self.options = {p: [o for o in structure_options(shapes, p, head_mode, round_to) if o[1] <= limit]
                        for p in self.others}  # fmt: skip
        self.points: dict[str, tuple[int, ...]] = {}  # description -> point

    def candidate(self, point: tuple[int, ...]) -> Candidate | None:
        """The candidate at `point`, or None when it is not loadable or cannot reach the ratio."""
        chosen = [self.options[p][i][0] for p, i in zip(self.others, point) if i >= 0]
        sizes = StructureSizes(
            heads_keep=max((s.heads_keep for s in chosen), default=0),
            head_mode=self.head_mode,
            layers_remove=max((s.layers_remove for s in chosen), default=0),
            hidden_keep=max((s.hidden_keep for s in chosen), default=0),
        )
        try:
            cand = self._fill(sizes) if self.fill else candidate_of(self.shapes, Mix(None, sizes), self.params_before)
        except StructureError:  # e.g. a hidden size the kept head count does not divide
            return None
        if cand is None or (not self.fill and abs(cand.achieved_ratio - self.ratio) > self.tolerance):
            return None
        self.points.setdefault(cand.description, point)
        return cand

    def _fill(self, sizes: StructureSizes) -> Candidate | None:
        """The MLP removes what `sizes` leaves of the target (None when it cannot)."""
        model, removed = sliced_meta(self.shapes, Mix(None, sizes)) if sizes.parts else (self.shapes, {})
        rest = self.target - sum(removed.values())
        if rest < 0:
            return None
        mlps = find_mlps(model)
        per_neuron = sum(layer.params_per_neuron() for layer in mlps.layers)
        k = mlps.neurons - round(rest / per_neuron)
        if self.round_to > 1:
            k = self.round_to * round(k / self.round_to)
        if k < 1 or (k >= mlps.neurons and not sizes.parts):
            return None
        return candidate_of(self.shapes, Mix(k if k < mlps.neurons else None, sizes), self.params_before)

    def grid(self, steps: int, max_candidates: int) -> list[Candidate]:
        """Each structure at 'not pruned' and at the options whose removal alone is nearest to j/steps of the
        target (j = 1..steps); every combination; MLP-only first; at most `max_candidates`, evenly thinned."""
        levels = []
        for p in self.others:
            removal = [r for _, r in self.options[p]]
            nearest = {min(range(len(removal)), key=lambda i: abs(removal[i] - self.target * j / steps))
                       for j in range(1, steps + 1)} if removal else set()  # fmt: skip
            levels.append([-1, *sorted(nearest)])
        found: dict[str, Candidate] = {}
        for point in itertools.product(*levels):
            cand = self.candidate(point)
            if cand is not None:
                found.setdefault(cand.description, cand)
        cands = list(found.values())
        if len(cands) > max_candidates:
            stride = len(cands) / max_candidates
            cands = [cands[int(i * stride)] for i in range(max_candidates)]
        if not cands:
            hint = ("lower --pruning_ratio: even every other structure at its smallest loadable size and the MLPs "
                    "filling the rest cannot reach it" if self.fill else
                    "add mlp to --prune_parts (it fills any remainder) or raise --search_tolerance")  # fmt: skip
            raise StructureError(f"no loadable mix of {', '.join(self.parts)} removes {self.ratio:g} of the parameters"
                                 f"{'' if self.fill else f' within {self.tolerance:g}'}; {hint}")  # fmt: skip
        return cands

    def neighbours(self, cand: Candidate) -> list[Candidate]:
        """The candidates one option away in one structure (the MLP refilled)."""
        point = self.points[cand.description]
        out = []
        for axis, part in enumerate(self.others):
            for step in (-1, 1):
                i = point[axis] + step
                if -1 <= i < len(self.options[part]):
                    near = self.candidate(point[:axis] + (i,) + point[axis + 1 :])
                    if near is not None and near.description != cand.description:
                        out.append(near)
        return out


def search(space: MixSpace, score, steps: int = 4, max_candidates: int = 64, refine_rounds: int = 4) -> list[Candidate]:
    """The leaderboard (best first): the grid, then from its best a hill climb over the neighbours (one option
    of one structure away) while the best improves; `score(candidates)` gives their KLs. At most
    `max_candidates` are scored."""
    grid = space.grid(steps, max_candidates)
    board = with_kl(grid, score(grid))
    for _ in range(refine_rounds):
        scored = {c.description for c in board}
        new = [c for c in space.neighbours(board[0]) if c.description not in scored]
        new = list({c.description: c for c in new}.values())[: max_candidates - len(board)]
        if not new:
            break
        best = board[0].description
        board = sorted(board + with_kl(new, score(new)), key=_rank)
        if board[0].description == best:
            break
    return board


def mix_kept(model: nn.Module, mix: Mix, neuron_scores: list[torch.Tensor], structure_scores: dict[str, torch.Tensor]):
    """Kept neurons per layer (None: MLP not pruned) and every other structure's kept units, from the scores."""
    mlp_keep = [top_k_sorted(s, mix.mlp_keep) for s in neuron_scores] if mix.mlp_keep else None
    return mlp_keep, kept_sets(model, mix.sizes, structure_scores)


def sliced_copy(model: nn.Module, mix: Mix, mlp_keep, kept: dict[str, torch.Tensor]) -> nn.Module:
    """A real copy of `model` sliced to the candidate (what the saved folder holds)."""
    pruned = copy.deepcopy(model)
    apply(pruned, find_mlps(pruned) if mlp_keep else None, mlp_keep, mix.sizes, kept)
    return pruned


def search_layout(model: nn.Module, parts: list[str]) -> Layout | None:
    """The layout the masks need (None when only MLP neurons are searched)."""
    others = [p for p in parts if p != "mlp"]
    return layout_of(model, others[0]) if others else None


def with_kl(cands: list[Candidate], kls: list[float]) -> list[Candidate]:
    """The leaderboard: candidates with their KL, best first (ties: fewer parameters, then the description)."""
    return sorted((replace(c, kl=k) for c, k in zip(cands, kls)), key=_rank)


def _rank(c: Candidate) -> tuple:
    return (c.kl, c.params, c.description)
