"""Shared pieces of the entry scripts: config parsing (YAML recipe + flags), device/dtype, model loading."""

from __future__ import annotations

from pathlib import Path

import torch

from utils.errors import UserError, first_line

DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def recipe_flags(path: str) -> list[str]:
    """A YAML recipe (keys = flag names) as command-line flags, so later flags override it."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of flag names to values")
    flags = []
    for key, value in data.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        flags += [f"--{key}", str(value)]
    return flags


def expand_recipe(argv: list[str]) -> list[str]:
    """`--config FILE.yaml` anywhere in argv becomes flags placed first, so the other flags override it."""
    argv = list(argv)
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise UserError("--config needs a YAML file")
    return recipe_flags(argv[i + 1]) + argv[:i] + argv[i + 2 :]


def parse_config(cls, argv: list[str]):
    """Parse `argv` into the dataclass `cls`; `--config FILE.yaml` anywhere supplies defaults."""
    from transformers import HfArgumentParser

    argv = expand_recipe(argv)
    parser = HfArgumentParser(cls)
    try:
        (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        raise UserError(str(err)) from None
    return cfg


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} found); use cpu")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, DTYPE_NAMES[dtype]


LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError)  # what from_pretrained raises for a bad path or id


def load_tokenizer(path: str, what: str, trust_remote_code: bool = False):
    """The tokenizer of `path`; a bad path or id becomes one line naming `what` (the flag)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as err:
        raise UserError(f"cannot load {what} {path!r}: {first_line(err)}") from None


def load_causal_lm(path: str, what: str, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
    """The causal LM of `path` in `dtype` (kwargs go to from_pretrained); one line naming `what` on failure."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except LOAD_ERRORS as err:
        raise UserError(f"cannot load {what} {path!r}: {first_line(err)}") from None


def load_model_and_tokenizer(
    path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False, device_map: str | None = None
):
    """The causal LM in `dtype` on `device` (or sharded by `device_map`) and its tokenizer; one-line error."""
    if device_map is None and device.type == "cuda":
        device_map = str(device)
    what = "model --origin_path"
    tokenizer = load_tokenizer(path, what, trust_remote_code)
    model = load_causal_lm(path, what, dtype, trust_remote_code, device_map=device_map)
    if device_map is None:
        model.to(device)
    return model, tokenizer
