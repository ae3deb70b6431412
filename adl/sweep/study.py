"""The sweep's Optuna study: storage URLs, the cache check, claiming trials, resume after a kill.

Storage (``--storage``):

    default                  sqlite:///<out>/study.db (one machine; several local workers are fine)
    journal:PATH             optuna JournalStorage(JournalFileBackend(PATH)): an append-only file,
                             the robust choice for several local processes
    postgresql://... etc.    any SQLAlchemy URL Optuna's RDBStorage takes (several machines)

The study remembers what it is for (study user attribute ``adl``): the cache's manifest hash,
the sweep definition (base config + search space) and the selection metric. Opening it with a
different cache or a different sweep definition is refused; nothing is changed or deleted.

Claiming work, grid search. Grid points are ordered so that points sharing a group shape are
neighbours (``SweepSpace.points``). Trial number i < n is point i (``OrderedGridSampler``:
trial numbers are handed out atomically by the storage, so two workers never get the same
number); a point to be redone is re-queued with ``enqueue_trial`` and Optuna pops a queued
trial atomically. So every point is claimed once, whatever the number of workers. A worker
asks for up to ``group_size`` trials and stops at the first point of another shape (kept for
its next batch). Optuna's own GridSampler is not used: it shuffles the grid (scattering shapes)
and counts a failed point as visited, so a killed point would never be retried.

TPE search. Each worker asks while finished + running trials < ``--trials``, a batch at a
time (TPE with ``constant_liar`` so running trials repel new ones); concurrent workers may
overshoot the count by up to a batch each.

Resume. A worker tags each trial it claims with ``adl_worker`` = host:pid:start-time. On start,
RUNNING trials tagged with this host whose process is gone (or whose pid now belongs to
another process) are marked FAIL and their points re-queued (grid) or simply replaced by new
trials (TPE). Ctrl-C re-queues a worker's own unfinished trials at once. Trials left RUNNING by
a worker killed on *another* machine are not touched: rerun any worker on that machine.
COMPLETE trials are never rerun.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from adl.errors import AdlError

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- storage ---------------------------------------------------------------------------------

def default_storage(out: Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def safe_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_storage(url: str):
    """An Optuna storage for ``url``; a URL that cannot be opened or reached is an AdlError."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise AdlError(f"cannot open journal storage {path}: {e.strerror or e}; check the path") from None
    url = _with_driver(url)
    if url.startswith("sqlite:///"):
        return _sqlite(url)
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as e:  # SQLAlchemy/driver errors differ by backend; all mean "cannot use this URL"
            error = e
            if type(e).__name__ != "IntegrityError" and "already exists" not in str(e):
                break
            time.sleep(0.5 + attempt)  # two workers created the tables of a new database at once
    raise _unusable(url, error)


def _unusable(url: str, error: Exception) -> AdlError:
    msg = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return AdlError(f"cannot open study storage {safe_url(url)}: {safe_url(msg)[:300]}; check the URL, "
                    "that the database server is running and reachable, and its driver is installed")


def _sqlite(url: str):
    """RDBStorage on a SQLite file, safe for several local workers.

    pysqlite starts a transaction only at the first write, so Optuna's read-check-write steps
    (popping a queued trial, failing a stale one) could interleave between processes. Every
    transaction here begins with BEGIN IMMEDIATE (SQLAlchemy's documented recipe), which takes
    the write lock up front and serialises them; a file lock serialises creating the tables.
    """
    import sqlalchemy
    from filelock import FileLock

    path = Path(url[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    except Exception as e:  # noqa: BLE001
        raise _unusable(url, e) from None
    engine = storage.engine

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections predate the listeners
    return storage


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg 3; use psycopg2 when only that one is installed."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and sep and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


# ---- the worker's identity (for resume) ----------------------------------------------------

def _start_ticks(pid: int) -> str:
    """The process start time in clock ticks since boot (Linux), '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def worker_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def worker_gone(worker: str) -> bool:
    """True when ``worker`` (host:pid:ticks) ran on this host and that process no longer exists."""
    host, _, rest = worker.partition(":")
    pid, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by someone else
    return bool(ticks) and _start_ticks(int(pid)) not in ("", ticks)  # pid reused by another process


# ---- the grid sampler ----------------------------------------------------------------------

class OrderedGridSampler(BaseSampler):
    """Trial number i gets grid point i (for i < n); queued trials carry fixed parameters."""

    def __init__(self, points: list[dict]):
        self.points = points

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        if trial.number < len(self.points):
            return self.points[trial.number][name]
        return distribution.choices[0] if isinstance(distribution, CategoricalDistribution) else distribution.low


# ---- the study -----------------------------------------------------------------------------

class SweepStudy:
    """One sweep's study in ``storage``: creation and checks, claiming, telling, resume."""

    def __init__(self, storage_url: str, name: str, meta: dict, space, *, sampler, pruner=None):
        self.url, self.space, self.meta = storage_url, space, meta
        self.storage = open_storage(storage_url)
        try:
            self.study = optuna.create_study(study_name=name, storage=self.storage, sampler=sampler, pruner=pruner,
                                             direction="maximize", load_if_exists=True)
        except Exception as e:  # noqa: BLE001  (a storage that opened but refuses writes)
            raise AdlError(f"cannot create study {name!r} in {safe_url(storage_url)}: {e}") from None
        self._check(meta)
        self.worker = worker_id()
        self._carry = None  # a claimed trial of another shape, first in the next batch

    def _check(self, meta: dict) -> None:
        old = self.study.user_attrs.get("adl")
        if old is None:
            self.study.set_user_attr("adl", meta)
            return
        where = f"study {self.study.study_name!r} in {safe_url(self.url)}"
        if old["cache_hash"] != meta["cache_hash"]:
            raise AdlError(f"the cache changed since {where} started (manifest hash {old['cache_hash'][:12]} -> "
                           f"{meta['cache_hash'][:12]}); sweep the new cache into a new --out (or --study), "
                           "the old study is kept")
        if old["digest"] != meta["digest"]:
            raise AdlError(f"{where} was started by a different sweep (other hyperparameters or values); "
                           "rerun that sweep's exact command, or use a new --out (or --study)")

    # -- resume ----------------------------------------------------------------------------
    def recover(self) -> int:
        """Mark trials of dead local workers FAIL and re-queue their grid points; returns how many."""
        n = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get("adl_worker")
            if worker and worker != self.worker and worker_gone(worker):
                n += self._fail_and_requeue(t, "worker gone")
        return n

    def _fail_and_requeue(self, t, why: str) -> int:
        try:
            self.storage.set_trial_user_attr(t._trial_id, "adl_released", why)
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            return 0  # another worker got there first
        point = t.user_attrs.get("adl_point")
        if self.space.search == "grid" and point is not None:
            self.study.enqueue_trial(self.space.points[point], user_attrs={"adl_point": point})
        return 1

    def release(self, trials: list) -> None:
        """Give back claimed, unfinished trials (Ctrl-C, an error): FAIL + re-queue their points."""
        if self._carry is not None:
            trials, self._carry = list(trials) + [self._carry], None
        for trial in trials:
            frozen = self.storage.get_trial(trial._trial_id)
            if frozen.state == TrialState.RUNNING:
                self._fail_and_requeue(frozen, "worker interrupted")

    # -- claiming ----------------------------------------------------------------------------
    def claim(self, max_n: int) -> list:
        """Up to ``max_n`` trials (optuna Trial objects, params suggested) for this worker."""
        return self._claim_grid(max_n) if self.space.search == "grid" else self._claim_tpe(max_n)

    def _claim_grid(self, max_n: int) -> list:
        out = [self._carry] if self._carry is not None else []
        self._carry = None
        points = self.space.points
        if not out and not self._grid_left(len(points)):
            return []
        while len(out) < max_n:
            trial = self.study.ask()
            idx = trial.user_attrs.get("adl_point", trial.number if trial.number < len(points) else None)
            if idx is None:  # grid exhausted between the check and the ask: give this one back
                trial.set_user_attr("adl_released", "surplus")
                self.study.tell(trial, state=TrialState.FAIL)
                break
            self._tag(trial, idx)
            for name, values in self.space.grid.items():
                trial.suggest_categorical(name, values)
            if out and self.space.shape_of(idx) != self.space.shape_of(out[0].user_attrs["adl_point"]):
                self._carry = trial
                break
            out.append(trial)
        return out

    def _grid_left(self, n: int) -> bool:
        trials = self.study.get_trials(deepcopy=False)
        return len(trials) < n or any(t.state == TrialState.WAITING for t in trials)

    def _claim_tpe(self, max_n: int) -> list:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        taken = len(self.study.get_trials(deepcopy=False, states=states))
        out = []
        while len(out) < max_n and taken + len(out) < self.space.trials:
            trial = self.study.ask()
            self._tag(trial, None)
            for name, dim in self.space.dims.items():
                dim.suggest(trial, name)
            out.append(trial)
        return out

    def _tag(self, trial, idx) -> None:
        trial.set_user_attr("adl_worker", self.worker)
        if idx is not None and "adl_point" not in trial.user_attrs:
            trial.set_user_attr("adl_point", idx)

    # -- telling -----------------------------------------------------------------------------
    def finish(self, trial, record: dict, value: float | None, state: TrialState) -> None:
        """Store the trial's record (user attribute ``adl_result``), then its state and value."""
        trial.set_user_attr("adl_result", record)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)

    def records(self) -> list[dict]:
        return study_records(self.study)

    def progress(self) -> dict:
        return study_progress(self.study)


def study_records(study) -> list[dict]:
    """Every finished trial with a record: {trial, state, **record}, by trial number."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rec = t.user_attrs.get("adl_result")
        if rec is not None and t.state.is_finished():
            rows.append({"trial": t.number, "state": t.state.name.lower(), **rec})
    return rows


def study_progress(study) -> dict:
    """{state: count} over the study's trials (surplus asks given straight back are not counted)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("adl_released") != "surplus":
            counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts
