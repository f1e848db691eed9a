"""Output folders that are either complete or absent: written beside their place, renamed into it.

A writer works in a hidden sibling `.NAME.tmp-<host>-<pid>-<start>` and renames it to NAME when done;
replacing an existing NAME first moves it aside to `.NAME.old-<host>-<pid>-<start>`. `<start>` is the
writer's process start time (clock ticks since boot, from /proc), so a pid that the system has given
to another process since is not mistaken for the writer. A writer killed with SIGKILL cannot clean
up, so every later write to the same place first looks at the hidden siblings (`clear_leftovers`):
those of dead writers on this host are removed (a moved-aside old folder whose replacement never
arrived is put back), those of live writers are never touched, and those written from another host
(a shared file system) are left alone with a log line, since their writer cannot be checked from here.
Files are given the user's umask (transformers and safetensors write 0600 files).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("hfprune")
_TAG = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old|part)-(?:(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)|(?P<legacy_pid>\d+))$"
)


def process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot; None if it does not run (0 without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): liveness only
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in () may hold spaces


def writer_tag() -> str:
    """This process as `<host>-<pid>-<start>`."""
    pid = os.getpid()
    return f"{socket.gethostname()}-{pid}-{process_start(pid) or 0}"


def writer_alive(host: str, pid: int, start: int | None) -> bool | None:
    """Whether the writer still runs; None when it ran on another host and cannot be checked."""
    if host != socket.gethostname():
        return None
    now = process_start(pid)
    if now is None:
        return False
    return start is None or now == 0 or now == start  # start None: a legacy tag without start time


def clear_leftovers(final: Path) -> None:
    """Remove the hidden siblings of `final` left by dead writers; put back an old folder moved aside."""
    final = Path(final).resolve()
    if not final.parent.is_dir():
        return
    for p in sorted(final.parent.iterdir()):
        m = _TAG.match(p.name)
        if m is None or m["name"] != final.name:
            continue
        if m["legacy_pid"]:
            host, pid, start = socket.gethostname(), int(m["legacy_pid"]), None
        else:
            host, pid, start = m["host"], int(m["pid"]), int(m["start"])
        alive = writer_alive(host, pid, start)
        if alive:
            continue
        if alive is None:
            log.warning("leaving %s alone: written from host %s, whose processes cannot be checked here", p, host)
        elif m["kind"] == "old" and not final.exists():
            p.rename(final)
            log.warning("restored %s from %s: the writer (pid %d) died while replacing it", final, p.name, pid)
        else:
            remove(p)
            log.warning("removed %s, left by a writer that no longer runs (pid %d)", p, pid)


def apply_umask(root: Path) -> None:
    """Give every file and folder under `root` (itself included) the modes the user's umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def move_aside(final: Path) -> Path | None:
    """Rename an existing `final` to a hidden `.old-` sibling (removed once its replacement is in place)."""
    if not final.exists():
        return None
    old = final.parent / f".{final.name}.old-{writer_tag()}"
    final.rename(old)
    return old


class AppearedError(FileExistsError):
    """`final` appeared while its replacement was being written, and replacing it was not asked for."""


@contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it takes `final`'s place, on failure it is removed. An
    existing `final` is moved aside only at that last step and deleted once the new folder is in place (put
    back if the rename fails); with `replace=False` a `final` that appeared meanwhile is left as it is and
    AppearedError is raised."""
    final = Path(final).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(final)
    tmp = final.parent / f".{final.name}.tmp-{writer_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        if not replace and final.exists():
            raise AppearedError(f"{final} appeared while this run was writing it; the new result was not saved")
        swap_into(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into(new: Path, final: Path) -> None:
    """Put the complete folder `new` in `final`'s place: an existing `final` is moved aside, `new` renamed into
    place, and the old one deleted only then (put back if the rename fails)."""
    old = move_aside(final)
    try:
        new.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        remove(old)


def remove(path: Path) -> None:
    """Delete a file or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a hidden sibling and an atomic rename: readers see the old or the new text."""
    path = Path(path).resolve()
    clear_leftovers(path)
    tmp = path.parent / f".{path.name}.part-{writer_tag()}"
    try:
        tmp.write_text(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
