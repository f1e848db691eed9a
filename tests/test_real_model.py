"""The real small model: SmolLM2-135M-Instruct pruned 20% on C4 windows, judged on WikiText-2."""

import json
import math

import pytest
from conftest import DATA
from transformers import AutoModelForCausalLM, AutoTokenizer

import prune
from dataset.calibration import load_documents
from utils.perplexity import perplexity, text_windows

pytestmark = pytest.mark.slow


def held_out_perplexity(folder, windows):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return perplexity(model, windows, batch_size=4, progress=False)["perplexity"]


def test_entropy_pruned_smollm2_is_worse_than_dense_and_better_than_random(smollm2_dir, tmp_path):
    common = ["--origin_path", str(smollm2_dir), "--pruning_ratio", "0.2", "--calib_samples", "16",
              "--seq_len", "256", "--batch_size", "4", "--importance_cache", str(tmp_path / "cache"),
              "--calib_dataset", str(DATA / "c4" / "c4_validation_2k.jsonl"), "--no_progress"]  # fmt: skip
    for criterion in ("entropy", "random"):
        assert prune.main([*common, "--criterion", criterion, "--output_dir", str(tmp_path / criterion)]) == 0
    report = json.loads((tmp_path / "entropy" / "prune_report.json").read_text())
    assert report["intermediate_size"] < 1536 and abs(report["achieved_ratio"] - 0.2) < 1e-3
    assert report["calib_tokens"] == 16 * 256

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    wiki = load_documents(str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    windows = text_windows(tokenizer, wiki, 512)[:8]
    dense = held_out_perplexity(smollm2_dir, windows)
    entropy = held_out_perplexity(tmp_path / "entropy", windows)
    random = held_out_perplexity(tmp_path / "random", windows)
    print(f"WikiText-2 perplexity (8 x 512 tokens): dense {dense:.2f}, entropy {entropy:.2f}, random {random:.2f}")
    assert math.isfinite(entropy)
    assert dense < entropy < random
