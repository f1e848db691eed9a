"""Tiny stand-ins that need no download: a byte-level BPE tokenizer trained on given text (the tests and the GPU
check's `--tiny` mode give it the built-in standard-library prose), and a random Llama of any shape."""

from __future__ import annotations

import torch


def train_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer of `vocab_size` tokens (EOS `<eos>`) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def random_llama(shape: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight Llama with the config keys in `shape`, built directly on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**{"max_position_embeddings": 4096, **shape})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
