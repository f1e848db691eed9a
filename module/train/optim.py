"""AdamW whose moment and compensation buffers may live in any dtype, with optional Kahan summation.

With fp32 states and no Kahan summation it is torch.optim.AdamW (decoupled weight decay, bias
correction). bf16 moments halve the optimizer state. Kahan summation keeps the low bits that a bf16
weight loses when a small update is added to it, so pure-bf16 weights track fp32 training.
Two implementations of the same update: `fused=False` runs a few `torch._foreach_*` kernels per (device, dtype)
group, over slices of at most `foreach_numel` elements so the temporaries stay bounded (the CPU default);
`fused=True` runs `adamw_tensor_step` once per tensor, compiled by torch.compile into one kernel that reads the
weight, gradient and buffers once and writes them once (the torchao pattern; the CUDA default). The hyperparameters
enter the compiled step as 0-d tensors, so a learning-rate schedule does not recompile it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.optim import Optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(value) -> torch.dtype:
    return DTYPES[value] if isinstance(value, str) else value


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by an optimizer's state tensors (any torch optimizer)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def adamw_tensor_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, comp: torch.Tensor | None,
                      lr: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor, eps: torch.Tensor,
                      wd: torch.Tensor, step: torch.Tensor) -> None:  # fmt: skip
    """One AdamW update of one tensor in place, all arithmetic in fp32, each buffer kept in its own dtype; with
    `comp` (Kahan) the part of the update the weight's rounding drops is carried to the next step."""
    g32 = g.float()
    m32 = torch.lerp(m.float(), g32, 1 - beta1)
    v32 = v.float() * beta2 + (1 - beta2) * g32 * g32
    bias2_sqrt = torch.sqrt(1 - beta2**step)
    update = m32 / (torch.sqrt(v32) + eps * bias2_sqrt) * (-lr * bias2_sqrt / (1 - beta1**step))
    p32 = p.float() * (1 - lr * wd)  # decoupled weight decay, as torch AdamW
    if comp is not None:
        update = update + comp.float()
        new = (p32 + update).to(p.dtype)
        comp.copy_(update - (new.float() - p32))
    else:
        new = (p32 + update).to(p.dtype)
    p.copy_(new)
    m.copy_(m32)
    v.copy_(v32)


_compiled_step = None


def compiled_step():
    """adamw_tensor_step compiled once per process (shapes recompile as torch.compile decides)."""
    global _compiled_step
    if _compiled_step is None:
        # inductor otherwise drops the bf16 round trip `(p32 + update).to(bf16).float()`, and with it Kahan's carry
        _compiled_step = torch.compile(adamw_tensor_step, fullgraph=True, options={"emulate_precision_casts": True})
    return _compiled_step


class AnyPrecisionAdamW(Optimizer):
    def __init__(
        self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0.0, use_kahan_summation: bool = False, momentum_dtype=torch.float32,
        variance_dtype=torch.float32, compensation_buffer_dtype=torch.bfloat16, foreach_numel: int = 1 << 27,
        fused: bool | None = None, compile: bool = True,
    ):  # fmt: skip
        """`fused`: the per-tensor step (None: on CUDA parameters); `compile`: compile it (False: run it eagerly,
        e.g. to test it)."""
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AnyPrecisionAdamW settings lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        use_kahan_summation=use_kahan_summation, momentum_dtype=_dtype(momentum_dtype),
                        variance_dtype=_dtype(variance_dtype),
                        compensation_buffer_dtype=_dtype(compensation_buffer_dtype))  # fmt: skip
        super().__init__(params, defaults)
        self.foreach_numel, self.fused, self.compile = foreach_numel, fused, compile

    def _state_of(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=group["momentum_dtype"])
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["variance_dtype"])
            if group["use_kahan_summation"]:
                state["compensation"] = torch.zeros_like(p, dtype=group["compensation_buffer_dtype"])
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keep each buffer in its configured dtype (torch casts them to the weight's)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            wanted = {"exp_avg": group["momentum_dtype"], "exp_avg_sq": group["variance_dtype"],
                      "compensation": group["compensation_buffer_dtype"]}  # fmt: skip
            for p in group["params"]:
                for key, dtype in wanted.items():
                    if key in self.state.get(p, {}):
                        self.state[p][key] = self.state[p][key].to(dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AnyPrecisionAdamW does not support sparse gradients")
                state = self._state_of(p, group)
                state["step"] += 1
                buckets[(p.device, p.dtype, state["step"])].append(p)
            for (device, _, step), params in buckets.items():
                fused = self.fused if self.fused is not None else device.type == "cuda"
                if fused:
                    self._fused_update(params, group, step, device)
                    continue
                for chunk in self._slices(params):
                    self._update(chunk, group, step)
        return loss

    def _fused_update(self, params: list[torch.Tensor], group: dict, step: int, device: torch.device) -> None:
        fn = compiled_step() if self.compile else adamw_tensor_step
        beta1, beta2 = group["betas"]
        scalars = torch.tensor([group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step],
                               dtype=torch.float32, device=device).unbind()  # one transfer per step and group
        for p in params:
            s = self.state[p]
            fn(p, p.grad, s["exp_avg"], s["exp_avg_sq"], s.get("compensation"), *scalars)

    def _slices(self, params: list[torch.Tensor]):
        chunk, size = [], 0
        for p in params:
            if chunk and size + p.numel() > self.foreach_numel:
                yield chunk
                chunk, size = [], 0
            chunk.append(p)
            size += p.numel()
        if chunk:
            yield chunk

    def _update(self, params: list[torch.Tensor], group: dict, step: int) -> None:
        # The arithmetic runs in fp32 on upcast copies of low-precision buffers (bounded by
        # foreach_numel); the buffers themselves stay in their configured dtypes.
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        kahan = group["use_kahan_summation"]
        f32 = torch.float32
        states = [self.state[p] for p in params]
        grads = [p.grad if p.grad.dtype == f32 else p.grad.float() for p in params]
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        m32 = m if m[0].dtype == f32 else [x.float() for x in m]
        v32 = v if v[0].dtype == f32 else [x.float() for x in v]
        torch._foreach_lerp_(m32, grads, 1 - beta1)
        torch._foreach_mul_(v32, beta2)
        torch._foreach_addcmul_(v32, grads, grads, 1 - beta2)
        if m32 is not m:
            torch._foreach_copy_(m, m32)
        if v32 is not v:
            torch._foreach_copy_(v, v32)
        bias1, bias2 = 1 - beta1**step, 1 - beta2**step
        # m / (sqrt(v / b2) + eps) = sqrt(b2) * m / (sqrt(v) + eps * sqrt(b2)): one pass fewer
        denom = torch._foreach_sqrt(v32)
        torch._foreach_add_(denom, eps * math.sqrt(bias2))
        step_size = -lr * math.sqrt(bias2) / bias1
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay, as torch AdamW
        if params[0].dtype == f32 and not kahan:
            torch._foreach_addcdiv_(params, m32, denom, value=step_size)
            return
        updates = torch._foreach_div(m32, denom)
        torch._foreach_mul_(updates, step_size)
        if not kahan:
            torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(updates, params)])
            return
        # Kahan: add (update + carried error) to the weight, keep what the weight's rounding dropped
        comp = [s["compensation"] for s in states]
        torch._foreach_add_(updates, [c.float() for c in comp])
        before = [p.float() for p in params]
        torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(updates, params)])
        torch._foreach_sub_(updates, torch._foreach_sub([p.float() for p in params], before))
        torch._foreach_copy_(comp, updates)
