"""Scoring a mix without copying the model: hooks make the unpruned model compute exactly what the sliced
candidate computes (`CandidateMasks`), and `candidate_kl` gives each candidate's mean KL(dense || candidate) of
the next-token distributions over held-out windows, the dense side computed once per batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from module.entropy import LogitHead, default_chunk_tokens, kl_sum, log_prob_chunks
from module.model.layout import Layout, attention_modules, head_counts, head_rows, submodule
from module.model.mlp import ModelMLPs, decoder_layers


class CandidateMasks:
    """Hooks that make the unpruned model compute exactly what a sliced candidate computes.

    - neurons: the inputs of the MLP output projection zeroed at removed neurons;
    - query heads: the o_proj input zeroed at removed heads (a removed key/value group serves only removed
      query heads, so nothing else changes);
    - layers: the layer's output replaced by its input;
    - hidden channels: every write into the residual stream (embedding, o_proj, down_proj) zeroed at removed
      channels, and each RMSNorm made to average over the kept d' of d channels: with zeros there,
      mean_d = (d'/d) mean_d', so eps * d'/d inside and sqrt(d'/d) outside give x / sqrt(mean_d' + eps).
    `set` switches candidates without re-registering hooks; `clear` restores the dense model.
    """

    def __init__(self, model: nn.Module, mlps: ModelMLPs | None, layout: Layout | None):
        self.model, self.layout = model, layout
        layers = decoder_layers(model)
        self.neuron_mask: list[torch.Tensor | None] = [None] * len(layers)
        self.head_mask: list[torch.Tensor | None] = [None] * len(layers)
        self.skip: set[int] = set()
        self.hidden_mask: torch.Tensor | None = None
        self.norm_scale = 1.0
        self.handles = []
        self.norms: list[tuple[nn.Module, float]] = []
        self.mlp_outputs = [layer.output.module for layer in mlps.layers] if mlps is not None else []
        for i, module in enumerate(self.mlp_outputs):
            self.handles.append(module.register_forward_pre_hook(self._input_mask(self.neuron_mask, i)))
        if layout is None:
            return
        self.handles.append(model.get_input_embeddings().register_forward_hook(self._hidden_write))
        for i, layer in enumerate(layers):
            o_proj = attention_modules(layer, layout)[-1]
            self.handles.append(o_proj.register_forward_pre_hook(self._input_mask(self.head_mask, i)))
            for writer in (o_proj, submodule(layer, layout.mlp_output)):
                self.handles.append(writer.register_forward_hook(self._hidden_write))
            self.handles.append(layer.register_forward_hook(self._skip(i), with_kwargs=True))
            self.norms += [(submodule(layer, n), 0.0) for n in layout.norms]
        self.norms.append((submodule(model.base_model, layout.final_norm), 0.0))
        self.norms = [(norm, getattr(norm, layout.norm_eps)) for norm, _ in self.norms]
        for norm, _ in self.norms:
            self.handles.append(norm.register_forward_hook(self._norm_scale))

    # -- hooks ------------------------------------------------------------------------------------------
    @staticmethod
    def _input_mask(masks: list, index: int):
        def hook(module, args):
            mask = masks[index]
            return None if mask is None else (args[0] * mask, *args[1:])

        return hook

    def _hidden_write(self, module, args, out):
        return None if self.hidden_mask is None else out * self.hidden_mask

    def _skip(self, index: int):
        def hook(module, args, kwargs, out):
            if index not in self.skip:
                return None
            x = kwargs.get("hidden_states", args[0] if args else None)
            return (x, *out[1:]) if isinstance(out, tuple) else x

        return hook

    def _norm_scale(self, module, args, out):
        return None if self.norm_scale == 1.0 else out * self.norm_scale

    # -- switching --------------------------------------------------------------------------------------
    def clear(self) -> None:
        for masks in (self.neuron_mask, self.head_mask):
            masks[:] = [None] * len(masks)
        self.skip = set()
        self.hidden_mask = None
        self.norm_scale = 1.0
        for norm, eps in self.norms:
            setattr(norm, self.layout.norm_eps, eps)

    def set(self, mlp_keep: list[torch.Tensor] | None, kept: dict[str, torch.Tensor]) -> None:
        """Mask everything the candidate removes (kept indices in original numbering)."""
        self.clear()
        layers = decoder_layers(self.model)
        if mlp_keep is not None:
            for i, (module, keep) in enumerate(zip(self.mlp_outputs, mlp_keep)):
                self.neuron_mask[i] = _mask(module, module.weight.shape[1], keep)
        if "heads.layer.0" in kept:
            h = head_counts(self.model.config)
            for i, layer in enumerate(layers):
                keep = head_rows(kept[f"heads.layer.{i}"], h.head_dim)
                self.head_mask[i] = _mask(layer, h.query * h.head_dim, keep)
        if "layers" in kept:
            self.skip = set(range(len(layers))) - set(kept["layers"].tolist())
        if "hidden" in kept:
            d = self.model.config.hidden_size
            share = len(kept["hidden"]) / d
            self.hidden_mask = _mask(self.model.get_input_embeddings(), d, kept["hidden"])
            self.norm_scale = math.sqrt(share)
            for norm, eps in self.norms:
                setattr(norm, self.layout.norm_eps, eps * share)

    def close(self) -> None:
        self.clear()
        for handle in self.handles:
            handle.remove()


def _on(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    param = next(module.parameters())
    return mask.to(param.device, param.dtype)


def _mask(module: nn.Module, size: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size)
    mask[keep] = 1
    return _on(module, mask)


@torch.no_grad()
def candidate_kl(
    model: nn.Module,
    masks: CandidateMasks,
    kept_per_candidate: list,
    windows: torch.Tensor,
    batch_size: int = 1,
    chunk_tokens: int | None = None,
    progress: bool = True,
    keep_bytes: int = 1 << 30,
) -> list[float]:
    """Mean KL(dense || candidate) per token over `windows` [N, T], for every candidate's (mlp_keep, kept).

    Batches outside, candidates inside: the dense side of a batch is computed once (its log-probabilities are
    kept when they take at most `keep_bytes`, else recomputed per candidate from its hidden states)."""
    head = LogitHead.from_model(model)
    chunk = chunk_tokens or default_chunk_tokens(head.weight.shape[0], head.weight.device)
    base = model.base_model
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    sums = [0.0] * len(kept_per_candidate)
    total = len(windows) * len(kept_per_candidate)
    bar = tqdm(total=total, desc="mix search (KL)", unit="window", disable=not progress)
    try:
        for s in range(0, len(windows), batch_size):
            ids = windows[s : s + batch_size].to(device)
            masks.clear()
            dense = base(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)
            fits = len(dense) * head.weight.shape[0] * 4 <= keep_bytes
            dense_log_probs = log_prob_chunks(head, dense, chunk) if fits else None
            for i, (mlp_keep, kept) in enumerate(kept_per_candidate):
                masks.set(mlp_keep, kept)
                pruned = base(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)
                sums[i] += kl_sum(head, dense, pruned, chunk, dense_log_probs)
                bar.update(len(ids))
    finally:
        masks.clear()
        bar.close()
        model.train(was_training)
    return [v / windows.numel() for v in sums]


@torch.no_grad()
def models_kl(dense: nn.Module, pruned: nn.Module, windows: torch.Tensor, batch_size: int = 1,
              chunk_tokens: int | None = None, progress: bool = True) -> float:  # fmt: skip
    """Mean KL(dense || pruned) per token over `windows` [N, T] between two real models (a pruned model that
    masks cannot express: a reconstructed one)."""
    head_d, head_p = LogitHead.from_model(dense), LogitHead.from_model(pruned)
    chunk = chunk_tokens or default_chunk_tokens(head_d.weight.shape[0], head_d.weight.device)
    device = dense.get_input_embeddings().weight.device
    total = 0.0
    for s in tqdm(range(0, len(windows), batch_size), desc="KL after reconstruction", disable=not progress):
        ids = windows[s : s + batch_size].to(device)
        hd = dense.base_model(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)
        hp = pruned.base_model(input_ids=ids, use_cache=False).last_hidden_state.flatten(0, 1)
        for c in range(0, len(hd), chunk):
            lp = log_prob_chunks(head_d, hd[c : c + chunk], chunk)[0]
            lq = log_prob_chunks(head_p, hp[c : c + chunk].to(head_p.weight.device), chunk)[0]
            total += float((lp.exp() * (lp - lq.to(lp.device))).sum(dtype=torch.float64))
    return total / windows.numel()
