"""Shared pieces of the entry scripts: config parsing (YAML recipe + flags), device/dtype, model loading."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from utils.errors import UserError, first_line

log = logging.getLogger("hfprune")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")  # "name" or "org/name"

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


def _recipe_blame(argv: list[str]) -> tuple[str | None, dict[str, str], set[str]]:
    """The --config file of `argv`, the values it sets by key, and the keys given on the command line."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return None, {}, set()
    i = argv.index("--config")
    path = argv[i + 1]
    cli = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv[:i] + argv[i + 2 :] if a.startswith("--")}
    flags = recipe_flags(path)
    return path, {f[2:]: v for f, v in zip(flags[::2], flags[1::2])}, cli


def parse_dataclasses(classes: tuple, argv: list[str]) -> tuple:
    """Parse `argv` (with `--config FILE.yaml` anywhere supplying defaults) into `classes`.

    Every mistake, on the command line or in the recipe, is one UserError line: argparse's own
    errors (a wrong type, a missing value) would print the whole usage block, and a bad recipe key
    would be reported as a flag the user never typed.
    """
    from transformers import HfArgumentParser

    recipe, recipe_values, cli_keys = _recipe_blame(argv)

    def fail(message: str):
        unused = re.search(r"not used by the HfArgumentParser: \['--([\w-]+)", message)
        if unused:
            message = f"unknown flag --{unused[1]} (not used by any setting; see --help)"
        named = unused or re.search(r"^(?:argument )?--(\w+)", message)
        key = named[1] if named else None
        # the recipe's value is parsed first: blame it when the command line lacks the key or holds another value
        if key in recipe_values and (key not in cli_keys or repr(recipe_values[key]) in message):
            message = (
                f"unknown key {named[1]!r}"
                if unused
                else re.sub(r"^(argument )?--\w+(/--[\w-]+)?", f"key {named[1]!r}", message)
            )
            message = f"--config {recipe}: {message}"
        raise UserError(message)

    parser = HfArgumentParser(classes, exit_on_error=False)
    parser.error = fail  # this instance only: one line instead of argparse's usage block and exit
    try:
        return tuple(parser.parse_args_into_dataclasses(args=expand_recipe(argv)))
    except (argparse.ArgumentError, ValueError) as err:
        return fail(str(err))


def parse_config(cls, argv: list[str]):
    """Parse `argv` into the dataclass `cls`; `--config FILE.yaml` anywhere supplies defaults."""
    (cfg,) = parse_dataclasses((cls,), argv)
    return cfg


def parse_device(device: str, flag: str = "--device") -> torch.device:
    """A device that exists here ("auto": cuda if there is one, else cpu), or one line naming `flag`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"{flag} {device!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: no such CUDA device here ({torch.cuda.device_count()} found); use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {device}: only cpu and cuda devices are supported")
    return dev


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = parse_device(device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, DTYPE_NAMES[dtype]


# what from_pretrained raises for a bad path or id, a config it cannot read (huggingface_hub's strict dataclasses
# check every config field's type), or weights that do not fit it
LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, TypeError, RuntimeError, SafetensorError,
               StrictDataclassError)


def _hub_reachable(timeout: float = 5.0) -> str | None:
    """None when the hub (or the HTTPS proxy) accepts a TCP connection, else why not, in a few words."""
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        return f"{url.hostname}: {err.strerror or type(err).__name__}"
    return None


def model_source(path: str, what: str) -> dict:
    """from_pretrained kwargs for `path` once it is known to be loadable; else one line naming `what`.

    A local folder must hold config.json. A string that cannot be a hub id is a missing folder. A hub
    id is looked up only when the hub answers (a short TCP probe, instead of a minute of retries that
    end in a message about the hub); unreachable, a copy in the local hub cache is used.
    """
    where = Path(path).expanduser()
    if where.is_dir():
        if (where / "config.json").is_file():
            return {}
        hint = (
            "it holds a LoRA adapter: pass its base model, or the folder --merge writes"
            if (where / "adapter_config.json").is_file()
            else "not a Hugging Face model folder"
        )
        raise UserError(f"cannot load {what} {path!r}: no config.json in {where} ({hint})")
    if where.exists():
        raise UserError(f"cannot load {what} {path!r}: a file, not a model folder")
    if path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise UserError(f"cannot load {what} {path!r}: no such folder")
    return dict(_hub_source(path, what))


@functools.cache
def _hub_source(path: str, what: str) -> tuple:
    """`model_source` for a hub id, probed once per process (config, tokenizer and weights share it)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
    problem = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_reachable()
    if problem is None:
        return ()
    if cached:
        log.warning("the hub cannot be reached (%s); loading %s from the local hub cache", problem, path)
        return (("local_files_only", True),)
    raise UserError(
        f"cannot load {what} {path!r}: no such folder, and as a hub id it is not in the local cache while the "
        f"hub cannot be reached ({problem})"
    )


def _from_pretrained(auto_class, path: str, what: str, **kwargs):
    """`auto_class.from_pretrained(path)` after `model_source`'s checks; one line naming `what` on failure."""
    kwargs = {**model_source(path, what), **kwargs}
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except LOAD_ERRORS as err:
        raise UserError(f"cannot load {what} {path!r}: {first_line(err)}") from None


def load_config(path: str, what: str, trust_remote_code: bool = False):
    """The model's config (no weights)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, path, what, trust_remote_code=trust_remote_code)


def meta_model(config, trust_remote_code: bool = False, what: str = "model --origin_path"):
    """The model of `config` with no memory behind its weights: shapes for every check before loading."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"cannot build {what} from its config.json: {first_line(err)}") from None


def check_weights(path: str, model, what: str) -> None:
    """The shapes in a local folder's safetensors headers fit `model` (built from its config): a truncated file or
    a config that does not describe the weights (e.g. another vocab_size) is one line before anything loads."""
    from safetensors import safe_open

    folder = Path(path).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or (folder / "adapter_config.json").is_file():
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    shape = tuple(f.get_slice(key).get_shape())
                    if key in expected and expected[key] != shape:
                        raise UserError(f"{what} {path}: {file.name} holds {key} of shape {list(shape)}, but its "
                                        f"config.json describes {list(expected[key])}")  # fmt: skip
        except SafetensorError as err:
            reason = first_line(err)
            raise UserError(f"{what} {path}: {file.name} is not a complete safetensors file ({reason})") from None


def check_context(model, length: int, flag: str, allow_long: bool) -> None:
    """Refuse windows longer than the model's positions: always for a learned position table (it has no
    row for them), and for rotary/other positions unless `allow_long` (they run, untrained, silently)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or length <= limit:
        return
    inputs = model.get_input_embeddings()
    learned = any(isinstance(m, torch.nn.Embedding) and m is not inputs for m in model.modules())
    if learned:
        raise UserError(
            f"{flag} {length} exceeds the model's {limit} positions (a learned position table has no rows "
            f"beyond them); valid: 2..{limit}"
        )
    if not allow_long:
        raise UserError(
            f"{flag} {length} is longer than the model's trained context ({limit} positions); lower it to "
            f"<= {limit}, or pass --allow_long_context to run past it anyway"
        )
    log.warning("%s %d runs past the model's trained context of %d positions (--allow_long_context)", flag, length,
                limit)  # fmt: skip


def load_tokenizer(path: str, what: str, trust_remote_code: bool = False):
    """The tokenizer of `path`; a bad path or id becomes one line naming `what` (the flag)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, path, what, trust_remote_code=trust_remote_code)


def load_causal_lm(path: str, what: str, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
    """The causal LM of `path` in `dtype` (kwargs go to from_pretrained); one line naming `what` on failure."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(
        AutoModelForCausalLM, path, what, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )


def load_model(
    path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False, device_map: str | None = None
):
    """The causal LM in `dtype` on `device` (or sharded by `device_map`); one-line error."""
    if device_map is None and device.type == "cuda":
        device_map = str(device)
    model = load_causal_lm(path, "model --origin_path", dtype, trust_remote_code, device_map=device_map)
    if device_map is None:
        model.to(device)
    return model


def load_model_and_tokenizer(
    path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False, device_map: str | None = None
):
    """`load_model` and the tokenizer of the same folder or hub id."""
    tokenizer = load_tokenizer(path, "model --origin_path", trust_remote_code)
    return load_model(path, device, dtype, trust_remote_code, device_map), tokenizer


def process_state(device: str):
    """This process's place in a launch (accelerate launch, torchrun, or one process). On CPU accelerate only
    joins the processes into a gloo group when asked with cpu=True; without it every rank of a CPU launch
    would believe it is alone and do the whole job."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
