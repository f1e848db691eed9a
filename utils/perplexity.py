"""Perplexity with the usual pruning-paper protocol (SparseGPT / Wanda / LLM-Pruner).

The test text is joined (WikiText-2: the HF rows with "\\n\\n"; PTB: sentences with " "; C4: the
first 1100 validation documents with " "), tokenized once, and cut into non-overlapping windows of
`--seq_len` tokens (default 2048; the incomplete tail is dropped). Perplexity = exp(mean next-token
NLL) over every predicted token of every window.

    python -m utils.perplexity --model out/pruned --dataset wikitext2                    # from the hub
    python -m utils.perplexity --model out/pruned --dataset wikitext2 --data_dir ../shared/data
    python -m utils.perplexity --model base --adapter out/lora --dataset ptb --output ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.errors import UserError, first_line, run_cli


@dataclass(frozen=True)
class PerplexitySet:
    hub: dict  # datasets.load_dataset keyword arguments
    field: str
    joiner: str
    local: str  # file under the data folder
    max_docs: int | None = None


SETS = {
    "wikitext2": PerplexitySet({"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}, "text", "\n\n",
                               "wikitext-2-raw/wiki.test.raw"),
    "ptb": PerplexitySet({"path": "ptb_text_only", "name": "penn_treebank", "split": "test"}, "sentence", " ",
                         "ptb/ptb.test.txt"),
    "c4": PerplexitySet({"path": "allenai/c4", "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                         "split": "validation"}, "text", " ", "c4/c4_validation_first200.jsonl", max_docs=1100),
}  # fmt: skip


def local_rows(dataset: str, data_dir: str | Path) -> list[str]:
    """The hub's rows, rebuilt from the local copy of the test file."""
    path = Path(data_dir) / SETS[dataset].local
    if not path.is_file():
        raise UserError(f"{path} does not exist (--data_dir must hold {SETS[dataset].local})")
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if dataset == "wikitext2":  # HF rows: text lines keep a trailing "\n", blank " " lines are ""
        return [line + "\n" if line.strip() else "" for line in lines]
    if dataset == "ptb":  # HF's ptb_text_only strips the leading/trailing space of each line
        return [line.strip() for line in lines]
    return [json.loads(line)["text"] for line in lines if line.strip()][: SETS[dataset].max_docs]


def hub_rows(dataset: str) -> list[str]:
    import datasets

    spec = SETS[dataset]
    try:
        ds = datasets.load_dataset(**spec.hub)
    except Exception as err:  # noqa: BLE001 - any hub failure is one line for the user
        raise UserError(f"cannot load {dataset} from the hub ({first_line(err)}); offline, pass --data_dir") from None
    return list(ds[spec.field][: spec.max_docs])


def text_windows(tokenizer, documents: list[str], seq_len: int, joiner: str = "\n\n") -> torch.Tensor:
    ids = tokenizer(joiner.join(documents), return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """exp(mean NLL) of the model over windows [N, T]; also returns the NLL and token count."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for s in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        ids = windows[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}


def main(argv: list[str] | None = None) -> int:
    from utils.cli import load_model_and_tokenizer, resolve_device_dtype
    from utils.report import versions, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder or hub id")
    p.add_argument("--adapter", help="peft adapter folder applied on top of --model")
    p.add_argument("--dataset", default="wikitext2", help=f"one of {', '.join(SETS)}")
    p.add_argument("--data_dir", help="local data folder instead of the hub (e.g. ../shared/data)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--max_windows", type=int, default=0, help="only the first N windows (0 = all)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="JSON file to write")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)

    def evaluate() -> None:
        if args.dataset not in SETS:
            raise UserError(f"--dataset {args.dataset!r} is not one of {', '.join(SETS)}")
        if args.seq_len < 2 or args.batch_size < 1 or args.max_windows < 0:
            raise UserError("--seq_len must be >= 2, --batch_size >= 1 and --max_windows >= 0")
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        rows = local_rows(args.dataset, args.data_dir) if args.data_dir else hub_rows(args.dataset)
        model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
        if args.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter)
        windows = text_windows(tokenizer, rows, args.seq_len, SETS[args.dataset].joiner)[: args.max_windows or None]
        start = time.perf_counter()
        result = perplexity(model, windows, args.batch_size, not args.no_progress)
        result.update(model=args.model, adapter=args.adapter, dataset=args.dataset, seq_len=args.seq_len,
                      source=f"local:{args.data_dir}" if args.data_dir else "hub", dtype=str(dtype),
                      seconds=time.perf_counter() - start, versions=versions())  # fmt: skip
        print(f"{args.dataset} perplexity {result['perplexity']:.4f} ({result['windows']} x {args.seq_len} tokens)")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            write_json(Path(args.output), result)

    return run_cli(evaluate)


if __name__ == "__main__":
    sys.exit(main())
