"""SweepConfig and the search space: which TrainConfig hyperparameters a sweep varies, and how.

Values on the command line (one flag per TrainConfig hyperparameter, ``--lambda`` for lam):

    --alpha 16,64,128        a list: grid values (``--search grid``, the default) or TPE choices
    --alpha 8:256:log        a range lo:hi (uniform) or lo:hi:log: ``--search tpe`` only
    --dropout 0.1            one value: fixed for the whole sweep (not a sweep dimension)
    --seeds 3                every point with seeds base, base+1, base+2 (a grid dimension "seed")

A point is a dict of swept values; its configuration is ``dataclasses.replace(base, **point)``,
validated by TrainConfig itself, so a value outside its domain (k < 1, cutoff >= 1, alpha <= 0,
lambda < 0, ...) is refused before anything runs. Grid points are ordered so that points that
can be trained together (same ``group.group_key``: everything but alpha, cutoff, lambda,
lasso, lr, weight decay, patience, lr_patience and max_epochs) are neighbours.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from adl.cache.location import local_folder
from adl.checks import INT_GE1, NON_NEGATIVE, check, choice
from adl.errors import AdlError
from adl.train.config import TrainConfig, flag

# Not hyperparameters: where things are and how the machine runs them.
NOT_SWEPT = ("cache", "out", "device", "overwrite", "memory_gb")
# what may differ between the configurations of one group (adl.sweep.group): per-configuration scalars
GROUP_SCALARS = ("alpha", "cutoff", "lam", "lasso", "lr", "weight_decay", "patience", "lr_patience", "max_epochs")
SWEEPABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_SWEPT)
SEARCHES = ("grid", "tpe")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@functools.cache
def _hints() -> dict:
    """TrainConfig's field annotations, evaluated once: the CLI asks for each field at every start."""
    return typing.get_type_hints(TrainConfig)


def field_type(name: str) -> type:
    """int, float, bool or str: the TrainConfig field's type without Optional."""
    hint = _hints()[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def _value(name: str, text: str):
    kind, text = field_type(name), text.strip()
    try:
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if kind is int:
            return int(text)
        if kind is float:
            v = float(text)
            if not math.isfinite(v):
                raise ValueError
            return v
        return text
    except ValueError:
        want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise AdlError(f"{flag(name)}: {text!r} is not {want}; e.g. {_example(name)}") from None


def _example(name: str) -> str:
    kind = field_type(name)
    return {bool: f"{flag(name)} true,false", int: f"{flag(name)} 32,64", float: f"{flag(name)} 1e-4,1e-3 or "
            f"{flag(name)} 1e-5:1e-2:log (with --search tpe)"}.get(kind, f"{flag(name)} a,b")


@dataclass(frozen=True)
class Choice:
    """A list of values (grid values, or TPE categorical choices)."""

    values: tuple

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, list(self.values))

    def describe(self):
        return list(self.values)


@dataclass(frozen=True)
class Range:
    """lo:hi[:log] for ``--search tpe``: suggest_float / suggest_int (log scale if ``log``)."""

    lo: float
    hi: float
    log: bool = False
    integer: bool = False

    def suggest(self, trial, name: str):
        if self.integer:
            return trial.suggest_int(name, int(self.lo), int(self.hi), log=self.log)
        return trial.suggest_float(name, self.lo, self.hi, log=self.log)

    def describe(self):
        return f"{self.lo:g}:{self.hi:g}" + (":log" if self.log else "")


def parse_dim(name: str, text: str) -> Choice | Range:
    """'16,64,128' -> Choice; '8:256:log' or '0:0.01' -> Range (numbers only)."""
    if name not in SWEEPABLE:
        raise AdlError(f"{name!r} is not a hyperparameter a sweep can vary; use one of "
                       f"{', '.join(flag(n) for n in SWEEPABLE)}")
    text = (text or "").strip()
    if not text:
        raise AdlError(f"{flag(name)} is empty; give values, e.g. {_example(name)}")
    kind = field_type(name)
    if ":" in text and kind in (int, float):
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
            raise AdlError(f"{flag(name)} {text!r}: a range is lo:hi or lo:hi:log, e.g. {flag(name)} 8:256:log")
        lo, hi = _value(name, parts[0]), _value(name, parts[1])
        if not lo < hi:
            raise AdlError(f"{flag(name)} {text!r}: the range needs lo < hi")
        log = len(parts) == 3
        if log and lo <= 0:
            raise AdlError(f"{flag(name)} {text!r}: a log range needs lo > 0")
        return Range(float(lo), float(hi), log, kind is int)
    items = [t for t in text.split(",")]
    if any(not t.strip() for t in items):
        raise AdlError(f"{flag(name)} {text!r} has an empty value; give comma-separated values, e.g. {_example(name)}")
    values = tuple(dict.fromkeys(_value(name, t) for t in items))  # duplicates dropped, order kept
    return Choice(values)


def parse_space(texts: dict[str, str | None]) -> dict[str, Choice | Range]:
    """{field: CLI text or None} -> {field: Choice | Range} for the fields given."""
    return {name: parse_dim(name, text) for name, text in texts.items() if text is not None}


@dataclass(frozen=True)
class SweepConfig:
    base: TrainConfig = field(metadata={"help": "fixed hyperparameters (and the cache) of every point"})
    space: dict = field(default_factory=dict, metadata={"help": "{field: Choice | Range}"})
    search: str = field(default="grid", metadata={"help": "grid (every point) or tpe (Optuna TPE + median pruner)"})
    trials: int | None = field(default=None, metadata={"help": "tpe: trials in the study (all workers together)"})
    seeds: int = field(default=1, metadata={"help": "repeat every point with seeds seed, seed+1, ..."})
    out: str | None = field(default=None, metadata={"help": "sweep folder (default sweeps/<cache>-<digest>)"})
    storage: str | None = field(default=None, metadata={"help": "Optuna storage URL (default sqlite in --out)"})
    study: str | None = field(default=None, metadata={"help": "study name (default: the --out folder's name)"})
    group_size: int = field(default=16, metadata={"help": "configurations trained together (1 = one by one)"})
    checkpoint_every_s: float = field(default=60.0, metadata={
        "help": "checkpoint a running group at the end of an epoch once this many seconds passed since the last "
                "(0: every epoch)"})
    checkpoints: str | None = field(default=None, metadata={
        "help": "where running groups' checkpoints go: a folder, or an object-store URL (s3://bucket/prefix) that "
                "workers on other machines reach (default <out>/checkpoints)"})
    vectorise: bool = field(default=True, metadata={"help": "train a group in one vmapped pass (else fit each)"})
    baselines: str = field(default="auto", metadata={"help": "auto (read or train), off, or a baselines.csv path"})
    top: int = field(default=10, metadata={"help": "rows of the top-configurations table"})

    def __post_init__(self):
        if not isinstance(self.base, TrainConfig):
            raise AdlError("SweepConfig.base must be a TrainConfig")
        choice("--search", self.search, SEARCHES)
        for name, dim in self.space.items():
            _check_dim(self.base, name, dim)
        check(self, {"seeds": INT_GE1, "trials": INT_GE1, "group_size": INT_GE1, "top": INT_GE1,
                     "checkpoint_every_s": NON_NEGATIVE})
        if self.seeds > 1 and "seed" in self.dims:
            raise AdlError("give either --seed with several values or --seeds N, not both")
        if self.search == "grid":
            ranges = [n for n, d in self.space.items() if isinstance(d, Range)]
            if ranges:
                raise AdlError(f"{flag(ranges[0])} is a range: ranges need --search tpe --trials N; "
                               "a grid takes comma-separated values")
            if self.trials is not None:
                raise AdlError("--trials applies to --search tpe; a grid runs every point")
        elif self.trials is None:
            raise AdlError("--search tpe needs --trials N (N >= 1): how many configurations to try")
        if not self.dims and self.seeds == 1:
            raise AdlError("nothing to sweep: give at least one hyperparameter with several values "
                           "(e.g. --alpha 16,64,128) or --seeds N")
        if self.baselines not in ("auto", "off") and not Path(self.baselines).exists():
            raise AdlError(f"--baselines {self.baselines}: no such file; give a baselines.csv (or its folder), "
                           "auto or off")

    @property
    def dims(self) -> dict:
        """The swept dimensions (a one-value list is a constant, folded into ``fixed``)."""
        return {n: d for n, d in self.space.items() if not (isinstance(d, Choice) and len(d.values) == 1)}

    @property
    def fixed(self) -> TrainConfig:
        """The base with every one-value dimension applied."""
        consts = {n: d.values[0] for n, d in self.space.items() if n not in self.dims}
        return dataclasses.replace(self.base, **consts)

    @property
    def seed_values(self) -> list[int]:
        return [self.base.seed + i for i in range(self.seeds)]

    def config(self, point: dict) -> TrainConfig:
        """The (unresolved) TrainConfig of one point."""
        return dataclasses.replace(self.fixed, **point)

    def definition(self) -> dict:
        """What makes two sweeps the same study (not the cache path, device, budget or workers)."""
        base = {k: v for k, v in dataclasses.asdict(self.fixed).items() if k not in NOT_SWEPT}
        return {"base": base, "space": {n: d.describe() for n, d in sorted(self.dims.items())},
                "search": self.search, "seeds": self.seed_values}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.definition(), sort_keys=True).encode()).hexdigest()[:10]

    def checkpoint_root(self) -> str:
        """Where group checkpoints go: ``--checkpoints`` (a folder or a URL), else <out>/checkpoints."""
        return self.checkpoints.rstrip("/") if self.checkpoints else str(self.out_dir() / "checkpoints")

    def out_dir(self) -> Path:
        return local_folder(self.out, "sweep folders") if self.out else Path("sweeps") / f"{Path(self.base.cache).name}-{self.digest()}"


def _check_dim(base: TrainConfig, name: str, dim) -> None:
    if name not in SWEEPABLE:
        raise AdlError(f"{name!r} is not a hyperparameter a sweep can vary; use one of "
                       f"{', '.join(flag(n) for n in SWEEPABLE)}")
    if isinstance(dim, Choice):
        if not dim.values:
            raise AdlError(f"{flag(name)} has no values; e.g. {_example(name)}")
        for v in dim.values:
            dataclasses.replace(base, **{name: v})  # TrainConfig validates the value's domain
    elif isinstance(dim, Range):
        for v in (dim.lo, dim.hi):
            dataclasses.replace(base, **{name: int(v) if dim.integer else v})
    else:
        raise AdlError(f"{flag(name)}: expected a list or a range, got {dim!r}")


class SweepSpace:
    """The concrete search space the study runs: grid points in group order, or TPE dimensions."""

    def __init__(self, cfg: SweepConfig):
        self.search, self.trials = cfg.search, cfg.trials
        self.dims = dict(sorted(cfg.dims.items()))
        self.grid: dict[str, list] = {}
        self.points: list[dict] = []
        if cfg.search == "grid":
            self.grid = {n: list(d.values) for n, d in self.dims.items()}
            if cfg.seeds > 1:
                self.grid["seed"] = cfg.seed_values
            self.points = _ordered_points(self.grid)
        self.seeds = cfg.seed_values if cfg.search == "tpe" else None  # tpe: each trial runs every seed

    def shape_of(self, idx: int) -> tuple:
        return tuple((n, v) for n, v in sorted(self.points[idx].items()) if n not in GROUP_SCALARS)


def _ordered_points(grid: dict[str, list]) -> list[dict]:
    """Every combination, sorted so points differing only in group scalars are neighbours."""
    names = sorted(grid)
    combos = list(itertools.product(*(range(len(grid[n])) for n in names)))
    shape = [i for i, n in enumerate(names) if n not in GROUP_SCALARS]
    combos.sort(key=lambda c: tuple(c[i] for i in shape))  # stable: scalars keep their order within a shape
    return [{n: grid[n][c[i]] for i, n in enumerate(names)} for c in combos]
