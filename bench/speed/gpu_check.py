"""The GPU check: every answer about our CUDA path from one short command, written to gpu_check.json/.md.

    bash script/gpu_check.sh --out out/gpu_check              # one H200: about 250 s (2026-11-30)
    bash script/gpu_check.sh --tiny --out out/gpu_check_tiny  # every section with tiny shapes on CPU (CI)
    bash script/gpu_check.sh --sections packing,training      # a subset

Sections (each one function registered with @section; adding a measurement is adding one):
  importance  the release's importance algorithm vs ours on random Llama-2-7B-shape weights in bf16
              (seconds and peak memory per window at batch 1 and our best batch, kept-set overlap with an
              fp32-sum reference), and Llama-3-8B's 128k vocabulary at batch 4 without running out of memory
  packing     for each attention implementation: packed loss = per-example loss, and no example's logits
              move when another packed example changes (and, as a control, they do move without position_ids)
  training    full fine-tuning of the Llama-3.2-1B shape on LaMini lengths, packed vs padded, flex_attention
              and sdpa (non-pad tokens/s, MFU, peak memory); AnyPrecisionAdamW (bf16 states) vs fused AdamW;
              distillation from the full model vs plain CE (tokens/s, peak memory)
  pipeline    prune 20% (the mix search, --prune_parts auto) -> LoRA -> merge -> offline lm_eval task with
              --limit -> WikiText-2 perplexity
  inference   prefill and greedy-decoding speed (batch 1 and 8, KV cache) of a 20%-pruned copy vs the dense
              model, SmolLM2-135M's shape
  sparse      torch's 2:4 semi-structured sparse matmul vs the dense one (Llama-2-7B up_proj, fp16; CUDA only)

A section *checks* what must hold (a failed check makes the exit status 1 and names the section) and
measures *targets* (reported met or missed). Every figure is measured in the same run as what it is
compared with.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import DATA_DIR
from bench.speed import train_throughput as throughput
from bench.speed.importance_speed import SHAPES as IMPORTANCE_SHAPES
from bench.speed.importance_speed import compare, timed
from bench.speed.inference_speed import mlp_pruned_copy
from dataset.calibration import builtin_documents
from dataset.packing.packed_dataset import Collator, pack_examples
from module.model.mlp import find_mlps
from module.prune.importance import collect_statistics
from module.speed import measure_speed, ratios, sync
from module.train.optim import AnyPrecisionAdamW
from module.train.sft import row_multiple
from utils.report import peak_flops
from utils.tiny import random_llama, train_tokenizer

GiB = 2**30


@dataclass
class Context:
    tiny: bool
    device: torch.device
    dtype: torch.dtype
    work: Path  # scratch folder for models written by the pipeline
    data_dir: Path
    tokenizer: str | None  # a tokenizer folder (e.g. SmolLM2's, carried without weights)
    model: str | None  # a real model folder for the pipeline


@dataclass
class Report:
    """What one section found: figures, checks (must hold), targets (met or missed), notes."""

    figures: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def figure(self, name: str, value) -> None:
        self.figures[name] = value

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    def target(self, name: str, value: float, goal: float, higher_is_better: bool = True) -> None:
        met = value >= goal if higher_is_better else value <= goal
        self.targets.append({"target": name, "value": value, "goal": goal, "met": bool(met),
                             "higher_is_better": higher_is_better})  # fmt: skip

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


SECTIONS: dict[str, tuple[str, Callable[[Context, Report], None]]] = {}


def section(name: str, title: str):
    """Register `fn(ctx, report)` as a section of the check."""

    def register(fn):
        SECTIONS[name] = (title, fn)
        return fn

    return register


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
@section("importance", "Importance pass: the release's algorithm vs ours")
def importance_section(ctx: Context, rep: Report) -> None:
    if ctx.tiny:
        big = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=512)  # fmt: skip
        vocab_shape = {**big, "vocab_size": 8192, "num_key_value_heads": 2}
        seq, windows, batches = 64, 4, [1, 4]
    else:
        big, vocab_shape = IMPORTANCE_SHAPES["llama2-7b"], IMPORTANCE_SHAPES["llama3-8b"]
        seq, windows, batches = 1024, 8, [1, 4, 8]
    model = random_llama(big, ctx.device, ctx.dtype)
    mlps = find_mlps(model)
    ids = torch.randint(0, model.config.vocab_size, (windows + 1, seq), generator=torch.Generator().manual_seed(0))
    r = compare(model, mlps, ids, batches, ctx.device)
    rep.figure("shape", "tiny" if ctx.tiny else "Llama-2-7B (random weights)")
    rep.figure("windows x tokens", f"{windows} x {seq}")
    for b, v in r["ours"].items():
        rep.figure(f"ours batch {b}: s/window", round(v["s_per_window"], 4))
        rep.figure(f"ours batch {b}: peak GiB (above weights)", round(v["peak_bytes"] / GiB, 3))
    rep.figure("release batch 1: s/window", round(r["release"]["s_per_window"], 4))
    rep.figure("release batch 1: peak GiB (above weights)", round(r["release"]["peak_bytes"] / GiB, 3))
    rep.figure("best batch", r["best_batch"])
    rep.figure("speed-up at batch 1", round(r["speedup_batch_1"], 3))
    rep.figure(
        "kept-set overlap at 20%, release (bf16 sums) vs fp32 sums", round(r["overlap_release_vs_fp32_reference"], 5)
    )
    overlap = r["overlap_ours_vs_fp32_reference"]
    rep.check(
        "our kept sets equal an fp32-sum reference's (overlap >= 0.99)", overlap >= 0.99, f"overlap {overlap:.5f}"
    )
    rep.target("speed-up of our best batch over the release", round(r["speedup_best_batch"], 3), 2.0)
    rep.target("our peak memory per window / the release's", round(r["memory_per_window_ours_best_over_release"], 3),
               1.0, higher_is_better=False)  # fmt: skip
    del model, mlps
    free(ctx.device)

    large_vocabulary(ctx, rep, vocab_shape, seq)
    free(ctx.device)


def large_vocabulary(ctx: Context, rep: Report, shape: dict, seq: int) -> None:
    """Our pass at batch 4 on a large vocabulary (the chunked loss keeps it from running out of memory)."""
    model = random_llama(shape, ctx.device, ctx.dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (4, seq), generator=torch.Generator().manual_seed(1))
    mlps = find_mlps(model)
    try:
        _, t, m = timed(lambda: collect_statistics(model, mlps, ids, "entropy", 4, progress=False), ctx.device)
        ran, detail = True, f"{t / 4:.3f} s/window, peak {m / GiB:.2f} GiB above the weights"
        rep.figure(f"vocabulary {vocab} at batch 4: s/window", round(t / 4, 4))
    except torch.OutOfMemoryError as err:
        ran, detail = False, f"out of memory: {str(err).splitlines()[0]}"
    rep.check(f"a {vocab}-token vocabulary runs at batch 4", ran, detail)


# ---------------------------------------------------------------------------------------------------------------
def packing_agreement(model, examples: list[dict], pack_length: int, multiple: int = 1) -> dict:
    """Packed vs per-example loss, and how far the second example's logits move when the first one changes:
    packed with position_ids (isolated) and, as the control, the same row without them (one long sequence).
    Every sequence is padded at its end to a multiple of `multiple` tokens (flex_attention's block), which
    leaves the logits before the padding unchanged (causal attention)."""
    rows, _ = pack_examples(examples, pack_length, "consecutive")
    batch = Collator(0, pad_to_multiple_of=multiple)(rows[:1])
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    n0, n1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    with torch.no_grad():
        packed = model(**batch).loss.float().item()
        total, count = 0.0, 0
        for ex in examples:
            n = len(ex["input_ids"])
            ids = torch.tensor([ex["input_ids"] + [0] * (-n % multiple)], device=device)
            labels = torch.tensor(ex["labels"][1:], device=device)
            logits = model(input_ids=ids).logits[0, : n - 1].float()
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
        changed = batch["input_ids"].clone()
        changed[0, :n0] = (changed[0, :n0] + 1) % model.config.vocab_size
        second = slice(n0, n0 + n1)

        def move(position_ids):
            a = model(input_ids=batch["input_ids"], position_ids=position_ids).logits[0, second].float()
            b = model(input_ids=changed, position_ids=position_ids).logits[0, second].float()
            return (a - b).abs().max().item()

        leak = move(batch["position_ids"])
        control = move(torch.arange(batch["input_ids"].shape[1], device=device).unsqueeze(0))
    per_example = total / count
    return {"packed_loss": packed, "per_example_loss": per_example,
            "relative_difference": abs(packed - per_example) / per_example,
            "max_logit_change_isolated": leak, "max_logit_change_without_position_ids": control}  # fmt: skip


def attention_candidates(device: torch.device) -> list[str]:
    names = ["flex_attention", "sdpa", "eager"] if device.type == "cuda" else ["sdpa", "eager"]
    try:
        import flash_attn  # noqa: F401

        names.insert(0, "flash_attention_2")
    except ImportError:
        pass
    return names


@section("packing", "Packed sequences: per-example loss and isolation, for each attention implementation")
def packing_section(ctx: Context, rep: Report) -> None:
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000)  # fmt: skip
    model = random_llama(shape, ctx.device, ctx.dtype)
    model.config.use_cache = False  # with a cache, transformers does not look for packed sequences
    gen = torch.Generator().manual_seed(0)
    examples = []
    for n in (37, 29, 45):
        ids = torch.randint(0, shape["vocab_size"], (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    bf16 = ctx.dtype == torch.bfloat16
    loss_tol, logit_tol = (2e-2, 5e-2) if bf16 else (1e-4, 1e-4)
    rep.figure("tolerances (relative loss, absolute logit)", f"{loss_tol:g}, {logit_tol:g} ({ctx.dtype})")
    for attn in attention_candidates(ctx.device):
        try:
            model.set_attn_implementation(attn)
        except (ImportError, ValueError) as err:
            rep.notes.append(f"{attn}: not available here ({str(err).splitlines()[0]})")
            continue
        r = packing_agreement(model, examples, 128, row_multiple(attn))
        rep.figure(f"{attn}: packed / per-example loss", f"{r['packed_loss']:.5f} / {r['per_example_loss']:.5f}")
        moved = r["max_logit_change_isolated"], r["max_logit_change_without_position_ids"]
        rep.figure(f"{attn}: logit change isolated / without position_ids", f"{moved[0]:.2e} / {moved[1]:.2e}")
        rep.check(f"{attn}: packed loss = per-example loss", r["relative_difference"] <= loss_tol,
                  f"relative difference {r['relative_difference']:.2e}")  # fmt: skip
        rep.check(
            f"{attn}: no logit moves when another packed example changes",
            r["max_logit_change_isolated"] <= logit_tol,
            f"max change {r['max_logit_change_isolated']:.2e}",
        )
        rep.check(f"{attn}: the control leaks (the check can fail)",
                  r["max_logit_change_without_position_ids"] > 10 * logit_tol,
                  f"max change {r['max_logit_change_without_position_ids']:.2e}")  # fmt: skip
    del model
    free(ctx.device)


# ---------------------------------------------------------------------------------------------------------------
def lamini_rows(ctx: Context, tokenizer, max_len: int, examples: int) -> list[dict]:
    from dataset.LaMini_dataset import tokenized_dataset

    data = ctx.data_dir / "instruct" / "lamini" / "lamini_10001_part1.jsonl"
    if not data.is_file():
        raise FileNotFoundError(f"{data} is missing: pass --data_dir (see --help for what to carry)")
    return tokenized_dataset(str(data), tokenizer, max_len, max_samples=examples)


def check_tokenizer(ctx: Context):
    """--tokenizer (e.g. SmolLM2's, carried without weights); with --tiny or without it a 1000-token BPE."""
    from transformers import AutoTokenizer

    if ctx.tokenizer and not ctx.tiny:
        return AutoTokenizer.from_pretrained(ctx.tokenizer)
    return train_tokenizer(builtin_documents(), 1000)


@section("training", "Fine-tuning throughput: packed vs padded, the optimizer step, distillation vs plain CE")
def training_section(ctx: Context, rep: Report) -> None:
    tok = check_tokenizer(ctx)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if ctx.tiny:
        shape, max_len, examples, padded_batch, packed_batch = throughput.SHAPES["small"], 256, 24, 8, 2
    else:
        shape, max_len, examples, padded_batch, packed_batch = throughput.SHAPES["llama3.2-1b"], 1024, 256, 8, 4
    # flex_attention has no backward on CPU
    attns = ["flex_attention", "sdpa"] if ctx.device.type == "cuda" else ["sdpa", "eager"]
    rows = lamini_rows(ctx, tok, max_len, examples)
    rep.figure("model", f"{'small' if ctx.tiny else 'Llama-3.2-1B'} shape, vocabulary {len(tok)}, {ctx.dtype}")
    rep.figure(
        "examples (LaMini lengths)", f"{len(rows)}, mean {sum(len(r['input_ids']) for r in rows) / len(rows):.0f}"
    )
    model = random_llama({**shape, "vocab_size": len(tok), "use_cache": False}, ctx.device, ctx.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    for attn in attns:
        model.set_attn_implementation(attn)
        r = throughput.padded_vs_packed(model, rows, pad, ctx.device, padded_batch, packed_batch, max_len)
        rep.figure(f"{attn}: padded / packed non-pad tokens/s",
                   f"{r['padded_tokens_per_s']:.0f} / {r['packed_tokens_per_s']:.0f}")  # fmt: skip
        rep.figure(f"{attn}: fill padded / packed", f"{r['padded_fill']:.3f} / {r['packed_fill']:.3f}")
        if "packed_peak_bytes" in r:
            rep.figure(f"{attn}: peak GiB padded / packed",
                       f"{r['padded_peak_bytes'] / GiB:.2f} / {r['packed_peak_bytes'] / GiB:.2f}")  # fmt: skip
        peak = peak_flops(ctx.device)
        if peak:
            rep.figure(f"{attn}: MFU packed (6N FLOPs/token)", round(r["packed_tokens_per_s"] * 6 * n_params / peak, 4))
        rep.check(f"{attn}: training steps ran, finite throughput", math.isfinite(r["packed_tokens_per_s"]),
                  f"{r['packed_tokens_per_s']:.0f} tokens/s")  # fmt: skip
        rep.target(f"{attn}: packed / padded tokens/s", round(r["packed_over_padded"], 3), 1.5)
    packed, _ = pack_examples(rows, max_len, "bfd")
    profiled = AnyPrecisionAdamW(model.parameters(), lr=1e-5, momentum_dtype="bfloat16", variance_dtype="bfloat16",
                                 use_kahan_summation=True)  # fmt: skip
    table = throughput.step_profile(model, Collator(pad)(packed[:packed_batch]), ctx.device, profiled)
    print(f"one packed training step ({attns[-1]}), top 10:\n{table}", flush=True)
    rep.figure("profile: top op of one packed step", table.splitlines()[3].split()[0] if table else "-")
    del profiled
    fused = ctx.device.type == "cuda"
    bf16 = {"lr": 1e-5, "momentum_dtype": "bfloat16", "variance_dtype": "bfloat16", "use_kahan_summation": True}
    makers = {"torch AdamW (fused)" if fused else "torch AdamW (foreach)":
              lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=fused, foreach=not fused)}  # fmt: skip
    if fused:  # the per-tensor compiled step is the CUDA default; the foreach one the reference it replaces
        makers["AnyPrecisionAdamW foreach (bf16 states, Kahan)"] = lambda ps: AnyPrecisionAdamW(ps, fused=False, **bf16)
    makers["AnyPrecisionAdamW (bf16 states, Kahan)"] = lambda ps: AnyPrecisionAdamW(ps, **bf16)
    steps = throughput.optimizer_steps(list(model.parameters()), ctx.device, makers)
    ref_label, ref = next(iter(steps.items()))
    ours = list(steps.values())[-1]
    for label, v in steps.items():
        rep.figure(f"{label}: ms/step, state MiB", f"{v['s_per_step'] * 1e3:.2f}, {v['state_bytes'] / 2**20:.1f}")
    rep.figure("parameters", n_params)
    rep.check(
        "AnyPrecisionAdamW bf16 states (+ bf16 Kahan carry) take 3/4 of the fp32 states' memory or less",
        ours["state_bytes"] <= 0.75 * n_params * 8 + 1,
        f"{ours['state_bytes']} bytes for {n_params} parameters",
    )
    rep.target(f"AnyPrecisionAdamW step / {ref_label} step", round(ours["s_per_step"] / ref["s_per_step"], 3), 1.2,
               higher_is_better=False)  # fmt: skip
    del model
    free(ctx.device)
    # distillation from the full-size model into a student with 60% of its MLP neurons, vs plain CE
    student, teacher = throughput.student_teacher(shape, len(tok), ctx.device, ctx.dtype)
    packed, _ = pack_examples(rows, max_len, "bfd")
    batches = [Collator(pad)(packed[i : i + packed_batch]) for i in range(0, len(packed), packed_batch)][:16]
    plain = throughput.distill_step_speed(student, None, batches, ctx.device)
    distill = throughput.distill_step_speed(student, teacher, batches, ctx.device)
    rep.figure(
        "distillation / plain CE: label tokens/s", f"{distill['tokens_per_s']:.0f} / {plain['tokens_per_s']:.0f}"
    )
    rep.check("distillation steps ran, finite throughput", math.isfinite(distill["tokens_per_s"]),
              f"{distill['tokens_per_s']:.0f} tokens/s")  # fmt: skip
    if "peak_bytes" in plain:
        rep.figure(
            "distillation / plain CE: peak GiB", f"{distill['peak_bytes'] / GiB:.2f} / {plain['peak_bytes'] / GiB:.2f}"
        )
    for label, t in (("plain CE", None), ("distillation", teacher)):
        phases = throughput.step_phases(student, t, batches[:8], ctx.device)
        rep.figure(f"{label} step phases, ms", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    del student, teacher
    free(ctx.device)


# ---------------------------------------------------------------------------------------------------------------
def pipeline_model(ctx: Context) -> tuple[str, str]:
    """The pipeline's starting model folder and what it is: a real model, or random weights of a real shape."""
    if ctx.model:
        return ctx.model, f"{Path(ctx.model).name} (real weights)"
    tok = check_tokenizer(ctx)
    tiny = dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    smollm2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
    shape = tiny if ctx.tiny else smollm2
    model = random_llama({**shape, "vocab_size": len(tok)}, "cpu", torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    folder = ctx.work / "dense"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    what = "tiny Llama" if ctx.tiny else "SmolLM2-135M shape"
    return str(folder), f"{what}, random weights (quality figures mean nothing: the path is what is checked)"


@section("pipeline", "The pipeline end to end: prune -> LoRA -> merge -> lm_eval -> perplexity")
def pipeline_section(ctx: Context, rep: Report) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fintune_lora
    import prune
    from utils.perplexity import local_rows, perplexity, text_windows

    dense, what = pipeline_model(ctx)
    rep.figure("model", what)
    steps, limit, seq = (4, 10, 128) if ctx.tiny else (20, 50, 512)
    device_flags = ["--device", "cpu"] if ctx.device.type == "cpu" else []

    def step(name: str, fn):
        start = time.perf_counter()
        result = fn()
        rep.figure(f"{name}: seconds", round(time.perf_counter() - start, 2))
        return result

    pruned, lora = ctx.work / "pruned", ctx.work / "lora"
    code = step("prune 20%, mix search", lambda: prune.main([
        "--origin_path", dense, "--prune_parts", "auto", "--pruning_ratio", "0.2", "--calib_dataset", "builtin",
        "--calib_samples", "16", "--search_windows", "8", "--seq_len", str(seq), "--batch_size", "4", "--output_dir",
        str(pruned), "--overwrite", "--importance_cache", "", "--no_progress", *device_flags]))  # fmt: skip
    rep.check("prune.py --prune_parts auto exits 0", code == 0, f"exit {code}")
    if code != 0:
        return
    report = json.loads((pruned / "prune_report.json").read_text())
    rep.figure("prune: parameters before -> after", f"{report['params_before']} -> {report['params_after']}")
    board = report["search"]["leaderboard"]
    rep.figure("prune: chosen mix (held-out KL), of", f"{board[0]['mix']} ({board[0]['kl']:.4f}), {len(board)}")
    data = ctx.data_dir / "instruct" / "lamini" / "lamini_10001_part1.jsonl"
    code = step(f"LoRA {steps} steps + merge", lambda: fintune_lora.main([
        "--model", str(pruned), "--dataset_name", str(data), "--tokenizer_max", str(seq), "--max_steps", str(steps),
        "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2", "--output_dir", str(lora),
        "--overwrite", "--merge", "--data_cache", "", "--disable_tqdm", "true", "--save_strategy", "no",
        "--max_train_samples", "200",
        *(["--use_cpu", "true"] if ctx.device.type == "cpu" else [])]))  # fmt: skip
    rep.check("fintune_lora.py --merge exits 0", code == 0, f"exit {code}")
    if code != 0:
        return
    train = json.loads((lora / "train_report.json").read_text())
    rep.figure("LoRA: train loss", round(train["metrics"]["train_loss"], 4))
    merged = lora / "merged"
    out = ctx.work / "lm_eval"
    dtype = "float32" if ctx.dtype == torch.float32 else "bfloat16"
    cmd = ["bash", str(ROOT / "script" / "eval.sh"), "--local", "--tasks", "arc_easy_local", "--data_dir",
           str(ctx.data_dir), "--limit", str(limit), "--batch_size", "8", "--device", str(ctx.device), "--dtype", dtype,
           "--output", str(out), str(merged)]  # fmt: skip
    run = step(f"lm_eval arc_easy_local --limit {limit}", lambda: subprocess.run(cmd, capture_output=True, text=True))
    rep.check("lm_eval (script/eval.sh) exits 0", run.returncode == 0, run.stderr.strip().splitlines()[-1]
              if run.returncode else "ok")  # fmt: skip
    if run.returncode == 0:
        (result_file,) = out.rglob("results_*.json")
        acc = json.loads(result_file.read_text())["results"]["arc_easy_local"]["acc,none"]
        rep.figure("lm_eval arc_easy_local acc", round(acc, 4))
        rep.check("accuracy is a fraction", 0.0 <= acc <= 1.0, f"acc {acc:.4f}")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=ctx.dtype).to(ctx.device)
    tok = AutoTokenizer.from_pretrained(merged)
    windows = text_windows(tok, local_rows("wikitext2", ctx.data_dir)[:3000], seq)[: 4 if ctx.tiny else 16]
    ppl = step("WikiText-2 perplexity", lambda: perplexity(model, windows, 4, progress=False))
    rep.figure(f"WikiText-2 perplexity ({len(windows)} x {seq} tokens)", round(ppl["perplexity"], 3))
    rep.check("perplexity is finite", math.isfinite(ppl["perplexity"]), f"{ppl['perplexity']:.3f}")


# ---------------------------------------------------------------------------------------------------------------
@section("inference", "Inference speed: a 20%-pruned model against its dense original")
def inference_section(ctx: Context, rep: Report) -> None:
    if ctx.tiny:
        shape, prompt_len, new_tokens = (
            dict(
                hidden_size=64,
                intermediate_size=176,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=1000,
            ),
            128,
            8,
        )
    else:  # SmolLM2-135M's shape with random weights
        shape, prompt_len, new_tokens = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                             tie_word_embeddings=True), 1024, 64  # fmt: skip
    dense = random_llama(shape, ctx.device, ctx.dtype)
    pruned = mlp_pruned_copy(dense, 0.2)
    # a first pass through every path, untimed: the first run on a fresh GPU measured the dense model's decoding
    # at a third of the pruned model's speed (2026-11-30); each figure is then a median of 3
    measure_speed(dense, prompt_len, 4, [1, 8], repeats=1)
    results = {label: measure_speed(m, prompt_len, new_tokens, [1, 8], decode_repeats=3)
               for label, m in (("dense", dense), ("pruned", pruned))}  # fmt: skip
    r = ratios(results["dense"], results["pruned"])
    rep.figure("prompt / new tokens", f"{prompt_len} / {new_tokens}")
    for label, v in results.items():
        rep.figure(f"{label}: prefill ms", round(v["prefill_seconds"] * 1e3, 2))
        for b, tps in v["decode_tokens_per_s"].items():
            rep.figure(f"{label}: decode tokens/s at batch {b}", round(tps, 1))
        if "peak_memory_bytes" in v:
            rep.figure(f"{label}: peak GiB", round(v["peak_memory_bytes"] / GiB, 3))
    rep.figure("pruned / dense parameters", round(r["params"], 4))
    rep.figure("prefill speed-up", round(r["prefill_speedup"], 3))
    for b, v in r["decode_speedup"].items():
        rep.figure(f"decode speed-up at batch {b}", round(v, 3))
    rep.check("the pruned copy has 80% of the parameters", abs(r["params"] - 0.8) < 0.01, f"{r['params']:.4f}")
    rep.check("every speed is finite and positive", all(math.isfinite(x) and x > 0 for x in
              (r["prefill_speedup"], *r["decode_speedup"].values())), "ok")  # fmt: skip


@section("dynamic", "Probe Pruning: prefill of a batch, dense vs per-batch pruning vs the static pruned model")
def dynamic_section(ctx: Context, rep: Report) -> None:
    from module.dynamic.history import calibrate
    from module.dynamic.probe import MULTIPLE, SKIP_LAYERS, kept_count, layer_ratio
    from module.dynamic.wrap import ProbeSettings, attach
    from module.model.layout import layout_of

    if ctx.tiny:
        shape, batch, seq = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=1000), 4, 64  # fmt: skip
    else:  # Llama-2-7B's shape with random weights, the paper's batch of 20 windows x 1024 tokens
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)  # fmt: skip
        batch, seq = 20, 1024
    dense = random_llama(shape, ctx.device, ctx.dtype)
    dense.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(ctx.device)
    history = calibrate(dense, layout_of(dense, "dynamic"), ids[:2], 1, False)  # speed only: any history

    @torch.no_grad()
    def prefill_ms(model) -> float:
        model(ids[:, :8], use_cache=False)  # warm-up
        times = []
        for _ in range(3):
            sync(ctx.device)
            start = time.perf_counter()
            model(ids, use_cache=False)
            sync(ctx.device)
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    base = prefill_ms(dense)
    rep.figure("shape, batch x tokens", f"{shape['num_hidden_layers']} layers x {shape['hidden_size']}, "
                                        f"{batch} x {seq}, {ctx.dtype}")  # fmt: skip
    rep.figure("dense: prefill ms", round(base, 2))
    times = [base]
    for ratio in (0.2, 0.4):
        keep = kept_count(shape["intermediate_size"], layer_ratio(shape["num_hidden_layers"], ratio), MULTIPLE)
        for parts in (("mlp",), ("mlp", "heads")):
            pp = copy.deepcopy(dense)
            attach(pp, ProbeSettings(ratio=ratio, parts=parts), history)
            ms = prefill_ms(pp)
            times.append(ms)
            rep.figure(f"{ratio:g}, PP {'+'.join(parts)}: prefill ms (probe + gathers), speed-up", f"{ms:.2f}, "
                       f"{base / ms:.3f}x")  # fmt: skip
            del pp
            free(ctx.device)
        static = copy.deepcopy(dense)  # the same widths, sliced once: layers from SKIP_LAYERS on keep `keep` neurons
        for i, layer in enumerate(find_mlps(static).layers):
            if i >= SKIP_LAYERS:
                layer.select(torch.arange(keep, device=ctx.device))
        ms = prefill_ms(static)
        times.append(ms)
        rep.figure(f"{ratio:g}, static MLP ({keep} neurons from layer {SKIP_LAYERS}): prefill ms, speed-up",
                   f"{ms:.2f}, {base / ms:.3f}x")  # fmt: skip
        del static
        free(ctx.device)
    rep.check("every prefill time is finite and positive", all(math.isfinite(t) and t > 0 for t in times), "ok")


@section("sparse", "2:4 weights: torch's semi-structured sparse matmul against the dense one (CUDA only)")
def sparse_section(ctx: Context, rep: Report) -> None:
    from module.sparse.masks import Pattern, mask_from_scores

    if ctx.device.type != "cuda":
        rep.figure("semi-structured sparse matmul", "not measured: torch supports it on CUDA only")
        return
    from torch.sparse import to_sparse_semi_structured

    rows, cols, tokens = (11008, 4096, 4096)  # Llama-2-7B's up_proj at 4096 tokens
    weight = torch.randn(rows, cols, device=ctx.device, dtype=torch.float16)
    weight = weight.masked_fill(mask_from_scores(weight.abs().float(), Pattern.parse("2:4", 0.5), "row"), 0)
    x = torch.randn(cols, tokens, device=ctx.device, dtype=torch.float16)
    sparse = to_sparse_semi_structured(weight)
    torch.testing.assert_close(sparse @ x, weight @ x, rtol=1e-2, atol=1e-1)
    rep.check("the 2:4 sparse product equals the dense one", True, "fp16, rtol 1e-2")

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / 20

    dense_s, sparse_s = timed(lambda: weight @ x), timed(lambda: sparse @ x)
    rep.figure("dense / 2:4 matmul ms (11008 x 4096 @ 4096 x 4096, fp16)",
               f"{dense_s * 1e3:.3f} / {sparse_s * 1e3:.3f}")  # fmt: skip
    rep.figure("2:4 matmul speed-up", round(dense_s / sparse_s, 3))


# ---------------------------------------------------------------------------------------------------------------
def run_sections(
    ctx: Context, names: list[str], registry: dict | None = None, after_each: Callable[[dict], None] | None = None
) -> dict[str, Report]:
    """Run each named section; an exception is a failed check of that section, never the end of the run.

    `after_each(reports so far)` runs after every section, so a run killed at its time limit keeps what it found.
    """
    registry = SECTIONS if registry is None else registry
    reports = {}
    for name in names:
        title, fn = registry[name]
        rep = Report()
        print(f"== {name}: {title}", flush=True)
        start = time.perf_counter()
        try:
            fn(ctx, rep)
        except Exception as err:  # noqa: BLE001 - one section's failure is reported, the others still run
            rep.check("ran to the end", False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            rep.notes.append(traceback.format_exc(limit=4))
        rep.seconds = time.perf_counter() - start
        for c in rep.checks:
            print(f"   [{'ok' if c['ok'] else 'FAILED'}] {c['check']}: {c['detail']}", flush=True)
        reports[name] = rep
        if after_each is not None:
            after_each(reports)
    return reports


def environment(ctx: Context) -> dict:
    import transformers

    from utils.report import versions

    return {**versions(), "transformers": transformers.__version__, "tiny": ctx.tiny, "dtype": str(ctx.dtype),
            "device": str(ctx.device)}  # fmt: skip


def markdown(reports: dict[str, Report], env: dict) -> str:
    lines = ["# GPU check", "", f"Device: **{env['device_name']}** ({env['device']}, {env['dtype']}); torch "
             f"{env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}; commit "
             f"{(env.get('hfprune_commit') or '?')[:10]}{'; --tiny' if env['tiny'] else ''}.", ""]  # fmt: skip
    if env.get("sections_left"):
        lines += [f"Not run (yet): {', '.join(env['sections_left'])}.", ""]
    for name, rep in reports.items():
        title = SECTIONS[name][0] if name in SECTIONS else name
        lines += [f"## {name}: {title} ({'ok' if rep.ok else 'FAILED'}, {rep.seconds:.0f} s)", "",
                  "| figure | value |", "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v} |" for k, v in rep.figures.items()]
        if rep.targets:
            lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
            lines += [f"| {t['target']} | {t['value']} | {'≥' if t['higher_is_better'] else '≤'} {t['goal']} | "
                      f"{'yes' if t['met'] else '**missed**'} |" for t in rep.targets]  # fmt: skip
        lines += ["", "| check | result |", "|---|---|"]
        lines += [f"| {c['check']} | {'ok' if c['ok'] else '**FAILED**'}: {c['detail']} |" for c in rep.checks]
        lines += [f"- note: {n.strip().splitlines()[-1] if 'Traceback' in n else n}" for n in rep.notes]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--work_dir", help="scratch folder for the models the pipeline writes (default: OUT/work; "
                        "outside OUT when only OUT's files are copied back)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (fp32), every section, < 2 minutes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--data_dir",
        default=DATA_DIR,
        help="data folder: instruct/lamini/lamini_10001_part1.jsonl, arc/hf_format, wikitext-2-raw",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder for the training and pipeline sections "
                        "(default: a BPE tokenizer trained on the built-in text)")  # fmt: skip
    parser.add_argument("--model", help="a real model folder for the pipeline (default: random weights, "
                        "SmolLM2-135M's shape)")  # fmt: skip
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        print(f"error: --sections {args.sections!r}: unknown {unknown}; valid: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("error: no CUDA device here; run with --tiny for the CPU version of every section", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    ctx = Context(args.tiny, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32,
                  work, Path(args.data_dir), args.tokenizer, args.model)  # fmt: skip
    torch.manual_seed(0)
    start = time.perf_counter()
    env = environment(ctx)

    def write(reports: dict[str, Report]) -> None:
        env["seconds"] = round(time.perf_counter() - start, 1)
        env["sections_left"] = [n for n in names if n not in reports]
        result = {"environment": env, "sections": {n: {"title": SECTIONS[n][0], "ok": r.ok,
                  "seconds": round(r.seconds, 1), "figures": r.figures, "checks": r.checks, "targets": r.targets,
                  "notes": r.notes} for n, r in reports.items()}}  # fmt: skip
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out / "gpu_check.md").write_text(markdown(reports, env))

    reports = run_sections(ctx, names, after_each=write)
    failed = [n for n, r in reports.items() if not r.ok]
    missed = [f"{n}: {t['target']}" for n, r in reports.items() for t in r.targets if not t["met"]]
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {env['seconds']:.0f} s")
    if missed:
        print("targets missed: " + "; ".join(missed))
    if failed:
        print(f"FAILED sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
