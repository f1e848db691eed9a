"""The folder `prune.py --dynamic probe` writes, and loading it back: no weights, only what the per-batch pruning
needs beside the origin model: `dynamic_config.json` (settings, the origin's path and fingerprint, the calibration
it came from), `history.safetensors` (module/dynamic/history.py), `prior.safetensors` with --dynamic_prior
entropy, and the report. Loading checks the origin is still the model the history was measured on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from module.dynamic.history import History
from module.dynamic.wrap import ProbeSettings, ProbeState, attach
from utils.cli import load_model
from utils.errors import UserError

CONFIG = "dynamic_config.json"
HISTORY = "history.safetensors"
FORMAT = "hfprune-dynamic-v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def is_dynamic(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def origin_fingerprint(path: str) -> str | None:
    """Identity of a local model folder, whatever dtype it is later loaded in: its config.json and, per weight file,
    its name, size and 16 evenly spaced 64 KiB samples of its bytes (None for a hub id: its commit is kept)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    h = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for f in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as handle:
            for k in range(16):
                handle.seek(size * k // 16)
                h.update(handle.read(65536))
    return h.hexdigest()


def write_folder(tmp: Path, settings: ProbeSettings, history: History | None, origin: str, model: nn.Module,
                 calibration: dict, prior: list[torch.Tensor] | None = None) -> dict:  # fmt: skip
    """The folder's files into `tmp` (an atomic_dir's staging folder; no history for the variants without one);
    the config written."""
    if history is not None:
        history.save(tmp / HISTORY)
    if prior is not None:
        save_file({f"layer.{i}": p.detach().float().cpu().contiguous() for i, p in enumerate(prior)},
                  str(tmp / "prior.safetensors"))  # fmt: skip
    config = {
        "format": FORMAT,
        "dynamic": "probe",
        "settings": asdict(settings),
        "origin_path": str(Path(origin).resolve()) if Path(origin).is_dir() else origin,
        "origin_fingerprint": origin_fingerprint(origin),
        "origin_commit": getattr(model.config, "_commit_hash", None),
        "model_type": model.config.model_type,
        "calibration": calibration,
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return config


def read_config(path: str | Path) -> dict:
    try:
        config = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable dynamic folder ({CONFIG}: {e})") from None
    if config.get("format") != FORMAT:
        raise UserError(f"{path}/{CONFIG}: format {config.get('format')!r} is not {FORMAT}")
    return config


def origin_of(config: dict, origin: str | None = None) -> str:
    """The origin model of a dynamic folder's config: `origin`, else HFPRUNE_DYNAMIC_ORIGIN, else the recorded path."""
    return origin or os.environ.get("HFPRUNE_DYNAMIC_ORIGIN") or config["origin_path"]


def load_dynamic(
    path: str | Path, device: torch.device, dtype: torch.dtype, device_map: str | None = None,
    trust_remote_code: bool = False, origin: str | None = None,
) -> tuple[nn.Module, ProbeState, dict]:
    """The origin model of a dynamic folder with Probe Pruning attached, its state and the folder's config.
    `origin` (or HFPRUNE_DYNAMIC_ORIGIN) overrides the recorded path when the model moved; the fingerprint must
    still match."""
    config = read_config(path)
    origin = origin_of(config, origin)
    expected = config.get("origin_fingerprint")
    if expected is not None:
        if not Path(origin).is_dir():
            raise UserError(f"{path}: its origin model {origin} is not there (moved? set HFPRUNE_DYNAMIC_ORIGIN)")
        if origin_fingerprint(origin) != expected:
            raise UserError(f"{path}: the model at {origin} is not the one its history was measured on "
                            f"(fingerprint differs)")  # fmt: skip
    model = load_model(origin, device, dtype, trust_remote_code, device_map).eval()
    history = History.load(Path(path) / HISTORY) if (Path(path) / HISTORY).is_file() else None
    prior_file = Path(path) / "prior.safetensors"
    prior = None
    if prior_file.is_file():
        tensors = load_file(str(prior_file))
        prior = [tensors[f"layer.{i}"] for i in range(len(tensors))]
    settings = config["settings"]
    settings = ProbeSettings(**{**settings, "parts": tuple(settings["parts"])})
    state = attach(model, settings, history, prior)
    return model, state, config
