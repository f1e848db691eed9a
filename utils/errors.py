"""Bad user input: one exception type, its one-line message, and the exit status entry points give it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(ValueError):
    """An input (flag, file, model, size) that cannot be used; the message names it and what is valid."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error message (or its type), for a one-line error of our own; a first line
    that ends in a colon is joined with the line that says what follows it."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def run_cli(action: Callable[[], object]) -> int:
    """Run an entry point's body: a UserError becomes one `error: ...` line on stderr and exit status 2."""
    try:
        action()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
