"""Files: digests and fingerprints, the importance cache (safetensors + JSON, no pickles)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from utils.atomic import atomic_dir
from utils.errors import first_line

log = logging.getLogger("hfprune")


def digest(obj) -> str:
    """Stable SHA-256 of a JSON-able object or bytes."""
    h = hashlib.sha256()
    h.update(obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """Identity of the weights: config plus the exact bytes of an evenly strided sample of every tensor.

    Cheap on a 70B model yet changed by any fine-tune; independent of where the folder lives.
    """
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples_per_tensor)]
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.contiguous().cpu().view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def save_importance(folder: Path, scores: list[torch.Tensor], meta: dict, extra: dict | None = None) -> None:
    """Neuron scores as `layer.{i}` fp64 tensors (and other structures' as `structure.<name>`) in safetensors,
    settings in JSON, written atomically."""
    with atomic_dir(folder) as tmp:
        tensors = {f"layer.{i}": s.detach().to("cpu", torch.float64).contiguous() for i, s in enumerate(scores)}
        tensors |= {
            f"structure.{k}": v.detach().to("cpu", torch.float64).contiguous() for k, v in (extra or {}).items()
        }
        save_file(tensors, str(tmp / "importance.safetensors"), metadata={"format": "hfprune-importance-v1"})
        (tmp / "importance.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def load_importance(folder: Path) -> tuple[list[torch.Tensor], dict, dict] | None:
    """Neuron scores, metadata and other structures' scores from `save_importance`; None if the folder is not a
    complete entry, or (with a warning) a damaged one: it is then recomputed and replaced atomically."""
    st, js = folder / "importance.safetensors", folder / "importance.json"
    if not (st.is_file() and js.is_file()):
        return None
    try:
        tensors = load_file(str(st))
        meta = json.loads(js.read_text())
        n_layers = sum(k.startswith("layer.") for k in tensors)
        scores = [tensors[f"layer.{i}"] for i in range(n_layers)]
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # JSONDecodeError is a ValueError
        log.warning("importance cache entry %s is damaged (%s): recomputing it", folder, first_line(err))
        return None
    if not isinstance(meta, dict):
        log.warning("importance cache entry %s is damaged (its JSON is not a mapping): recomputing it", folder)
        return None
    extra = {k.removeprefix("structure."): v for k, v in tensors.items() if k.startswith("structure.")}
    return scores, meta, extra
