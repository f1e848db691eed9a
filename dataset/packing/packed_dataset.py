"""Packing tokenized examples into rows of at most `pack_length` tokens, with no attention mask.

Each row carries `input_ids`, `labels` (the first label of every packed example is -100, so no
example is trained to predict its neighbour's first token) and `position_ids` restarting at 0 for
every example. Without an attention mask and without a cache, transformers derives the sequence
boundaries from `position_ids` (flash_attention_2, sdpa and eager alike), so examples never attend
to each other.
"""

from __future__ import annotations

import bisect

import torch

IGNORE = -100
STRATEGIES = ("consecutive", "bfd")


def pack_consecutive(lengths: list[int], pack_length: int) -> list[list[int]]:
    """The release's grouping: examples in order, a new row when the next one does not fit."""
    bins: list[list[int]] = []
    used = pack_length + 1
    for i, n in enumerate(lengths):
        if used + n > pack_length:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


def pack_best_fit_decreasing(lengths: list[int], pack_length: int) -> list[list[int]]:
    """Longest first, each into the open row with the least room that still fits it."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin index)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = pack_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return bins


def pack_examples(examples: list[dict], pack_length: int, strategy: str = "bfd") -> tuple[list[dict], float]:
    """Packed rows and the fill ratio (real tokens / (rows x pack_length))."""
    lengths = [len(e["input_ids"]) for e in examples]
    if max(lengths, default=0) > pack_length:
        raise ValueError(f"an example has {max(lengths)} tokens, more than the pack length {pack_length}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    groups = (pack_consecutive if strategy == "consecutive" else pack_best_fit_decreasing)(lengths, pack_length)
    rows = []
    for group in groups:
        ids, labels, pos = [], [], []
        for i in group:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE, *ex["labels"][1:]]
            pos += range(len(ex["input_ids"]))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": list(pos)})
    fill = sum(lengths) / (len(rows) * pack_length) if rows else 0.0
    return rows, fill


class Collator:
    """Pads the rows of a batch to the longest one, rounded up to a multiple of `pad_to_multiple_of`.

    packed=True: no attention mask; the padding forms a sequence of its own (positions 0.., labels
    -100), so transformers keeps it apart like any packed example. packed=False: plain padded batches
    with an attention mask (the baseline without packing).
    """

    def __init__(self, pad_token_id: int, packed: bool = True, pad_to_multiple_of: int = 1):
        self.pad, self.packed, self.multiple = pad_token_id, packed, pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = -(-max(len(r["input_ids"]) for r in rows) // self.multiple) * self.multiple
        extra = "position_ids" if self.packed else "attention_mask"
        batch = {"input_ids": [], "labels": [], extra: []}
        for r in rows:
            n, size = width - len(r["input_ids"]), len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad] * n)
            batch["labels"].append(r["labels"] + [IGNORE] * n)
            if self.packed:
                batch[extra].append(r.get("position_ids", list(range(size))) + list(range(n)))
            else:
                batch[extra].append([1] * size + [0] * n)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def pack_text(documents: list[list[int]], row_length: int, eos_id: int | None) -> list[dict]:
    """Plain-text rows for training without labels to mask: the documents' tokens joined (each followed by
    EOS when there is one) and cut into full rows of `row_length`; the tail that fills no row is dropped.
    Every token is a label; positions run on across documents, as in pretraining."""
    stream = [t for doc in documents for t in (doc + [eos_id] if eos_id is not None else doc)]
    rows = []
    for s in range(0, len(stream) - row_length + 1, row_length):
        ids = stream[s : s + row_length]
        rows.append({"input_ids": ids, "labels": list(ids), "position_ids": list(range(row_length))})
    return rows
