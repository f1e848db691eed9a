"""Distillation from the dense model: loss = alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE.

Both terms are summed over the label tokens (the positions whose next token has a label) and divided by the
Trainer's count of label tokens over the whole effective batch, as its plain CE is. The teacher is frozen,
kept outside the trained model (never in the optimizer, the DDP/FSDP/DeepSpeed wrapper or a checkpoint),
sees the same input_ids and position_ids (packed rows stay apart), and its logits come from its final hidden
states in token chunks through the importance pass's `LogitHead`. Per chunk the fp32 work (both
log-softmaxes) runs under activation checkpointing, so no fp32 [tokens x vocab] tensor of either model
outlives its chunk: the student's logits in the model dtype are the only full-vocabulary tensor kept, as in
plain fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from module.importance import LogitHead, default_chunk_tokens
from utils.errors import UserError

IGNORE = -100


class DistillError(UserError):
    """A teacher that cannot teach this student."""


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B * T] next-token targets (position t predicts label t+1; the last has none)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets.reshape(-1)


def _chunk_terms(student: torch.Tensor, teacher_log_probs: torch.Tensor, targets: torch.Tensor, temperature: float):
    """(KL sum, CE sum) of one chunk in fp32: T^2 * sum KL(softmax(z_t/T) || softmax(z_s/T)), sum CE(z_s, y)."""
    z = student.float()
    ce = F.cross_entropy(z, targets, reduction="sum")
    log_q = torch.log_softmax(z / temperature, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - log_q)).sum() * temperature**2
    return kl, ce


def distill_sums(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    head: LogitHead,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL sum, CE sum) over the tokens with a target: student logits [N, V] (with grad), the teacher's final
    hidden states [N, H] (no grad, on the teacher's device), targets [N] (-100: no loss)."""
    keep = (targets != IGNORE).nonzero().squeeze(1)
    kl = ce = student_logits.new_zeros((), dtype=torch.float32)
    for s in range(0, len(keep), chunk_tokens):
        rows = keep[s : s + chunk_tokens]
        with torch.no_grad():
            z_t = head.logits(teacher_hidden[rows.to(teacher_hidden.device)])[0].to(student_logits.device)
            teacher_log_probs = torch.log_softmax(z_t / temperature, dim=-1)
            del z_t
        # recomputed in backward: only this chunk's fp32 tensors are ever alive
        k, c = checkpoint(_chunk_terms, student_logits[rows], teacher_log_probs, targets[rows], temperature,
                          use_reentrant=False)  # fmt: skip
        kl, ce = kl + k, ce + c
    return kl, ce


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
        kl, ce = distill_sums(student_logits.reshape(-1, v), hidden.reshape(-1, hidden.shape[-1]), self.head, targets,
                              self.temperature, self.chunk)  # fmt: skip
        count = int((targets != IGNORE).sum())
        self.sums["kl"] += float(kl.detach())
        self.sums["ce"] += float(ce.detach())
        self.sums["tokens"] += count
        n = num_items if num_items is not None else max(count, 1)
        return (self.alpha * kl + (1 - self.alpha) * ce) / n

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
