"""The output guard every entry script and study uses before anything loads: an output never touches an input,
its location is usable, and one run at a time writes it.

- `check_output`: refuse an output that equals, contains or lies inside any input path of the run (the model,
  the teacher, adapters, calibration, training and evaluation data, caches), that is a file, or that exists
  without --overwrite; and find out now, not after hours of work, whether its folder can be created there
  (an existing file on the way, a folder this user cannot write in).
- `claim`: an exclusive claim on the output for the whole run, a lock file `.NAME.lock` created with O_EXCL
  and holding its writer (`<host>-<pid>-<start>`, as utils/atomic.py tags its folders); a second run gets one
  line at once; a claim whose writer died (kill -9) is taken over, one from another host is left alone
  (its writer cannot be checked from here: remove it by hand once that job has ended).
`--overwrite` itself never deletes anything early: the new output is written beside the old one and replaces it
in one rename at the end (utils/atomic.py), the old one put back if that rename fails.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from utils.atomic import clear_leftovers, writer_alive, writer_tag
from utils.errors import UserError

log = logging.getLogger("hfprune")


INPUT_NAMES = {"--origin_path": "source model folder", "--model": "model folder", "--distill_from": "teacher",
               "--calib_dataset": "calibration data", "--eval_text": "evaluation text",
               "--dataset_name": "training data", "--importance_cache": "importance cache",
               "--data_cache": "tokenized-data cache"}  # fmt: skip


class OutputError(UserError):
    """An output location that must not or cannot be written."""


def local_paths(inputs: dict[str, object]) -> list[tuple[str, Path]]:
    """The inputs that are paths on this machine, resolved, by flag: a string that names an existing file or
    folder (another string may be a hub id), and every Path (a folder the run creates, such as a cache)."""
    found = []
    for flag, value in inputs.items():
        if value in (None, "") or (isinstance(value, str) and not Path(value).expanduser().exists()):
            continue
        found.append((flag, Path(value).expanduser().resolve()))
    return found


def check_output(output: Path, inputs: dict[str, object], overwrite: bool, flag: str = "--output_dir",
                 existing_ok: bool = False) -> None:  # fmt: skip
    """One line for an output that would touch an input, is a file, exists without `overwrite` (unless
    `existing_ok`: a run that resumes in it), or cannot be created where it is. Writes nothing (a probe folder
    is created and removed)."""
    out = Path(output).expanduser().resolve()
    clear_leftovers(out)
    for name, path in local_paths(inputs):
        what = f"{INPUT_NAMES.get(name, 'input')} {path} ({name})"
        if out == path:
            raise OutputError(f"{flag} {output} is the {what}; choose another place")
        if path in out.parents:
            raise OutputError(f"{flag} {output} is inside the {what}; choose another place")
        if out in path.parents:
            raise OutputError(f"{flag} {output} contains the {what}; replacing it would delete that input; choose "
                              "another place")  # fmt: skip
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{flag} {output} is a file, not a folder; choose another place")
        if not (overwrite or existing_ok):
            raise OutputError(f"{flag} {output} already exists; pass --overwrite to replace it")
    check_creatable(out, flag)


def check_creatable(out: Path, flag: str) -> None:
    """The nearest existing folder above `out` takes a new entry (outputs are written beside their place)."""
    above = out.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"{flag} {out}: {above} is a file, so no folder can be created below it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=above))
    except OSError as err:
        raise OutputError(f"{flag} {out}: cannot create anything in {above} ({err.strerror})") from None


def check_cache(cache: str | None, flag: str) -> None:
    """A cache folder (written after the work it saves) must be a folder, creatable and writable, now."""
    if not cache:
        return
    path = Path(cache).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {cache} is a file, not a folder")
    if path.is_dir():
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=path))
        except OSError as err:
            raise OutputError(f"{flag} {cache}: cannot write in it ({err.strerror})") from None
    else:
        check_creatable(path, flag)


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


def _holder(lock: Path) -> tuple[str, int, int] | None:
    """(host, pid, start) of the writer holding `lock`, None when the file is unreadable or malformed."""
    try:
        host, pid, start = lock.read_text().strip().rsplit("-", 2)
        return host, int(pid), int(start)
    except (OSError, ValueError):
        return None


@contextmanager
def claim(outputs: Iterable[Path], flag: str = "--output_dir") -> Iterator[None]:
    """Hold an exclusive claim on every output for the duration of the `with` block (folders created for the
    lock files are removed again when they end up empty)."""
    held: list[Path] = []
    created: list[Path] = []
    try:
        for output in outputs:
            final = Path(output).expanduser().resolve()
            missing = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
            final.parent.mkdir(parents=True, exist_ok=True)
            created += missing
            held.append(_take(final, flag))
        yield
    finally:
        for lock in held:
            lock.unlink(missing_ok=True)
        for folder in created:  # deepest first; one that is not empty holds the run's output (or another's)
            with suppress(OSError):
                folder.rmdir()


def _take(final: Path, flag: str) -> Path:
    lock = lock_path(final)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            alive = writer_alive(*holder) if holder else False
            if alive:
                raise OutputError(f"{flag} {final} is being written by another run (pid {holder[1]} on this "
                                  "machine); wait for it to end or choose another place") from None  # fmt: skip
            if alive is None:
                raise OutputError(f"{flag} {final} is claimed by a run on host {holder[0]} (pid {holder[1]}), which "
                                  f"cannot be checked from {socket.gethostname()}; once that job has ended, remove "
                                  f"{lock}") from None  # fmt: skip
            log.warning("taking over %s: its writer (%s) no longer runs", lock, f"pid {holder[1]}" if holder else "?")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(writer_tag() + "\n")
        return lock
    raise OutputError(f"{flag} {final}: could not claim {lock}; another run keeps taking it")
