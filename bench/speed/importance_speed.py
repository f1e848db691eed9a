"""Importance pass: the released algorithm vs ours, in one process, on the same windows.

The release's algorithm (re-implemented from its description): MLP weights require grad, a forward
hook stores the down_proj input, a full backward hook takes its gradient, full [T x V] fp32 logits
through autograd, scores summed in bf16, one window at a time. Ours: `module.prune.importance`.

    python bench/speed/importance_speed.py                                  # SmolLM2-135M, CPU, 512 tokens
    python bench/speed/importance_speed.py --shape llama2-7b --seq_len 1024 --windows 16 --batch_size 8  # GPU
    python bench/speed/importance_speed.py --shape llama3-8b --seq_len 1024 --windows 16 --batch_size 4  # 128k vocab

Prints seconds per window, peak memory (CUDA: allocator peak; CPU: sampled RSS above the start),
the speed-up and the overlap of the kept sets at 20% pruning, and ours again with activation
checkpointing (memory and time against ours without, and whether the scores are equal).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import model_or_default
from module.model.mlp import count_parameters, find_mlps
from module.prune.criteria import top_k_sorted
from module.prune.importance import collect_statistics
from module.prune.plan import plan_keep
from utils.report import PeakMemory
from utils.tiny import random_llama

SHAPES = {  # random-weight models of the published shapes
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}  # fmt: skip


def release_scores(model, mlps, windows: torch.Tensor, sum_dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """The released loop: batch 1, MLP weight grads on, full-logit autograd entropy, bf16 sums (or `sum_dtype`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in mlps.layers:
        for axis in [*layer.inputs, layer.output]:
            axis.module.weight.requires_grad_(True)
    acts, grads = {}, {}
    hooks = []
    for i, layer in enumerate(mlps.layers):
        mod = layer.output.module
        hooks.append(mod.register_forward_hook(lambda m, inp, out, i=i: acts.__setitem__(i, inp[0].detach())))
        hooks.append(mod.register_full_backward_hook(lambda m, gi, go, i=i: grads.__setitem__(i, gi[0].detach())))
    device = next(model.parameters()).device
    scores = [torch.zeros(mlps.neurons, dtype=sum_dtype, device=device) for _ in mlps.layers]
    for w in windows:
        model.zero_grad()
        logits = model(input_ids=w.unsqueeze(0).to(device)).logits
        probs = torch.softmax(logits.float(), dim=-1)
        logp = torch.log_softmax(logits.float(), dim=-1)
        (-(probs * logp).sum(-1).mean()).backward()
        for i in range(len(scores)):
            scores[i] += (acts[i] * grads[i]).abs().sum(dim=(0, 1)).to(sum_dtype)
        acts.clear()
        grads.clear()
        del logits, probs, logp
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return [s.double().cpu() for s in scores]


def timed(fn, device):
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return out, seconds, mem.above_start


def kept_overlap(a: list[torch.Tensor], b: list[torch.Tensor], k: int) -> float:
    """Share of the top-k sets (every layer) that two score lists agree on."""
    same = sum(len(set(top_k_sorted(x, k).tolist()) & set(top_k_sorted(y, k).tolist())) for x, y in zip(a, b))
    return same / (k * len(a))


def compare(model, mlps, windows: torch.Tensor, batch_sizes: list[int], device: torch.device,
            release: bool = True) -> dict:  # fmt: skip
    """Ours at each batch size, then the release (bf16 sums) and the release with fp32 sums as the reference.

    `windows[0]` warms up; the rest are timed. Seconds and peak memory (above the weights) per window,
    the kept-set overlap at 20% pruning against the fp32-sum reference, and the speed-up of our best batch.
    """
    timed_windows = windows[1:]
    n, seq = timed_windows.shape
    collect_statistics(model, mlps, windows[:1], "entropy", 1, progress=False)  # warm-up
    k = plan_keep(count_parameters(model), mlps, pruning_ratio=0.2).k
    out = {"windows": n, "seq_len": seq, "k_at_20pct": k, "ours": {}}
    scores = {}
    for b in batch_sizes:
        stats, t, m = timed(lambda b=b: collect_statistics(model, mlps, timed_windows, "entropy", b, progress=False),
                            device)  # fmt: skip
        scores[b] = [s.cpu() for s in stats.taylor]
        out["ours"][b] = {"s_per_window": t / n, "tokens_per_s": n * seq / t, "peak_bytes": m,
                          "peak_bytes_per_window": m / b}  # fmt: skip
    best = min(out["ours"], key=lambda b: out["ours"][b]["s_per_window"])
    out["best_batch"] = best
    if not release:
        return out
    release_scores(model, mlps, windows[:1])  # warm-up
    rel, t, m = timed(lambda: release_scores(model, mlps, timed_windows), device)
    out["release"] = {"s_per_window": t / n, "tokens_per_s": n * seq / t, "peak_bytes": m}
    ref, t_ref, _ = timed(lambda: release_scores(model, mlps, timed_windows, torch.float32), device)
    out["release_fp32_sums_s_per_window"] = t_ref / n
    out["overlap_ours_vs_fp32_reference"] = min(kept_overlap(scores[b], ref, k) for b in batch_sizes)
    out["overlap_release_vs_fp32_reference"] = kept_overlap(rel, ref, k)
    out["speedup_best_batch"] = out["release"]["s_per_window"] / out["ours"][best]["s_per_window"]
    out["speedup_batch_1"] = out["release"]["s_per_window"] / out["ours"][batch_sizes[0]]["s_per_window"]
    out["memory_per_window_ours_best_over_release"] = out["ours"][best]["peak_bytes_per_window"] / max(
        out["release"]["peak_bytes"], 1
    )
    return out


def load_model(args, device, dtype):
    from transformers import AutoModelForCausalLM

    if args.shape:
        return random_llama({**SHAPES[args.shape], "max_position_embeddings": max(4096, args.seq_len)}, device, dtype)
    args.model = model_or_default(args.model)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF folder (default: SmolLM2-135M-Instruct, materialised offline)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of a published shape instead")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="windows per method (after one warm-up window)")
    parser.add_argument("--batch_size", type=int, default=1, help="our batch size (the release's is 1)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--skip_release", action="store_true", help="only ours (when the release does not fit)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    torch.manual_seed(0)
    model = load_model(args, device, dtype)
    mlps = find_mlps(model)
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (args.windows + 1, args.seq_len), generator=torch.Generator().manual_seed(0))
    if not args.shape:  # real text for a real model: the offline built-in prose
        from transformers import AutoTokenizer

        from dataset.calibration import builtin_documents, sample_windows

        tok = AutoTokenizer.from_pretrained(args.model)
        windows = sample_windows(builtin_documents(), tok, args.windows + 1, args.seq_len, seed=0)
    name = args.shape or Path(args.model).name
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name} on {dev_name} ({torch.get_num_threads()} threads), {dtype}, {args.windows} windows x "
          f"{args.seq_len} tokens, torch {torch.__version__}")  # fmt: skip

    result = compare(model, mlps, windows, [args.batch_size], device, release=not args.skip_release)
    ours = result["ours"][args.batch_size]
    print(f"ours    (batch {args.batch_size}): {ours['s_per_window']:.3f} s/window, "
          f"{ours['tokens_per_s']:.0f} tokens/s, peak {ours['peak_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    plain = collect_statistics(model, mlps, windows[1:], "entropy", args.batch_size, progress=False)
    ck_stats, t_ck, m_ck = timed(
        lambda: collect_statistics(model, mlps, windows[1:], "entropy", args.batch_size, progress=False,
                                   activation_checkpointing=True), device)  # fmt: skip
    same = all(torch.allclose(a.cpu(), b.cpu(), rtol=1e-5) for a, b in zip(ck_stats.taylor, plain.taylor))
    t_ours = ours["s_per_window"] * args.windows
    print(
        f"ours with activation checkpointing: {t_ck / args.windows:.3f} s/window, peak {m_ck / 2**30:.2f} GiB "
        f"(memory {m_ck / max(ours['peak_bytes'], 1):.2f}x, time {t_ck / t_ours:.2f}x of ours without; "
        f"scores equal: {same})"
    )
    if args.skip_release:
        return
    rel = result["release"]
    print(f"release (batch 1): {rel['s_per_window']:.3f} s/window, "
          f"{rel['tokens_per_s']:.0f} tokens/s, peak {rel['peak_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    print(f"speed-up {result['speedup_best_batch']:.2f}x, peak memory ours/release "
          f"{ours['peak_bytes'] / max(rel['peak_bytes'], 1):.2f}, kept-set overlap at 20% pruning with an fp32-sum "
          f"reference: ours {result['overlap_ours_vs_fp32_reference']:.4f}, release (bf16 sums) "
          f"{result['overlap_release_vs_fp32_reference']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
