"""One validator for every settings dataclass: each class keeps a table `RULES` (field -> Rule) of the numbers'
ranges and of the runs each flag applies to, and this module checks them for every run alike (structured,
sparse and dynamic pruning, fine-tuning). The table lives on the class, not in the fields' metadata, because
transformers' HfArgumentParser hands a field's metadata to argparse as keyword arguments.

    RULES = {"seq_len": Rule(low=2), "d2_r1": Rule(low=0, applies=("d2prune",))}

- `low`/`high` bound a number (`low_open`/`high_open` exclude the bound); nan and inf are always refused; a field
  at its default is trusted (0 often means "the default size"). A number field without a rule is a mistake:
  tests/test_validate.py finds any, and tries nan, inf, -1 and 0 on every rule.
- `applies`: the run kinds that use the flag; given (away from its default) in any other run, it is refused with
  one line naming the run and what the flag needs, instead of being silently ignored.
A settings class calls `check_ranges(self)` first in `__post_init__` and, once it knows what the run is,
`check_applies(self)`: its `kinds()` names the run's kinds, `KINDS` what each means, `run_text()` the run.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields


@dataclass(frozen=True)
class Rule:
    """A number's valid values (low <= v <= high, strict where open; None = unbounded) and the run kinds a flag
    applies to (None = every run)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    applies: tuple[str, ...] | None = None

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None

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
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


def default_of(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_ranges(cfg) -> None:
    """Every number of `cfg` finite and in its range; a ValueError of one line otherwise (the parser turns it
    into `error: ...`, exit 2)."""
    rules = type(cfg).RULES
    for f in fields(cfg):
        value, rule = getattr(cfg, f.name), rules.get(f.name)
        if rule is None or not rule.bounded or not is_number(value) or value == default_of(f):
            continue
        if not rule.holds(value):
            raise ValueError(f"--{f.name} must be {rule.text()} (got {value!r})")


def check_applies(cfg) -> None:
    """No flag given (away from its default) that this run does not use."""
    kinds, rules = set(cfg.kinds()), type(cfg).RULES
    for f in fields(cfg):
        applies = rules[f.name].applies if f.name in rules else None
        if applies is not None and not kinds & set(applies) and getattr(cfg, f.name) != default_of(f):
            needs = "; or ".join(cfg.KINDS[k] for k in applies)
            raise ValueError(f"{cfg.run_text()} does not combine with --{f.name}: it applies to {needs}; drop it")
