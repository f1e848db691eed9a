"""Training throughput: packed vs padded batches, AnyPrecisionAdamW vs torch AdamW, distillation vs plain CE.

    python bench/speed/train_throughput.py                       # CPU: small Llama-shaped model, SmolLM2 tokenizer
    python bench/speed/train_throughput.py --shape llama3.2-1b    # GPU: tokens/s and MFU of a full fine-tune step

Part 1 trains the same examples (the LaMini sample's real lengths, Alpaca prompt, 1024-token cap)
as padded batches (pad to the longest, attention mask) and as packed rows (position_ids, no mask)
and prints non-pad tokens/s of forward + backward + optimizer step. Part 2 times optimizer steps
and counts optimizer-state bytes for the same parameters. Part 3 trains a student (the model with 60% of
its MLP neurons) on the packed rows with plain CE and with distillation from the full model (module/train/distill.py,
alpha 0.5) and prints tokens/s and peak memory of each (CUDA: the allocator's peak; CPU: each variant runs in
its own process, whose peak RSS is compared).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import model_or_default
from dataset.LaMini_dataset import tokenized_dataset
from dataset.packing.packed_dataset import Collator, pack_examples
from module.speed import sync
from module.train.distill import Distiller
from module.train.optim import AnyPrecisionAdamW, state_bytes
from utils.report import peak_flops

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
}  # fmt: skip


def train_tokens_per_second(model, batches, device, real_tokens: int, opt) -> float:
    model.train()
    for batch in batches[:1]:  # warm-up
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        opt.zero_grad(set_to_none=True)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return real_tokens / (time.perf_counter() - start)


def step_profile(model, batch: dict, device, opt, rows: int = 10) -> str:
    """torch.profiler's top `rows` ops of one training step (forward, backward, optimizer), by device time on CUDA
    (CPU time elsewhere), after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    def step() -> None:
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    step()
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows)


def padded_vs_packed(model, rows: list[dict], pad_id: int, device, padded_batch: int, packed_batch: int,
                     max_len: int) -> dict:  # fmt: skip
    """Non-pad tokens/s of forward + backward + AnyPrecisionAdamW step on the same examples, padded vs packed."""
    real = sum(len(r["input_ids"]) for r in rows)
    padded = [Collator(pad_id, packed=False)(rows[i : i + padded_batch]) for i in range(0, len(rows), padded_batch)]
    packed_rows, fill = pack_examples(rows, max_len, "bfd")
    packed = [Collator(pad_id)(packed_rows[i : i + packed_batch]) for i in range(0, len(packed_rows), packed_batch)]
    opt = AnyPrecisionAdamW(model.parameters(), lr=1e-5, momentum_dtype="bfloat16", variance_dtype="bfloat16")
    padded_tokens = sum(b["input_ids"].numel() for b in padded)
    out = {"examples": len(rows), "real_tokens": real, "padded_fill": real / padded_tokens, "packed_fill": fill}
    for name, batches in (("padded", padded), ("packed", packed)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out[f"{name}_tokens_per_s"] = train_tokens_per_second(model, batches, device, real, opt)
        if device.type == "cuda":
            out[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    out["packed_over_padded"] = out["packed_tokens_per_s"] / out["padded_tokens_per_s"]
    del opt
    return out


class TrainStep:
    """One forward + backward + AnyPrecisionAdamW step of `student`, plain CE (`teacher` None) or distilled from
    `teacher` (alpha 0.5). `lap(phase)` is called after each phase (timing with the device synchronised)."""

    def __init__(self, student, teacher, device) -> None:
        self.student, self.device = student, device
        self.distiller = Distiller(teacher, alpha=0.5, temperature=1.0) if teacher is not None else None
        self.opt = AnyPrecisionAdamW(student.parameters(), lr=1e-5, momentum_dtype="bfloat16",
                                     variance_dtype="bfloat16")  # fmt: skip
        student.train()

    def __call__(self, batch: dict, lap=lambda phase: None) -> None:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.distiller is None:
            loss = self.student(**batch).loss
            lap("student forward + CE")
        else:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = self.student(**inputs).logits
            lap("student forward")
            loss = self.distiller.loss(logits, inputs, batch["labels"], None)
            lap("teacher forward + loss")
            del logits
        loss.backward()
        lap("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lap("optimizer step")

    def warm_up(self, batches: list[dict]) -> None:
        """One step per batch shape: kernels are chosen per shape (on an H200 a single warm-up step left the
        first timed pass 1.5-4x slower than the next, 2026-11-30)."""
        for batch in {tuple(b["input_ids"].shape): b for b in batches}.values():
            self(batch)
        sync(self.device)


def distill_step_speed(student, teacher, batches, device, steps: int | None = None) -> dict:
    """Tokens/s of TrainStep, plain CE (`teacher` None) or distilled, on packed `batches`; CUDA peak bytes too."""
    step = TrainStep(student, teacher, device)
    batches = batches[: steps or None]
    step.warm_up(batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    sync(device)
    tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    out = {"tokens_per_s": tokens / (time.perf_counter() - start)}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def step_phases(student, teacher, batches, device) -> dict[str, float]:
    """Milliseconds per step of each phase of TrainStep, the device synchronised between phases: where the time
    goes. With a teacher, its forward is also timed on its own, so the loss is what is left of "teacher forward +
    loss"."""
    step = TrainStep(student, teacher, device)
    step.warm_up(batches)
    total: dict[str, float] = {}
    last = 0.0  # the end of the previous phase

    def lap(phase: str) -> None:
        nonlocal last
        sync(device)
        now = time.perf_counter()
        total[phase] = total.get(phase, 0.0) + now - last
        last = now

    for batch in batches:
        last = time.perf_counter()
        step(batch, lap)
        if step.distiller is not None:
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "position_ids")}
            with torch.no_grad():
                step.distiller.teacher.base_model(**inputs)
            lap("teacher forward alone")
    ms = {k: 1e3 * v / len(batches) for k, v in total.items()}
    if step.distiller is not None:
        ms["loss alone"] = ms["teacher forward + loss"] - ms["teacher forward alone"]
    return ms


def student_teacher(shape: dict, vocab: int, device, dtype, keep: float = 0.6):
    """A random full-size teacher and a student with `keep` of its MLP neurons (a pruned model's shape)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = dict(vocab_size=vocab, max_position_embeddings=4096, use_cache=False, **shape)
    models = []
    for seed, size in ((0, shape["intermediate_size"]), (1, int(keep * shape["intermediate_size"]))):
        torch.manual_seed(seed)
        cfg = LlamaConfig(**{**base, "intermediate_size": size})
        models.append(AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(device))
    teacher, student = models
    return student, teacher.eval()


def optimizer_steps(params: list[torch.Tensor], device, makers: dict, steps: int = 5) -> dict:
    """Seconds per step and state bytes of each optimizer in `makers` (label -> factory) on `params`."""
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for label, make in makers.items():
        o = make(params)
        o.step()  # creates the states
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            o.step()
        sync(device)
        out[label] = {"s_per_step": (time.perf_counter() - start) / steps, "state_bytes": state_bytes(o)}
        del o
    for p in params:
        p.grad = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/instruct/lamini/lamini_10001_part1.jsonl"),
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2, materialised)")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--max_len", type=int, default=1024)
    parser.add_argument("--padded_batch", type=int, default=8, help="examples per padded batch")
    parser.add_argument("--packed_batch", type=int, default=2, help="1024-token rows per packed batch")
    parser.add_argument("--distill_variant", choices=("plain", "distill"), help=argparse.SUPPRESS)  # part 3's child
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.tokenizer = model_or_default(args.tokenizer)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = tokenized_dataset(args.data, tok, args.max_len, max_samples=args.examples)
    if args.distill_variant:  # a child process of part 3
        print(json.dumps(distill_part(args, tok, rows, device, dtype, args.distill_variant)))
        return
    lengths = [len(r["input_ids"]) for r in rows]
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, use_cache=False, **SHAPES[args.shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.shape} Llama ({n_params / 1e6:.1f}M params) on {name}, {dtype}; {len(rows)} LaMini examples, "
          f"mean {sum(lengths) / len(rows):.0f} / max {max(lengths)} tokens, torch {torch.__version__}")  # fmt: skip

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    r = padded_vs_packed(model, rows, pad, device, args.padded_batch, args.packed_batch, args.max_len)
    print(f"padded (batch {args.padded_batch}, fill {r['padded_fill']:.3f}): {r['padded_tokens_per_s']:.0f} "
          "non-pad tokens/s")  # fmt: skip
    print(f"packed (batch {args.packed_batch} x {args.max_len}, fill {r['packed_fill']:.3f}): "
          f"{r['packed_tokens_per_s']:.0f} non-pad tokens/s")  # fmt: skip
    print(f"packed / padded: {r['packed_over_padded']:.2f}x")
    if peak_flops(device):
        mfu = r["packed_tokens_per_s"] * 6 * n_params / peak_flops(device)
        print(f"MFU (6N FLOPs/token vs {peak_flops(device) / 1e12:.0f} TFLOP/s bf16): {mfu:.3f}")

    # Part 2: optimizer step time and state memory on the same parameters
    results = optimizer_steps(list(model.parameters()), device, {
        "torch AdamW (fp32 states, defaults)": lambda ps: torch.optim.AdamW(ps, lr=1e-5),
        "torch AdamW (fp32 states, foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-5, foreach=True),
        "AnyPrecisionAdamW (bf16 states)": lambda ps: AnyPrecisionAdamW(ps, lr=1e-5, momentum_dtype="bfloat16",
                                                                        variance_dtype="bfloat16"),
        "AnyPrecisionAdamW (bf16 states, per-tensor fused)": lambda ps: AnyPrecisionAdamW(
            ps, lr=1e-5, momentum_dtype="bfloat16", variance_dtype="bfloat16", fused=True),
    })  # fmt: skip
    for label, v in results.items():
        print(f"{label}: {v['s_per_step'] * 1e3:.1f} ms/step, state {v['state_bytes'] / 2**20:.1f} MiB")
    (t_ref, m_ref), (t_foreach, _), (t_ours, m_ours) = [(v["s_per_step"], v["state_bytes"]) for v in results.values()]
    print(f"AnyPrecisionAdamW / AdamW: step time {t_ours / t_ref:.2f}x (vs foreach {t_ours / t_foreach:.2f}x), "
          f"state memory {m_ours / m_ref:.2f}x")  # fmt: skip

    # Part 3: distillation vs plain CE (one process per variant on CPU, so each peak RSS is its own)
    del model
    variants = {}
    for variant in ("plain", "distill"):
        if device.type == "cuda":
            variants[variant] = distill_part(args, tok, rows, device, dtype, variant)
        else:
            cmd = [sys.executable, __file__, "--shape", args.shape, "--examples", str(args.examples), "--max_len",
                   str(args.max_len), "--packed_batch", str(args.packed_batch), "--data", args.data, "--tokenizer",
                   args.tokenizer, "--distill_variant", variant]  # fmt: skip
            variants[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    for variant, v in variants.items():
        print(f"{variant}: {v['tokens_per_s']:.0f} label tokens/s, peak {v['peak_bytes'] / 2**30:.2f} GiB")
    plain, distill = variants["plain"], variants["distill"]
    print(f"distill / plain: tokens/s {distill['tokens_per_s'] / plain['tokens_per_s']:.2f}x, peak memory "
          f"{distill['peak_bytes'] / plain['peak_bytes']:.2f}x")  # fmt: skip


def distill_part(args, tok, rows, device, dtype, variant: str) -> dict:
    """One variant of part 3; the peak is the CUDA allocator's, or this process's peak RSS on CPU."""
    student, teacher = student_teacher(SHAPES[args.shape], len(tok), device, dtype)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    packed, _ = pack_examples(rows, args.max_len, "bfd")
    batches = [Collator(pad)(packed[i : i + args.packed_batch]) for i in range(0, len(packed), args.packed_batch)]
    r = distill_step_speed(student, teacher if variant == "distill" else None, batches, device)
    if device.type != "cuda":
        r["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return r


if __name__ == "__main__":
    main()
