"""A transformers-5 checkpoint made readable by the transformers 4.x that published code pins.

Imported by the drivers that run inside those environments (bench/studies/*_driver.py), so it imports nothing of
HFPrune and nothing beyond the standard library.
"""

from __future__ import annotations

import json
import os

REWRITTEN = ("config.json", "tokenizer_config.json", "tokenizer.json")


def readable_copy(model_path: str, into: str) -> str:
    """MODEL's files linked into the new folder `into`, three rewritten: config.json with rope_theta at the top
    (transformers 5 writes it in rope_parameters; 4.x would use its default), tokenizer_config.json with a class
    4.x has (5.x writes TokenizersBackend), tokenizer.json with its BPE merges as "a b" strings (tokenizers before
    0.20 read no pairs). The same weights and vocabulary: `into`, for from_pretrained."""
    os.makedirs(into)
    for name in os.listdir(model_path):
        if name not in REWRITTEN:
            os.symlink(os.path.join(os.path.abspath(model_path), name), os.path.join(into, name))

    def rewrite(name: str, change) -> None:
        source = os.path.join(model_path, name)
        if os.path.isfile(source):
            with open(source) as f:
                content = json.load(f)
            change(content)
            with open(os.path.join(into, name), "w") as f:
                json.dump(content, f)

    def theta(config: dict) -> None:
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]

    def tokenizer_class(config: dict) -> None:
        if config.get("tokenizer_class") in (None, "TokenizersBackend"):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"

    def merges(tokenizer: dict) -> None:
        model = tokenizer.get("model", {})
        if model.get("merges"):
            model["merges"] = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]

    rewrite("config.json", theta)
    rewrite("tokenizer_config.json", tokenizer_class)
    rewrite("tokenizer.json", merges)
    return into
