"""One validator for every settings dataclass: ranges and where a flag applies are declared beside the field,
in its metadata, and checked here for every mode alike (structured, sparse, dynamic pruning; fine-tuning).

    calib_samples: int = field(default=0, metadata=rule("Calibration windows.", low=0))
    d2_r1: float = field(default=1.0, metadata=rule("D²Prune's lambda_1.", low=0, applies=("d2prune",)))

- `low`/`high` bound a number (`low_open`/`high_open` exclude the bound); nan and inf are always refused, so
  a number field without a rule is a mistake (tests/test_validate.py finds any);
- `applies`: the run kinds the flag is used by; given (not at its default) in any other run, it is refused
  with one line naming the run and what the flag needs, instead of being silently ignored.
A settings class names its run's kinds in `kinds()` and what each kind means in `KINDS`, and calls
`check_fields(self)` first in `__post_init__`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields


@dataclass(frozen=True)
class Range:
    """The valid values of a number: low <= v <= high (strict where open); None = unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g} and finite"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


def rule(help: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False, applies: tuple[str, ...] | None = None, number: bool = False) -> dict:  # fmt: skip
    """A field's metadata: its help, its range (`number=True` for a number with no bound but finiteness) and the
    run kinds it applies to (None: every run)."""
    meta: dict = {"help": help}
    if number or low is not None or high is not None:
        meta["range"] = Range(low, high, low_open, high_open)
    if applies is not None:
        meta["applies"] = tuple(applies)
    return meta


def default_of(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_fields(cfg) -> None:
    """Every number of `cfg` in its range, and no flag given that the run (`cfg.kinds()`) does not use; a
    ValueError of one line otherwise (the parser turns it into `error: ...`, exit 2)."""
    kinds = set(cfg.kinds())
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        rng = f.metadata.get("range")
        if rng is not None and is_number(value) and not rng.holds(value):
            raise ValueError(f"--{f.name} {value!r} is not valid; it must be {rng.text()}")
        applies = f.metadata.get("applies")
        if applies is not None and not kinds & set(applies) and value != default_of(f):
            needs = " or ".join(cfg.KINDS[k] for k in applies)
            raise ValueError(f"--{f.name} does not apply to this run ({cfg.run_text()}); it is used by {needs}; "
                             "drop it")  # fmt: skip
