"""Distillation from the dense model: loss = alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE.

Both terms are summed over the label tokens (the positions whose next token has a label) and divided by the
Trainer's count of label tokens over the whole effective batch, as its plain CE is. The teacher is frozen,
kept outside the trained model (never in the optimizer, the DDP/FSDP/DeepSpeed wrapper or a checkpoint),
sees the same input_ids and position_ids (packed rows stay apart), and its logits come from its final hidden
states in token chunks through the importance pass's `LogitHead`. Loss and gradient w.r.t. the student's
logits are computed together chunk by chunk, analytically (as the importance pass does its loss), so no fp32
[tokens x vocab] tensor of either model outlives its chunk: the student's logits and their gradient, in the
model dtype, are the only full-vocabulary tensors, as in plain fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from module.entropy import LogitHead, default_chunk_tokens
from utils.errors import UserError

IGNORE = -100


class DistillError(UserError):
    """A teacher that cannot teach this student."""


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B * T] next-token targets (position t predicts label t+1; the last has none)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets.reshape(-1)


class _ChunkedDistillLoss(torch.autograd.Function):
    """alpha * KL + (1 - alpha) * CE over the selected rows of the student logits, chunk by chunk, with the
    gradient w.r.t. the logits written as it goes (d/dz of T^2 KL(p_t || softmax(z/T)) = T (softmax(z/T) - p_t);
    of CE = softmax(z) - onehot(y)): backward only scales it. Also returns the two sums (no gradient)."""

    @staticmethod
    def forward(ctx, student_logits, rows, teacher_hidden, targets, head, alpha, temperature, chunk_tokens):
        grad = torch.zeros_like(student_logits)
        kl = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        ce = torch.zeros_like(kl)
        t = temperature
        for s in range(0, len(rows), chunk_tokens):
            r = rows[s : s + chunk_tokens]
            z = student_logits[r].float()
            z_t = head.logits(teacher_hidden[r.to(teacher_hidden.device)])[0].to(z.device)
            log_p_t = torch.log_softmax(z_t / t, dim=-1)
            del z_t
            log_q = torch.log_softmax(z / t, dim=-1)
            p_t = log_p_t.exp()
            kl += ((p_t * (log_p_t - log_q)).sum() * t * t).double()
            g = log_q.exp_().sub_(p_t).mul_(alpha * t)  # alpha * T * (softmax(z/T) - p_t)
            del log_p_t, p_t, log_q
            log_s = torch.log_softmax(z, dim=-1)
            y = targets[r].unsqueeze(1)
            ce += -log_s.gather(1, y).sum().double()
            g += log_s.exp_().scatter_add_(1, y, -torch.ones_like(y, dtype=log_s.dtype)).mul_(1 - alpha)
            grad[r] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        loss = (alpha * kl + (1 - alpha) * ce).float()
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl.float(), ce.float()

    @staticmethod
    def backward(ctx, grad_loss, _kl, _ce):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: LogitHead,
    targets: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha * KL + (1 - alpha) * CE, KL sum, CE sum) over the tokens with a target: student logits [N, V]
    (with grad), the teacher's final hidden states [N, H] (no grad, on the teacher's device), targets [N]
    (-100: no loss). Only one chunk's fp32 [chunk, vocab] tensors exist at a time; the gradient w.r.t. the
    logits (one tensor in their dtype, as plain CE's backward makes) is computed in the same pass."""
    rows = (targets != IGNORE).nonzero().squeeze(1)
    return _ChunkedDistillLoss.apply(student_logits, rows, teacher_hidden, targets, head, alpha, temperature,
                                     chunk_tokens)  # fmt: skip


class Distiller:
    """The frozen teacher and the mix of the two terms; `loss` replaces the Trainer's CE."""

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float, chunk_tokens: int | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self.head = LogitHead.from_model(teacher)
        self.chunk = chunk_tokens or default_chunk_tokens(self.head.weight.shape[0], self.head.weight.device)
        self.device = self.head.weight.device
        self.sums = {"kl": 0.0, "ce": 0.0, "tokens": 0}  # for logging: since the last log line

    def loss(self, student_logits: torch.Tensor, inputs: dict, labels: torch.Tensor, num_items) -> torch.Tensor:
        """alpha * KL + (1 - alpha) * CE, both summed over label tokens and divided by `num_items` (the label
        tokens of the whole effective batch; this batch's own count when the Trainer gives none)."""
        targets = shifted_targets(labels).to(student_logits.device)
        with torch.no_grad():
            teacher_inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "position_ids")}
            hidden = self.teacher.base_model(**teacher_inputs, use_cache=False).last_hidden_state
        v = student_logits.shape[-1]
        loss, kl, ce = distill_loss(student_logits.reshape(-1, v), hidden.reshape(-1, hidden.shape[-1]), self.head,
                                    targets, self.alpha, self.temperature, self.chunk)  # fmt: skip
        count = int((targets != IGNORE).sum())
        self.sums["kl"] += float(kl.detach())
        self.sums["ce"] += float(ce.detach())
        self.sums["tokens"] += count
        n = num_items if num_items is not None else max(count, 1)
        return loss / n

    def log_terms(self) -> dict[str, float]:
        """Mean KL and CE per label token since the last call."""
        tokens = self.sums["tokens"]
        out = {"distill_kl": round(self.sums["kl"] / tokens, 5), "distill_ce": round(self.sums["ce"] / tokens, 5)}
        self.sums = {"kl": 0.0, "ce": 0.0, "tokens": 0}
        return out if tokens else {}


def check_teacher(student_config, teacher_config, student_tokenizer, teacher_tokenizer, teacher: str) -> None:
    """The teacher must predict over the student's vocabulary with the same tokenizer."""
    sv, tv = student_config.vocab_size, teacher_config.vocab_size
    if sv != tv:
        raise DistillError(f"--distill_from {teacher} has a vocabulary of {tv} tokens, the student {sv}")
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise DistillError(f"--distill_from {teacher} uses another tokenizer than the student (the token ids differ)")
