"""One validator for the commands' frozen configs: each field's rule is data, and a value that
breaks it is one line naming the flag, the rule and the value given (an AdlError: exit 2).

    check(cfg, {"batch_size": INT_GE1, "cutoff": Num(0, 1, high_open=True, example="0.005")})
        -> "--cutoff must be in [0, 1), e.g. 0.005 (got 1.5)"
    choice("--pool", "max", POOLS) -> "unknown --pool 'max'; use one of mean, last"

None means "not given" and passes (defaults are resolved later). Booleans are never numbers, and
NaN or infinity never passes a bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from adl.errors import AdlError


def flag_of(name: str) -> str:
    """A config field's command-line flag: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Num:
    """A number in [low, high] (either end open, or absent); ``integer`` for counts."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    example: str = ""

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)):
            return False
        if not math.isfinite(v):
            return False
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def want(self) -> str:
        """The rule in words: "an integer >= 1", "> 0", "in [0, 1)", "an integer in [0, 65535]"."""
        kind = "an integer " if self.integer else ""
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "a number" if not self.integer else ""
        return (kind + text).strip() + (f", e.g. {self.example}" if self.example else "")


INT_GE0 = Num(0, integer=True)
INT_GE1 = Num(1, integer=True)
POSITIVE = Num(0, low_open=True)
NON_NEGATIVE = Num(0)
FRACTION = Num(0, 1, high_open=True)  # dropout-like: [0, 1)


def check(cfg, rules: dict[str, Num], flag: Callable[[str], str] = flag_of) -> None:
    """Every field of ``cfg`` named in ``rules`` is None or keeps its rule; else one AdlError."""
    for name, rule in rules.items():
        v = getattr(cfg, name)
        if v is not None and not rule.ok(v):
            raise AdlError(f"{flag(name)} must be {rule.want()} (got {v!r})")


def choice(flag: str, value, allowed: Iterable) -> None:
    """``value`` is None or one of ``allowed``; else one AdlError listing them."""
    allowed = list(allowed)
    if value is not None and value not in allowed:
        raise AdlError(f"unknown {flag} {value!r}; use one of {', '.join(map(str, allowed))}")
