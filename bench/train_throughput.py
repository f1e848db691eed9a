"""Training throughput: packed vs padded batches, and AnyPrecisionAdamW vs torch AdamW, in one process.

    python bench/train_throughput.py                       # CPU: small Llama-shaped model, SmolLM2 tokenizer
    python bench/train_throughput.py --shape llama3.2-1b    # GPU: tokens/s and MFU of a full fine-tune step

Part 1 trains the same examples (the LaMini sample's real lengths, Alpaca prompt, 1024-token cap)
as padded batches (pad to the longest, attention mask) and as packed rows (position_ids, no mask)
and prints non-pad tokens/s of forward + backward + optimizer step. Part 2 times optimizer steps
and counts optimizer-state bytes for the same parameters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.LaMini_dataset import tokenized_dataset  # noqa: E402
from dataset.packing.packed_dataset import Collator, pack_examples  # noqa: E402
from module.anyprecisionAdamw import AnyPrecisionAdamW, state_bytes  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
}  # fmt: skip


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tokenizer is None:
        from utils.smollm2 import cached_model

        args.tokenizer = str(cached_model())
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = tokenized_dataset(args.data, tok, args.max_len, max_samples=args.examples)
    lengths = [len(r["input_ids"]) for r in rows]
    real = sum(lengths)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, use_cache=False, **SHAPES[args.shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.shape} Llama ({n_params / 1e6:.1f}M params) on {name}, {dtype}; {len(rows)} LaMini examples, "
          f"mean {real / len(rows):.0f} / max {max(lengths)} tokens, torch {torch.__version__}")  # fmt: skip

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    padded = [
        Collator(pad, packed=False)(rows[i : i + args.padded_batch]) for i in range(0, len(rows), args.padded_batch)
    ]
    packed_rows, fill = pack_examples(rows, args.max_len, "bfd")
    packed = [Collator(pad)(packed_rows[i : i + args.packed_batch])
              for i in range(0, len(packed_rows), args.packed_batch)]  # fmt: skip
    pad_fill = real / sum(b["input_ids"].numel() for b in padded)
    opt = AnyPrecisionAdamW(model.parameters(), lr=1e-5, momentum_dtype="bfloat16", variance_dtype="bfloat16")
    tps_padded = train_tokens_per_second(model, padded, device, real, opt)
    tps_packed = train_tokens_per_second(model, packed, device, real, opt)
    print(f"padded (batch {args.padded_batch}, fill {pad_fill:.3f}): {tps_padded:.0f} non-pad tokens/s")
    print(f"packed (batch {args.packed_batch} x {args.max_len}, fill {fill:.3f}): {tps_packed:.0f} non-pad tokens/s")
    print(f"packed / padded: {tps_packed / tps_padded:.2f}x")
    if device.type == "cuda":
        peak = {"cuda": 989e12}.get(device.type)  # H100 SXM dense bf16
        flops_per_token = 6 * n_params
        print(f"MFU (6N FLOPs/token vs 989 TFLOP/s bf16): {tps_packed * flops_per_token / peak:.3f}")

    # Part 2: optimizer step time and state memory on the same parameters
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    results = {}
    for label, make in (
        ("torch AdamW (fp32 states, defaults)", lambda: torch.optim.AdamW(params, lr=1e-5)),
        ("torch AdamW (fp32 states, foreach)", lambda: torch.optim.AdamW(params, lr=1e-5, foreach=True)),
        ("AnyPrecisionAdamW (bf16 states)", lambda: AnyPrecisionAdamW(params, lr=1e-5, momentum_dtype="bfloat16",
                                                                       variance_dtype="bfloat16")),
    ):  # fmt: skip
        o = make()
        o.step()
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            o.step()
        sync(device)
        seconds = (time.perf_counter() - start) / 5
        state = state_bytes(o)
        results[label] = (seconds, state)
        print(f"{label}: {seconds * 1e3:.1f} ms/step, state {state / 2**20:.1f} MiB")
    (t_ref, m_ref), (t_foreach, _), (t_ours, m_ours) = results.values()
    print(f"AnyPrecisionAdamW / AdamW: step time {t_ours / t_ref:.2f}x (vs foreach {t_ours / t_foreach:.2f}x), "
          f"state memory {m_ours / m_ref:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
