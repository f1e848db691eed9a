"""`--reconstruct bias|ls`: compensate what the removed structures contributed inside the weights that remain,
training-free, layer by layer (the math: module/prune/refit.py; which consumers each layer refits:
module/prune/consumers.py).

The calibration windows run through the dense model and the pruned copy side by side, one decoder layer at a
time. In each kept layer, every consumer that lost inputs (down_proj for MLP neurons, o_proj for heads; with
hidden channels removed also q/k/v, gate/up, the writers o_proj/down_proj and an untied LM head) is refit in
forward order, so each refit sees the inputs of the already refit consumers before it: its pruned input comes
from the pruned, already refit layers below (layer-sequential, as our SparseGPT). The target is the unpruned
consumer's output on the dense model's own inputs (`--reconstruct_target dense`: corrects upstream error too) or
on the pruned stream (`own`: each layer only repairs itself; needs the full hidden width). A run of removed
layers after kept layer i becomes one linear map on layer i's MLP output, folded into its down_proj (a leading run
has no layer before it and is left without one). A fit towards the residual stream weights each token by 1 / the
dense stream's mean square there (`--reconstruct_weighting rms`, the default: the first position's stream is ~100x
the others' and would rule an unweighted fit). `bias` adds FLAP's mean compensation to biases instead, on the
pruned stream (the family must have a bias there or a config key that adds one, e.g. Llama's
mlp_bias/attention_bias). `--reconstruct_select obs` (with ls) also re-chooses which MLP neurons each layer keeps,
the count unchanged, by greedy elimination on the refit's own sums over every neuron of the dense MLP run on the
pruned stream (module/prune/refit.py `greedy_keep`): the importance pass then decides the other structures and
the mix, and the neuron count per layer.
Every saved model still loads with plain `from_pretrained`. How a prune.py run asks for all this (its flags as
Settings, biases added first for `bias`): module/prune/compensation.py.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from module.model.layout import Layout, submodule
from module.model.mlp import decoder_layers, find_mlps
from module.prune.capture import capture, intermediate, run_layer
from module.prune.consumers import Consumer, mlp_output_path, removed_runs, set_weight_out_in, stages_of, weight_out_in
from module.prune.refit import MapStats, PairStats, greedy_keep, layer_map, mean_shift, refit
from module.prune.reselect import check_obs, check_obs_tokens, mlp_pair, reselect
from module.sparse.layerwise import layer_inputs
from utils.errors import UserError
from utils.report import PeakMemory

log = logging.getLogger("hfprune")
MODES = ("none", "bias", "ls")
TARGETS = ("dense", "own")
WRITERS = ("pruned", "all")
WEIGHTINGS = ("uniform", "rms")
SELECTIONS = ("scores", "obs")
REFIT_BATCH = 8  # windows per forward of the refit at least: no gradients, and per-call overhead dominates on CPU


class Reconstructor:
    """Streams the windows through the dense model and the pruned copy, layer by layer, refitting as it goes."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, mlp_keep, kept: dict, layout: Layout | None,
                 mode: str, target: str, damp: float, windows: torch.Tensor, batch_size: int = 1,
                 store: str | None = None, progress: bool = True, writers: str = "pruned",
                 weighting: str = "rms", select: str = "scores"):  # fmt: skip
        if target == "own" and "hidden" in kept:
            raise UserError("--reconstruct_target own needs the full hidden width (the unpruned layer runs on the "
                            "pruned stream); with hidden channels removed use --reconstruct_target dense")  # fmt: skip
        self.dense, self.pruned, self.mlp_keep, self.kept, self.layout = dense, pruned, mlp_keep, kept, layout
        if writers == "all" and (mode != "ls" or target != "dense"):
            raise UserError("--reconstruct_writers all needs --reconstruct ls and --reconstruct_target dense")
        self.mode, self.target, self.damp, self.progress = mode, target, damp, progress
        self.select_obs = select == "obs" and mlp_keep is not None
        if self.select_obs:
            check_obs(dense, mode)
            if "hidden" in kept:  # a searched candidate with hidden channels removed: its neurons stay the scores'
                log.info("reconstruct: hidden channels removed; the kept MLP neurons are the importance pass's")
                self.select_obs = False
            else:
                check_obs_tokens(dense, windows, damp)
        if mode == "bias" and "hidden" in kept:  # a searched mix with hidden channels removed
            log.warning("reconstruct bias: the removed hidden channels are not compensated (a channel removed from "
                        "the residual stream leaves no mean to put back); --reconstruct ls refits their consumers")
        # both models' MLPs, found once (the pruned layers' modules stay the same objects; obs rewrites their weights)
        self.obs_mlps = (find_mlps(dense), find_mlps(pruned)) if self.select_obs else None
        self.all_writers = writers == "all" and layout is not None  # the layout says where the writers are
        self.rms_weights = weighting == "rms"
        self.n_dense = len(decoder_layers(dense))
        self.kept_layers = kept["layers"].tolist() if "layers" in kept else list(range(self.n_dense))
        self.mlp_path = mlp_output_path(dense, layout)
        self.acc = torch.float64 if dense.get_input_embeddings().weight.dtype == torch.float64 else torch.float32
        self.writers = ({f"{layout.attention}.{layout.output}", layout.mlp_output} if layout is not None
                        else set())  # fmt: skip
        device = dense.get_input_embeddings().weight.device
        store = store or device
        self.x_d, self.kw_d = layer_inputs(dense, windows, batch_size, store)
        self.x_p, self.kw_p = layer_inputs(pruned, windows, batch_size, store)
        self.store = store
        # the dense stream after the current layer (dense_out: per batch, kept by the refit of the MLP's writer,
        # which runs the dense layer whole) and after the removed run that follows it (dense_past: computed once,
        # for the layer map and the advance): what follows reads them instead of running the layers again
        self.dense_out: dict[int, torch.Tensor] = {}
        self.dense_past: dict[int, torch.Tensor] = {}
        self.report = {"consumers_refit": 0, "layer_maps": 0, "leading_removed_layers": 0,
                       "neurons_reselected": 0}  # fmt: skip

    # -- one stage: targets and pruned inputs, then the refit -------------------------------------------------
    def _after_write(self, path: str) -> str | None:
        """Where the residual stream right after a writer's addition can be read: the input of the norm that
        follows (o_proj: post_attention_layernorm), or the layer's output (None: the last writer)."""
        if self.layout is not None and path == f"{self.layout.attention}.{self.layout.output}":
            return self.layout.norms[1]
        return None

    def _stage(self, i: int, j: int, consumers: list[Consumer]) -> None:
        """Refit the consumers of one stage (they share their input). Target of a consumer: the unpruned
        consumer on the reference input (the dense model's, or the dense layer's on the pruned stream); for a
        writer of the residual stream refit by ls with dense targets (with --reconstruct_writers all: every
        writer, pruned or not), its current output plus the stream's error right after it, so the refit also
        repairs what the layers below left (the layout says where the stream is)."""
        dense_layer, pruned_layer = decoder_layers(self.dense)[i], decoder_layers(self.pruned)[j]
        d_mods = [submodule(dense_layer, c.path) for c in consumers]
        p_mods = [submodule(pruned_layer, c.path) for c in consumers]
        # bias: FLAP's mean of the consumer's own lost output; the mean of the stream's error instead broke the
        # model (SmolLM2, 20% MLP: 1337 perplexity, 1029 with rms weights)
        writer = (self.target == "dense" and self.mode == "ls" and self.layout is not None
                  and consumers[0].path in self.writers)  # fmt: skip
        after = self._after_write(consumers[0].path) if writer else None
        stop_d = None if writer and after is None else submodule(dense_layer, after) if writer else d_mods[0]
        stop_p = None if writer and after is None else submodule(pruned_layer, after) if writer else p_mods[0]
        d_slot, p_slot, da_slot, pa_slot, mlp_slot = [None], [None], [None], [None], [None]
        handles = capture(p_mods[:1], p_slot, stop_p if stop_p is p_mods[0] else None)
        # obs: the refit's sums over every neuron of the dense MLP run on the pruned MLP's input; it picks the kept
        obs = self.select_obs and consumers[0].path == self.mlp_path and consumers[0].cols is not None
        if obs:
            dense_mlp_module, pruned_mlp_module, dense_mlp, pruned_mlp = mlp_pair(self.dense, self.pruned,
                                                                                  self.obs_mlps, i, j)
            handles += capture([pruned_mlp_module], mlp_slot, None)
        if writer and after is not None:
            handles += capture([submodule(dense_layer, after)], da_slot, stop_d)
            handles += capture([submodule(pruned_layer, after)], pa_slot, stop_p)
        elif not writer:
            handles += capture(d_mods[:1], d_slot, stop_d)
        outputs = [self._kept_rows(dm, c) for c, dm in zip(consumers, d_mods)]  # what each consumer should give
        sliced = [w if c.cols is None else w[:, c.cols.to(w.device)] for c, w in zip(consumers, outputs)]
        stats = [PairStats.zeros(w.shape[0], (w if obs else ws).shape[1], w.device, gram=self.mode == "ls",
                                 dtype=self.acc) for w, ws in zip(outputs, sliced)]  # fmt: skip
        # bias always takes FLAP's mean on the pruned stream, W[:, removed] mean(x_removed): with the dense stream
        # as reference the kept inputs' mismatch at the attention-sink token (~100x the others) rules the mean
        # (SmolLM2, 20% MLP: 2766 perplexity against 85.9 without compensation)
        ref_stream = self.x_d if self.target == "dense" and self.mode == "ls" else self.x_p
        hidden = self.kept.get("hidden")
        whole = stop_d is None and ref_stream is self.x_d  # the dense layer runs whole on the dense stream
        dense_out = {}
        try:
            for b, (xr, xp) in enumerate(zip(ref_stream, self.x_p)):
                if ref_stream is self.x_p and hidden is not None:  # the dense layer reads the full width
                    xr = widened(xr, hidden, self.dense.config.hidden_size)
                out_d = run_layer(dense_layer, xr, self.kw_d[len(xr)][i])  # on the dense stream, or on the pruned one
                if whole:
                    dense_out[b] = out_d.to(self.store)
                out_p = run_layer(pruned_layer, xp, self.kw_p[len(xp)][j])
                x_p = p_slot[0]
                x_fit = intermediate(dense_mlp_module, dense_mlp.output.module, mlp_slot[0]) if obs else x_p
                for w, w_s, st in zip(outputs, sliced, stats):
                    if writer:
                        after_d = da_slot[0] if after is not None else out_d
                        after_p = pa_slot[0] if after is not None else out_p
                        after_d = after_d if hidden is None else after_d[..., hidden.to(after_d.device)]
                        y = x_p.to(w_s.dtype) @ w_s.t() + (after_d - after_p).to(w_s.dtype)
                        st.add(y, x_fit, self._token_weight(after_d))
                    else:
                        st.add(d_slot[0].to(w.dtype) @ w.t(), x_fit)
        finally:
            for h in handles:
                h.remove()
        if whole:
            self.dense_out = dense_out
        if obs:
            keep = greedy_keep(stats[0], len(consumers[0].cols), self.damp)
            reselect(dense_mlp, pruned_mlp, keep)
            self.mlp_keep[i] = keep.to(self.mlp_keep[i].device)
            self.report["neurons_reselected"] += int((~torch.isin(keep, consumers[0].cols.cpu())).sum())
            stats = [stats[0].restricted(keep)]
            sliced = [outputs[0][:, keep.to(outputs[0].device)]]
        for c, pm, w_s, st in zip(consumers, p_mods, sliced, stats):
            if self.mode == "ls":
                set_weight_out_in(pm, refit(w_s, st, self.damp, f"layer {i} {c.path}"))
            else:
                pm.bias.data += mean_shift(w_s, st).to(pm.bias.dtype)
            self.report["consumers_refit"] += 1

    @staticmethod
    def _kept_rows(dense_module: nn.Module, c: Consumer) -> torch.Tensor:
        """A consumer's dense weight at its kept output rows, [out', in] in the model's dtype (its plain slice
        W_s takes the kept columns of this)."""
        w = weight_out_in(dense_module).detach()
        return w if c.rows is None else w[c.rows.to(w.device)]

    def _token_weight(self, stream: torch.Tensor) -> torch.Tensor | None:
        """With --reconstruct_weighting rms: each token's error on the residual stream relative to the stream's
        mean square there (the RMSNorm that reads the stream divides by its RMS, so an error matters in
        proportion to it; the attention-sink token, whose stream is ~100x the others', would otherwise dominate
        the fit). None: every token counts the same."""
        if not self.rms_weights:
            return None
        return 1.0 / stream.detach().to(self.acc).pow(2).mean(-1).clamp_min(torch.finfo(self.acc).tiny)

    # -- removed layers: one map folded into the layer before --------------------------------------------
    def _layer_map(self, i: int, j: int, run: list[int]) -> None:
        pruned_layer = decoder_layers(self.pruned)[j]
        dense_layers = decoder_layers(self.dense)
        down = submodule(pruned_layer, self.mlp_path)
        d = weight_out_in(down).shape[0]
        stats = MapStats.zeros(d, down.weight.device, self.acc)
        out_slot = [None]
        handle = down.register_forward_hook(lambda m, a, out: out_slot.__setitem__(0, out))
        hidden = self.kept.get("hidden")
        try:
            for b, xp in enumerate(self.x_p):
                h = run_layer(pruned_layer, xp, self.kw_p[len(xp)][j])
                m = out_slot[0]
                if self.target == "own":
                    y = h
                    for r in run:
                        y = run_layer(dense_layers[r], y, self.kw_d[len(y)][r])
                else:
                    y = self._dense_after(b, i, run)  # the dense stream after layer i and the removed run
                    if hidden is not None:
                        y = y[..., hidden.to(y.device)]
                stats.add(m, y.to(h.device) - (h - m), self._token_weight(y))
        finally:
            handle.remove()
        stats.layers = run
        if self.mode == "ls":
            t = layer_map(stats, self.damp, f"layers {run[0]}..{run[-1]} after layer {i}").to(down.weight.device)
            set_weight_out_in(down, t.t() @ weight_out_in(down).detach().double())
            if getattr(down, "bias", None) is not None:
                down.bias.data = (t.t() @ down.bias.detach().double()).to(down.bias.dtype)
        else:
            down.bias.data += (stats.shift_sum / (stats.weight_sum or 1.0)).to(down.bias.dtype)
        self.report["layer_maps"] += 1

    # -- the walk ---------------------------------------------------------------------------------------
    def _advance(self, i: int, j: int, run: list[int]) -> None:
        """Both streams through their layer (the dense one also through the removed run after it)."""
        pruned_layer = decoder_layers(self.pruned)[j]
        for b, xp in enumerate(self.x_p):
            self.x_p[b] = run_layer(pruned_layer, xp, self.kw_p[len(xp)][j]).to(self.store)
        if self.target == "dense":
            for b in range(len(self.x_d)):
                self.x_d[b] = self._dense_after(b, i, run)
        self.dense_out, self.dense_past = {}, {}

    def _dense_after(self, b: int, i: int, run: list[int]) -> torch.Tensor:
        """Batch b of the dense stream after dense layer i and the removed layers `run` after it, computed once."""
        if b not in self.dense_past:
            dense_layers = decoder_layers(self.dense)
            y = self.dense_out.pop(b, None)
            if y is None:
                y = run_layer(dense_layers[i], self.x_d[b], self.kw_d[len(self.x_d[b])][i])
            for r in run:
                y = run_layer(dense_layers[r], y, self.kw_d[len(y)][r])
            self.dense_past[b] = y.to(self.store)
        return self.dense_past[b]

    @torch.no_grad()
    def run(self) -> dict:
        runs = removed_runs(self.n_dense, self.kept_layers)
        if -1 in runs:
            self.report["leading_removed_layers"] = len(runs[-1])
            log.warning("reconstruct: layers %s are removed before any kept layer; no map replaces them", runs[-1])
            if self.target == "dense":  # the dense stream starts after them
                for b, xd in enumerate(self.x_d):
                    for r in runs[-1]:
                        xd = run_layer(decoder_layers(self.dense)[r], xd, self.kw_d[len(xd)][r])
                    self.x_d[b] = xd.to(self.store)
        dense_config = self.dense.config
        bar = tqdm(total=len(self.kept_layers), desc=f"reconstruct ({self.mode})", unit="layer",
                   disable=not self.progress)  # fmt: skip
        try:
            for j, i in enumerate(self.kept_layers):
                for consumers in stages_of(i, self.mlp_keep, self.kept, self.layout, self.mlp_path, dense_config,
                                           self.mode == "bias", self.all_writers):  # fmt: skip
                    self._stage(i, j, consumers)
                run = runs.get(i, [])
                if run:
                    self._layer_map(i, j, run)
                self._advance(i, j, run)
                bar.update(1)
        finally:
            bar.close()
        return self.report


def widened(stream: torch.Tensor, hidden: torch.Tensor, width: int) -> torch.Tensor:
    """A pruned residual stream at the dense width: the kept channels in their places, 0 where the removed ones
    were (what the pruned model holds there), so a dense layer can read it (bias mode's reference)."""
    full = stream.new_zeros(*stream.shape[:-1], width)
    full[..., hidden.to(stream.device)] = stream
    return full


def reconstruct(dense: nn.Module, pruned: nn.Module, mlp_keep, kept: dict, layout: Layout | None, mode: str,
                target: str, damp: float, windows: torch.Tensor, batch_size: int = 1, store: str | None = None,
                progress: bool = True, writers: str = "pruned", weighting: str = "rms",
                select: str = "scores") -> dict:  # fmt: skip
    """Refit `pruned` (a sliced copy of `dense` with kept sets `mlp_keep`/`kept`, dense numbering) in place; the
    report: seconds, peak memory, how many consumers and layer maps were refit. With `select` obs, each entry of
    the list `mlp_keep` is replaced by the neurons the refit chose (the ones the saved model holds)."""
    device = dense.get_input_embeddings().weight.device
    start = time.perf_counter()
    was = (dense.training, pruned.training)
    dense.eval()
    pruned.eval()
    try:
        with PeakMemory(device) as peak:
            report = Reconstructor(dense, pruned, mlp_keep, kept, layout, mode, target, damp, windows, batch_size,
                                   store, progress, writers, weighting, select).run()  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        dense.train(was[0])
        pruned.train(was[1])
    return {**report, "mode": mode, "target": target, "writers": writers, "weighting": weighting, "select": select,
            "damp": damp, "windows": list(windows.shape), "seconds": time.perf_counter() - start,
            "peak_memory_bytes": peak.bytes}
