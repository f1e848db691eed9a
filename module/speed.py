"""Inference speed: prefill time of one prompt and greedy decoding tokens/s with a KV cache, and the ratios
of a pruned model's numbers to its dense original's (measured in one process on the same inputs)."""

from __future__ import annotations

import statistics
import time

import torch

from module.model.mlp import count_parameters


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(
    model, prompt_len: int, new_tokens: int, batch_sizes: list[int], repeats: int = 3, decode_repeats: int = 1
) -> dict:
    """Prefill seconds (median of `repeats`, batch 1) and decode tokens/s (median of `decode_repeats`) per batch
    size, on random token ids."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen).to(device)
    model.eval()
    model(prompt[:, :8])  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        model(prompt, use_cache=False)
        sync(device)
        times.append(time.perf_counter() - start)
    out = {"params": count_parameters(model), "prefill_seconds": statistics.median(times), "decode_tokens_per_s": {}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    short = min(prompt_len, 128)  # decoding speed: a short prompt, then `new_tokens` greedy steps with the cache
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, short), generator=gen).to(device)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                      pad_token_id=0, eos_token_id=None)  # fmt: skip
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        seconds = []
        for _ in range(decode_repeats):
            sync(device)
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            sync(device)
            seconds.append(time.perf_counter() - start)
        out["decode_tokens_per_s"][b] = b * new_tokens / statistics.median(seconds)
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def ratios(dense: dict, pruned: dict) -> dict:
    """Speed-ups of the pruned model (> 1: faster) and its parameter share."""
    return {
        "params": pruned["params"] / dense["params"],
        "prefill_speedup": dense["prefill_seconds"] / pruned["prefill_seconds"],
        "decode_speedup": {
            b: pruned["decode_tokens_per_s"][b] / dense["decode_tokens_per_s"][b] for b in dense["decode_tokens_per_s"]
        },  # fmt: skip
    }


def speed_of(model) -> dict:
    """What a pruning run measures with --measure_speed: prefill of one prompt of up to 1024 tokens, greedy
    decoding of 32 tokens at batch 1 and 8."""
    prompt = min(1024, getattr(model.config, "max_position_embeddings", None) or 1024)
    return measure_speed(model, prompt, 32, [1, 8])


def speed_against(dense_speed: dict, model) -> dict:
    """`model`'s speed and its ratios to the dense model's."""
    measured = speed_of(model)
    return {"pruned": measured, **ratios(dense_speed, measured)}


def speed_text(report: dict) -> str:
    """'; prefill Nx, decode batch 1 Nx, batch 8 Nx vs dense' for a summary line ('' when not measured)."""
    speed = report.get("speed")
    if not speed:
        return ""
    decode = ", ".join(f"batch {b} {v:.2f}x" for b, v in speed["decode_speedup"].items())
    return f"; prefill {speed['prefill_speedup']:.2f}x, decode {decode} vs dense"
