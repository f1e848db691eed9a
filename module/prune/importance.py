"""The importance pass: one forward/backward per batch of calibration windows.

What makes it cheaper than the released loop (same scores):
- no weight gradients: every parameter is frozen and the graph starts at the first layer's
  down_proj input, so backward computes input gradients alone and stops there (about 4N FLOPs per
  token for the pass, where the release spends 4N + 2N_mlp plus the layers below the first MLP);
- the loss over the vocabulary runs in token chunks with its analytic gradient (module/entropy.py),
  so the fp32 [tokens x vocab] logits are never alive at once;
- windows are batched; the loss is the sum over windows of each window's token mean, which keeps
  the scores equal to a batch-1 loop;
- scores are summed in fp64, not in the model dtype.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from module.entropy import LogitHead, default_chunk_tokens, loss_backward
from module.model.mlp import ModelMLPs, decoder_layers
from utils.errors import UserError

GRADIENT_CRITERIA = ("entropy", "ce", "entropy_wanda")  # entropy_wanda: the entropy loss, times wanda_sp
ACTIVATION_CRITERIA = ("wanda_sp", "entropy_wanda", "block_influence", "activation")


@dataclass
class NeuronStatistics:
    """Per-layer, per-neuron sums collected over the calibration windows (fp64)."""

    taylor: list[torch.Tensor] = field(default_factory=list)  # sum_tokens |a_j * dL/da_j|
    act_sq: list[torch.Tensor] = field(default_factory=list)  # sum_tokens a_j^2
    tokens: int = 0
    windows: int = 0
    loss_sum: float = 0.0
    seconds: float = 0.0


class _Collector:
    """Forward pre-hooks on each output projection; activations wait in a per-layer slot.

    The gradient hook closes over the layer index, never over the tensor it is registered on:
    a closure over that tensor makes a reference cycle that keeps every layer's activation alive
    until the garbage collector runs.
    """

    def __init__(self, mlps: ModelMLPs, stats: NeuronStatistics, taylor: bool, act_sq: bool):
        self.stats, self.taylor, self.act_sq = stats, taylor, act_sq
        self.slots: dict[int, torch.Tensor] = {}
        self.handles = [
            layer.output.module.register_forward_pre_hook(self._make_hook(i)) for i, layer in enumerate(mlps.layers)
        ]

    def _make_hook(self, index: int):
        def hook(module, args):
            a = args[0]
            if self.act_sq:
                acc = self.stats.act_sq[index]
                acc += a.detach().float().pow(2).sum(dim=(0, 1)).to(acc.device)
            if not self.taylor or not torch.is_grad_enabled():
                return None
            start_graph = not a.requires_grad
            if start_graph:  # the first MLP: nothing below it needs a gradient, so the graph starts here
                a = a.detach().requires_grad_(True)
            self.slots[index] = a.detach()
            a.register_hook(lambda g: self._grad_hook(index, g))
            return (a, *args[1:]) if start_graph else None

        return hook

    def _grad_hook(self, index: int, grad: torch.Tensor) -> None:
        a = self.slots.pop(index)
        acc = self.stats.taylor[index]  # on the first device; layers may sit on others (--device_map)
        acc += (a * grad).abs_().sum(dim=(0, 1), dtype=torch.float32).to(acc.device)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.slots.clear()


def collect_statistics(
    model: nn.Module,
    mlps: ModelMLPs,
    windows: torch.Tensor,
    criterion: str,
    batch_size: int = 1,
    chunk_tokens: int | None = None,
    progress: bool = True,
    activation_checkpointing: bool = False,
    taps: tuple = (),
) -> NeuronStatistics:
    """Run the calibration windows [N, T] through the model and sum the statistics `criterion` needs.

    `taps` gather more statistics in the same passes (heads, layers, hidden channels: `StructureTaps`);
    each gets `end_batch(tokens)` after a batch's backward and `close()` at the end.

    With `activation_checkpointing`, each decoder layer keeps only its input in the forward pass and is
    recomputed in backward (transformers' own checkpointing): far less memory for one more forward.
    Only the layers' own `training` flag, which checkpointing reads, is set; every submodule stays in
    eval mode, so dropout stays off and the scores do not change.
    """
    need_taylor = criterion in GRADIENT_CRITERIA
    need_act = criterion in ACTIVATION_CRITERIA
    device = next(model.parameters()).device
    n_neurons = mlps.neurons
    stats = NeuronStatistics(
        taylor=[torch.zeros(n_neurons, dtype=torch.float64, device=device) for _ in mlps.layers] if need_taylor else [],
        act_sq=[torch.zeros(n_neurons, dtype=torch.float64, device=device) for _ in mlps.layers] if need_act else [],
    )
    if not (need_taylor or need_act or taps):  # a data-free criterion's pass runs for other structures' taps only
        return stats
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    was_training = model.training
    model.eval()
    head = LogitHead.from_model(model)
    chunk = chunk_tokens or default_chunk_tokens(head.weight.shape[0], device)
    input_device = model.get_input_embeddings().weight.device
    checkpointed = activation_checkpointing and need_taylor
    if checkpointed:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"{type(model).__name__} does not support activation checkpointing")
        # transformers >= 5.20 calls it activation checkpointing; older 5.x only knows the old name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in decoder_layers(model):
            layer.training = True
    collector = _Collector(mlps, stats, taylor=need_taylor, act_sq=need_act)
    n, t = windows.shape
    bar = tqdm(total=n * t, unit="tok", unit_scale=True, desc=f"importance ({criterion})", disable=not progress)
    start = time.perf_counter()
    try:
        for s in range(0, n, batch_size):
            ids = windows[s : s + batch_size].to(input_device)
            if need_taylor:
                stats.loss_sum += loss_backward(model, head, ids, criterion, chunk)
            else:
                with torch.no_grad():
                    model.base_model(input_ids=ids, use_cache=False)
            for tap in taps:
                tap.end_batch(ids.numel())
            stats.windows += ids.shape[0]
            stats.tokens += ids.numel()
            bar.update(ids.numel())
            if need_taylor:
                bar.set_postfix(loss=f"{stats.loss_sum / stats.windows:.4f}")
    finally:
        bar.close()
        collector.close()
        for tap in taps:
            tap.close()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        if checkpointed:
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    if need_taylor and not all(math.isfinite(float(x.sum())) for x in stats.taylor):
        raise FloatingPointError("importance scores are not finite (overflow in the model dtype?)")
    return stats


def all_reduce_statistics(stats: NeuronStatistics) -> NeuronStatistics:
    """Sum every rank's statistics (windows were split across ranks), in place, in fp64."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    for t in (*stats.taylor, *stats.act_sq):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    device = stats.taylor[0].device if stats.taylor else stats.act_sq[0].device
    counts = torch.tensor([stats.tokens, stats.windows, stats.loss_sum], dtype=torch.float64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    seconds = torch.tensor([stats.seconds], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # wall time of the slowest rank
    stats.tokens, stats.windows, stats.loss_sum = int(counts[0]), int(counts[1]), float(counts[2])
    stats.seconds = float(seconds[0])
    return stats
