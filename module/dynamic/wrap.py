"""Probe Pruning attached to a loaded model: each pruned layer's attention and MLP are wrapped (module substitution,
no transformers code changed) so that every batch picks its own kept query heads / MLP neurons (the math:
module/dynamic/probe.py) and runs on the gathered weights; the full weights stay loaded.

Forward pre-hooks hand the wrappers what the decoder layer does not pass them: the un-normalised residual (the
input of the layer's norms: the layer input for attention, the post-attention residual for the MLP) and, once per
batch on the base model, the pads (from the attention mask; without one, e.g. lm_eval's calls, the trailing run of
pad-token ids). With a KV cache the kept sets are chosen at prefill and kept for every decoding step of that batch
(per-prompt contextual pruning; the release cannot decode with a cache). Keys and values are never pruned (the
release prunes only query heads on grouped-query models), so the cache is the dense model's.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from module.dynamic.history import History
from module.dynamic.probe import (
    BATCH_RATIO,
    EMA_MOMENTUM,
    MULTIPLE,
    SEQ_RATIO,
    SKIP_LAYERS,
    channel_scores,
    ema_update,
    fuse,
    head_scores,
    kept_count,
    kept_units,
    layer_ratio,
    probe_energy,
    probe_fluctuation,
    probe_rows,
)
from module.model.layout import Layout, head_counts, head_rows, layout_of, submodule
from module.model.mlp import decoder_layers

VARIANTS = {  # the release's configurations (make_umn_msi_commands.py), as settings
    "probe": {},  # probe-default: probe + history + EMA (probe-calib-ema-respick)
    "oracle": {"probe": "full", "history": False, "ema": 0.0},  # "optimal probe": the whole batch, no history
    "probe_only": {"history": False, "ema": 0.0},  # probe-respick without calibration
    "history": {"probe": "none", "ema": 0.0},  # calib: static PPsp from the calibration history
}


@dataclass(frozen=True)
class ProbeSettings:
    """How each batch chooses its kept units."""

    ratio: float  # the model-wide share of units removed; each pruned layer removes layer_ratio(L, ratio)
    parts: tuple[str, ...] = ("mlp",)  # and/or "heads" (query heads)
    probe: str = "rank"  # rank (the probe), full (every window and position: the oracle), none (history only)
    history: bool = True
    ema: float = EMA_MOMENTUM  # 0: the history stays the calibration's
    metric: str = "ppsp"  # or wanda_sp, flap
    seq_ratio: float = SEQ_RATIO
    batch_ratio: float = BATCH_RATIO
    skip_layers: int = SKIP_LAYERS
    multiple: int = MULTIPLE
    prior: bool = False  # neuron scores: the entropy-Taylor prior rescaled by the batch's energy (MLP only)

    @classmethod
    def of(cls, variant: str, **kw) -> ProbeSettings:
        return cls(**{**VARIANTS[variant], **kw})


@dataclass
class ProbeState:
    """What the wrappers of one model share for the current batch."""

    pads: torch.Tensor | None = None  # [B, T] True at pads
    pad_id: int | None = None  # without an attention mask, a trailing run of this id is padding (None: the config's)
    batch_index: int = -1  # 0: the first (warm-up) batch, whose EMA update the release skips
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # the last batch's kept units per wrapper
    decoding: bool = False  # a forward that continues a filled KV cache: the kept sets of its prefill stay
    cache: weakref.ref | None = None  # the KV cache this batch's prefill filled

    def prefill_kept(self, key: str) -> torch.Tensor:
        """The kept units `key` chose at this cache's prefill."""
        if key not in self.kept:
            raise ValueError("this KV cache was filled without Probe Pruning's prefill (e.g. by another model): the "
                             "kept units are chosen at prefill, so start generation from the prompt")  # fmt: skip
        return self.kept[key]


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embeddings (the rotate-half convention of these families); q/k [B, heads, T, d], cos/sin [B, T, d]."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin


def history_rows(history: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """The history at the probe's positions (None: every calibrated one); positions past the calibration length
    take its mean over positions (the release calibrates at the evaluation length and has no such case)."""
    if positions is None:
        return history
    inside = positions < history.shape[0]
    if bool(inside.all()):
        return history[positions]
    rows = history.mean(0, keepdim=True).expand(len(positions), -1).clone()
    rows[inside] = history[positions[inside]]
    return rows


def _rows(t: torch.Tensor, windows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return t[windows][:, positions]


class _Dynamic(nn.Module):
    """What both wrappers share: the wrapped module, the history of the pruned projection, the kept count."""

    def __init__(self, inner: nn.Module, key: str, weight: torch.Tensor, units: int, keep: int,
                 history: History | None, settings: ProbeSettings, state: ProbeState,
                 prior: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        self.inner, self.key, self.settings, self.state, self.keep = inner, key, settings, state, keep
        self.units, self.residual, self.static = units, None, None
        device = weight.device
        self.energy = history.energy[key].to(device).clone() if history is not None else None
        self.fluct = history.fluctuation(key).to(device) if history is not None and settings.metric == "flap" else None
        self.prior = prior.to(device).float() if prior is not None else None

    def _pads(self, windows, positions):
        pads = self.state.pads
        return None if pads is None else _rows(pads.to(windows.device), windows, positions)

    def choose(self, probe_out: torch.Tensor | None, positions: torch.Tensor | None, probe_pads,
               weight: torch.Tensor, score) -> torch.Tensor:  # fmt: skip
        """The kept units from the probe's output at `positions` (None: history only, every position)."""
        s = self.settings
        if probe_out is None and self.static is not None:
            return self.static
        hist = self.fluct if s.metric == "flap" else self.energy
        p = None if probe_out is None else (probe_fluctuation if s.metric == "flap" else probe_energy)(probe_out,
                                                                                                       probe_pads)
        h = None if not s.history or hist is None else history_rows(hist, positions)
        fused = fuse(p, h)
        if self.prior is not None:  # the Taylor prior, scaled by how much more (or less) active the batch is
            base = history_rows(self.energy, positions)
            scores = self.prior * (fused / base.sum(0).clamp(min=1e-12)).sqrt()
        else:
            scores = score(fused, weight)
        kept = kept_units(scores, self.keep)
        if probe_out is None:
            self.static = kept
        return kept

    def update_history(self, kept: torch.Tensor, x: torch.Tensor) -> None:
        """The EMA of the pruned projection's input on its kept channels (not on the warm-up batch)."""
        if self.settings.ema > 0 and self.energy is not None and self.state.batch_index > 0:
            ema_update(self.energy, kept, x, self.state.pads, self.settings.ema)

    def probe_of(self, x: torch.Tensor):
        """The probe's windows and positions for this batch (every one for the oracle; None: no probe)."""
        s = self.settings
        if s.probe == "none":
            return None, None
        n_windows, n_positions = x.shape[:2]
        if s.probe == "full":
            return torch.arange(n_windows, device=x.device), torch.arange(n_positions, device=x.device)
        norms = torch.linalg.vector_norm(self.residual.float(), dim=-1)
        if self.state.pads is not None:
            norms = norms.masked_fill(self.state.pads.to(norms.device), 0.0)  # pads rank last
        return probe_rows(norms, s.seq_ratio, s.batch_ratio)


class ProbeMLP(_Dynamic):
    """A gated MLP (act(gate) * up, then down) whose neurons are chosen per batch."""

    def __init__(self, mlp: nn.Module, layout: Layout, **kw):
        self.names = [p.split(".")[-1] for p in layout.mlp_inputs] + [layout.mlp_output.split(".")[-1]]
        down = getattr(mlp, self.names[2])
        super().__init__(mlp, weight=down.weight, units=down.weight.shape[1], **kw)
        self.act = getattr(mlp, layout.activation.split(".")[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self.inner, n) for n in self.names)
        decoding = self.state.decoding
        if decoding:
            kept = self.state.prefill_kept(self.key)
        else:
            windows, positions = self.probe_of(x)
            probe_out = None
            if windows is not None:
                p = _rows(x, windows, positions)
                probe_out = self.act(gate(p)) * up(p)
            kept = self.choose(probe_out, positions, None if windows is None else self._pads(windows, positions),
                               down.weight, lambda f, w: channel_scores(f, w, self.settings.metric))  # fmt: skip
            self.state.kept[self.key] = kept
        mid = self.act(F.linear(x, gate.weight[kept], None if gate.bias is None else gate.bias[kept]))
        mid = mid * F.linear(x, up.weight[kept], None if up.bias is None else up.bias[kept])
        if not decoding:
            self.update_history(kept, mid)
        return F.linear(mid, down.weight[:, kept], down.bias)


class ProbeAttention(_Dynamic):
    """Self-attention whose query heads are chosen per batch; keys and values stay whole (grouped-query models)."""

    def __init__(self, attention: nn.Module, layout: Layout, config, **kw):
        self.layout, self.heads = layout, head_counts(config)
        out = getattr(attention, layout.output)
        super().__init__(attention, weight=out.weight, units=self.heads.query, **kw)

    def _qkv(self, x: torch.Tensor, q_rows: torch.Tensor | None, cos, sin):
        a, lay, hd = self.inner, self.layout, self.heads.head_dim
        q_proj, k_proj, v_proj = (getattr(a, n) for n in (lay.query, lay.key, lay.value))
        wq, bq = q_proj.weight, q_proj.bias
        if q_rows is not None:
            wq, bq = wq[q_rows], None if bq is None else bq[q_rows]
        q = F.linear(x, wq, bq).unflatten(-1, (-1, hd))
        k, v = k_proj(x).unflatten(-1, (-1, hd)), v_proj(x).unflatten(-1, (-1, hd))
        if lay.query_norm:
            q, k = getattr(a, lay.query_norm)(q), getattr(a, lay.key_norm)(k)
        q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2)

    def _probe(self, x, windows, positions, position_embeddings) -> torch.Tensor:
        """The probe's attention output (o_proj's input), full heads, causal among the probe's positions (exact:
        they are ascending), pad keys masked."""
        cos, sin = position_embeddings
        pick = lambda t: t[windows if t.shape[0] == x.shape[0] else [0] * len(windows)][:, positions]  # noqa: E731
        q, k, v = self._qkv(_rows(x, windows, positions), None, pick(cos), pick(sin))
        group = torch.arange(self.heads.query, device=x.device) // self.heads.group
        n = len(positions)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().expand(len(windows), 1, n, n)
        pads = self._pads(windows, positions)
        if pads is not None:
            mask = mask & ~pads[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k[:, group], v[:, group], attn_mask=mask, scale=self.inner.scaling)
        return out.transpose(1, 2).flatten(2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length(self.inner.layer_idx) if cache is not None else 0
        x, hd = hidden_states, self.heads.head_dim
        o_proj = getattr(self.inner, self.layout.output)
        if self.state.decoding:
            kept = self.state.prefill_kept(self.key)
        else:
            windows, positions = self.probe_of(x)
            probe_out = None if windows is None else self._probe(x, windows, positions, position_embeddings)
            kept = self.choose(probe_out, positions, None if windows is None else self._pads(windows, positions),
                               o_proj.weight, lambda f, w: head_scores(f, w, self.heads.query, self.settings.metric))
            self.state.kept[self.key] = kept
        rows = head_rows(kept.cpu(), hd).to(x.device)
        q, k, v = self._qkv(x, rows, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.inner.layer_idx)
        group = kept // self.heads.group
        mask = None if attention_mask is None else attention_mask[:, :, :, : k.shape[-2]]
        out = F.scaled_dot_product_attention(q, k[:, group], v[:, group], attn_mask=mask,
                                             is_causal=mask is None and x.shape[1] > 1 and past == 0,
                                             scale=self.inner.scaling)  # fmt: skip
        out = out.transpose(1, 2).flatten(2)
        if not self.state.decoding:
            self.update_history(rows, out)
        return F.linear(out, o_proj.weight[:, rows], o_proj.bias), None


def attach(model: nn.Module, settings: ProbeSettings, history: History | None,
           prior: list[torch.Tensor] | None = None) -> ProbeState:  # fmt: skip
    """Wrap the pruned layers of `model` in place (layers below settings.skip_layers stay dense); its state."""
    layout = layout_of(model, "dynamic", "--dynamic probe")
    model.set_attn_implementation("sdpa")  # the wrappers run SDPA; the masks the model builds must match
    state = ProbeState()
    layers = decoder_layers(model)
    ratio = layer_ratio(len(layers), settings.ratio, settings.skip_layers)
    heads = head_counts(model.config)
    for i, layer in enumerate(layers):
        if i < settings.skip_layers:
            continue
        common = {"history": history, "settings": settings, "state": state}
        if "mlp" in settings.parts:
            mlp_path = layout.mlp_output.rsplit(".", 1)[0]
            mlp = submodule(layer, mlp_path)
            n = getattr(mlp, layout.mlp_output.split(".")[-1]).weight.shape[1]
            wrapper = ProbeMLP(mlp, layout, key=f"mlp.{i}", keep=kept_count(n, ratio, settings.multiple),
                               prior=None if prior is None else prior[i], **common)  # fmt: skip
            _replace(layer, mlp_path, wrapper)
            _residual_hook(layer, layout.norms[1], wrapper)
        if "heads" in settings.parts:
            attention = submodule(layer, layout.attention)
            wrapper = ProbeAttention(attention, layout, model.config, key=f"attn.{i}",
                                     keep=kept_count(heads.query, ratio), **common)  # fmt: skip
            _replace(layer, layout.attention, wrapper)
            _residual_hook(layer, layout.norms[0], wrapper)
    model.base_model.register_forward_pre_hook(_batch_hook(state, model.config), with_kwargs=True)
    return state


def _replace(parent: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(submodule(parent, owner) if owner else parent, name, module)


def _residual_hook(layer: nn.Module, norm_path: str, wrapper: _Dynamic) -> None:
    def keep(module, args):
        wrapper.residual = args[0]

    submodule(layer, norm_path).register_forward_pre_hook(keep)


def _batch_hook(state: ProbeState, config):
    """Per forward of the base model: the pads of a new batch (not of a decoding step) and its index."""
    def hook(module, args, kwargs):
        pad_id = state.pad_id if state.pad_id is not None else getattr(config, "pad_token_id", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state.decoding = cache is not None and cache.get_seq_length() > 0
        if state.decoding:
            if state.cache is None or state.cache() is not cache:
                state.kept.clear()  # a cache this model did not prefill: prefill_kept refuses it
            return  # a decoding step: the batch's kept sets stay
        state.kept.clear()
        state.cache = None if cache is None else weakref.ref(cache)
        state.batch_index += 1
        if mask is not None and mask.dim() == 2:
            state.pads = mask == 0 if bool((mask == 0).any()) else None
        elif ids is not None and pad_id is not None:
            trailing = (ids == pad_id).flip(1).cumprod(1).flip(1).bool()  # the trailing run of pad ids
            state.pads = trailing if bool(trailing.any()) else None
        else:
            state.pads = None

    return hook

