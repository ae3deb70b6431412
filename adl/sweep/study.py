"""The sweep's Optuna study: the cache check, claiming trials, resume after a kill.

Storage (``--storage``): see adl.sweep.storage.

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

Resume. Dead workers are found by heartbeats, during the sweep and not only at its start:
before every claim a worker fails the stale RUNNING trials of others and re-queues them
(Optuna's ``RetryHeartbeatStaleTrialCallback``, one copy of the trial with its parameters and
grid point, as WAITING; it is also what Ctrl-C uses for a worker's own trials).

- RDB storages (SQLite, PostgreSQL, ...): Optuna's own heartbeat. The storage is opened with
  ``heartbeat_interval``/``grace_period``; a thread of the worker records a heartbeat
  (``record_heartbeat``) for every trial it holds, and ``optuna.storages.fail_stale_trials``
  fails those silent for longer than the grace period and calls the callback.
- The journal storage: Optuna 5.0 has no heartbeat for it, so the same thread stamps a user
  attribute ``adl_heartbeat`` (wall-clock seconds) through the storage, and a RUNNING trial whose
  stamp is older than the grace period is failed and re-queued the same way.
- The ask/tag window: a worker beats a trial before it tags it (``adl_worker``). A RUNNING
  trial that is untagged and older than the grace period was asked by a worker killed in that
  window: it is failed and re-queued too (its grid point follows from its number, its queued
  attributes, or the trial it retries).

- This machine: every worker holds an OS lock while it runs (adl.sweep.liveness) and tags its
  trials with it (``adl_lock``); a trial whose worker's lock is free here is failed and
  re-queued at once, without waiting for the grace period.
- A checkpointed group (``adl_checkpoint``, set by the worker) comes back whole to one worker,
  which resumes it from its checkpoint (adl.sweep.resume): ``claim`` returns it on its own.

Identity is the heartbeat (or the lock), not host name or pid, so containers sharing a host name do not
fail each other's live trials. A worker that was only slow (silent longer than the grace
period) finds its trial finished when it reports: it says so in one line, drops that result
(the re-queued copy counts) and carries on. COMPLETE trials are never rerun.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from adl.errors import AdlError
from adl.sweep import liveness
from adl.sweep.storage import mask, open_storage, safe_url
from adl.sweep.resume import Adoption, Resume

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A worker's heartbeat period for the trials it holds, and the silence after which a RUNNING
# trial is stale (failed and re-queued). Raise the grace period where workers can stall
# (swapping, a paused VM); the environment sets both for a whole cluster.
HEARTBEAT_S = float(os.environ.get("ADL_SWEEP_HEARTBEAT_S", 10))
GRACE_S = float(os.environ.get("ADL_SWEEP_GRACE_S", 60))
# heartbeats with ask/tell (not Study.optimize) are what this module is built on: quiet Optuna's notes on it
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module="optuna")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning, module=__name__)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
RETRY = RetryHeartbeatStaleTrialCallback(max_retry=None)  # re-queues a failed trial as WAITING


# ---- the worker's identity and heartbeat ------------------------------------------------

def worker_id() -> str:
    """host:pid, recorded on the trials a worker holds (for people reading the study; resume
    relies on heartbeats, not on this)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """A daemon thread beating, every HEARTBEAT_S, for the trials (by number) in ``held``."""

    def __init__(self, study: "SweepStudy"):
        self.study, self.held, self._stop = study, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="adl-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for number in list(self.held):
                try:
                    self.study.beat(number)
                except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                    self.held.discard(number)  # finished (by us, or failed as stale by a peer)
                except Exception:  # noqa: BLE001  (a storage hiccup: the next beat retries)
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---- the grid sampler ----------------------------------------------------------------------

def grid_point(trial) -> int:
    """A trial's grid point: the one it was queued with (``adl_point``), else that of the trial it
    retries (a copy of a trial killed before it was tagged), else its number."""
    if "adl_point" in trial.user_attrs:
        return trial.user_attrs["adl_point"]
    retried = RETRY.retried_trial_number(trial)
    return trial.number if retried is None else retried


class OrderedGridSampler(BaseSampler):
    """Trial number i gets grid point i (for i < n); queued trials carry fixed parameters."""

    def __init__(self, points: list[dict]):
        self.points = points

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        idx = grid_point(trial)
        if idx < len(self.points):
            return self.points[idx][name]
        return distribution.choices[0] if isinstance(distribution, CategoricalDistribution) else distribution.low


# ---- the study -----------------------------------------------------------------------------

class SweepStudy:
    """One sweep's study in ``storage``: creation and checks, claiming, telling, resume."""

    def __init__(self, storage_url: str, name: str, meta: dict, space, *, sampler, pruner=None):
        self.url, self.space, self.meta = storage_url, space, meta
        self.storage = open_storage(storage_url, {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S,
                                                  "heartbeat_stale_trial_callback": RETRY})
        try:
            self.study = optuna.create_study(study_name=name, storage=self.storage, sampler=sampler, pruner=pruner,
                                             direction="maximize", load_if_exists=True)
        except Exception as e:  # noqa: BLE001  (a storage that opened but refuses writes)
            raise AdlError(f"cannot create study {name!r} in {safe_url(storage_url)}: "
                           f"{mask(str(e), storage_url)[:300]}") from None
        self._check(meta)
        self.worker = worker_id()
        self.study_id = self.storage.get_study_id_from_name(self.study.study_name)
        self.rdb = isinstance(self.storage, optuna.storages.RDBStorage)
        self._carry = None  # a claimed trial of another shape, first in the next batch
        self.lock = liveness.WorkerLock()  # released by the kernel if this process dies
        self.heartbeat = Heartbeat(self)

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

    # -- heartbeat and resume -------------------------------------------------------------
    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def beat(self, number: int) -> None:
        """One heartbeat of trial ``number`` (see the module docstring)."""
        if self.rdb:
            self.storage.record_heartbeat(self.trial_id(number))
        else:
            self.storage.set_trial_user_attr(self.trial_id(number), "adl_heartbeat", time.time())

    def recover(self) -> int:
        """Fail the stale RUNNING trials of other workers and re-queue them; returns how many."""
        before = self._waiting()
        self._fail_dead_local()
        if self.rdb:
            optuna.storages.fail_stale_trials(self.study)  # Optuna's heartbeat; RETRY re-queues
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in self.heartbeat.held or t.datetime_start is None:
                continue
            last = t.user_attrs.get("adl_heartbeat", t.datetime_start.timestamp())
            untagged = "adl_worker" not in t.user_attrs  # killed between ask and tag
            if now - (t.datetime_start.timestamp() if untagged else last) > GRACE_S and (untagged or not self.rdb):
                self._fail_and_requeue(t, "stale: no heartbeat")
        return max(0, self._waiting() - before)

    def _fail_dead_local(self) -> None:
        """Fail and re-queue at once the trials of workers of this machine that died (``liveness``)."""
        dead = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            name = t.user_attrs.get("adl_lock")
            if t.number not in self.heartbeat.held and name and dead.setdefault(name, liveness.dead(name)):
                self._fail_and_requeue(t, "dead: its worker on this machine stopped")
        for name, gone in dead.items():
            if gone:
                liveness.forget(name)

    def _waiting(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _fail_and_requeue(self, frozen, why: str) -> None:
        try:
            self.storage.set_trial_user_attr(self.trial_id(frozen.number), "adl_released", why)
            self.study.tell(frozen.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            return  # finished meanwhile, or another worker got there first
        RETRY(self.study, frozen)  # the copy taken before the release note

    def release(self, trials: list) -> None:
        """Give back claimed, unfinished trials (Ctrl-C, an error): FAIL + re-queue their points."""
        if self._carry is not None:
            trials, self._carry = list(trials) + [self._carry], None
        for trial in trials:
            self.heartbeat.held.discard(trial.number)
            frozen = self.storage.get_trial(self.trial_id(trial.number))
            if frozen.state == TrialState.RUNNING:
                self._fail_and_requeue(frozen, "worker interrupted")

    def running_elsewhere(self) -> int:
        """RUNNING trials this worker does not hold (other workers', live or not yet stale)."""
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return sum(t.number not in self.heartbeat.held for t in running)

    def wait(self) -> None:
        time.sleep(HEARTBEAT_S)

    def close(self) -> None:
        self.heartbeat.stop()
        self.lock.release()

    # -- claiming ----------------------------------------------------------------------------
    def claim(self, max_n: int) -> "Claim":
        """Up to ``max_n`` trials (optuna Trial objects, params suggested) for this worker; or,
        when it pops a trial of a dead worker's checkpointed group and wins that group, the whole
        group to resume (``Claim.resume``, see adl.sweep.resume)."""
        out: list = []
        while len(out) < max_n:
            trial, self._carry = self._carry or self._next(first=not out), None
            if trial is None:
                break
            ck = trial.user_attrs.get("adl_checkpoint")
            if out and (ck or self._other_shape(trial, out[0])):
                self._carry = trial
                break
            if ck:
                resume = Adoption(self, trial, ck).run(patience_s=max(2 * GRACE_S, 10.0))
                if resume is not None:
                    return Claim(resume.trials, resume)
                continue  # handed over to the worker that owns that group
            out.append(trial)
        return Claim(out)

    def _other_shape(self, trial, first) -> bool:
        return self.space.search == "grid" and \
            self.space.shape_of(trial.user_attrs["adl_point"]) != self.space.shape_of(first.user_attrs["adl_point"])

    def _next(self, first: bool):
        """One more trial, asked, tagged and with its parameters; None when there is none to ask."""
        if self.space.search == "grid":
            n = len(self.space.points)
            if first and not self._grid_left(n):
                return None
            trial = self._ask()
            idx = self._point(trial, n)
            if idx is None:  # grid exhausted between the check and the ask: give this one back
                trial.set_user_attr("adl_released", "surplus")
                self.heartbeat.held.discard(trial.number)
                self.study.tell(trial, state=TrialState.FAIL)
                return None
            self._tag(trial, idx)
            for name, values in self.space.grid.items():
                trial.suggest_categorical(name, values)
            return trial
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        if len(self.study.get_trials(deepcopy=False, states=states)) >= self.space.trials:
            return None  # (counts this worker's claimed trials too: they are RUNNING)
        trial = self._ask()
        self._tag(trial, None)
        for name, dim in self.space.dims.items():
            dim.suggest(trial, name)
        return trial

    def _grid_left(self, n: int) -> bool:
        trials = self.study.get_trials(deepcopy=False)
        return len(trials) < n or any(t.state == TrialState.WAITING for t in trials)

    def _ask(self):
        """study.ask(), beaten at once (before it is tagged: see the module docstring)."""
        trial = self.study.ask()
        self.beat(trial.number)
        self.heartbeat.held.add(trial.number)
        return trial

    def _point(self, trial, n: int) -> int | None:
        """The grid point of a claimed trial (``grid_point``), queueing the point it displaces."""
        idx = grid_point(self.storage.get_trial(self.trial_id(trial.number)))
        self._displace(trial.number, idx)
        return idx if idx < n else None

    def _displace(self, number: int, idx: int) -> None:
        """A queued copy that took a number below n displaces point ``number``, which this worker
        queues (only it holds that number)."""
        n = len(self.space.points)
        if idx != number and number < n:
            self.study.enqueue_trial(self.space.points[number], user_attrs={"adl_point": number})

    def _tag(self, trial, idx) -> None:
        trial.set_user_attr("adl_worker", self.worker)
        trial.set_user_attr("adl_lock", self.lock.name)
        if idx is not None and "adl_point" not in trial.user_attrs:
            trial.set_user_attr("adl_point", idx)

    # -- a dead worker's group (adl.sweep.resume) ------------------------------------------------
    def pop(self, number: int):
        """Trial ``number`` if it was WAITING and this worker popped it (atomic in every storage)."""
        tid = self.trial_id(number)
        if not self.storage.set_trial_state_values(tid, TrialState.RUNNING):
            return None
        trial = self.take(number)
        if self.space.search == "grid":  # as ask() + _point would: its number may be a grid point's
            self._displace(number, grid_point(self.storage.get_trial(tid)))
        return trial

    def take(self, number: int):
        """Hold trial ``number`` (RUNNING): beat it, tag it, and return it as an optuna Trial."""
        self.beat(number)
        self.heartbeat.held.add(number)
        trial = optuna.trial.Trial(self.study, self.trial_id(number))
        self._tag(trial, None)
        return trial

    def hand_over(self, number: int, tag: str) -> None:
        """Leave held trial ``number`` to the worker that owns its group (it takes it by ``tag``)."""
        self.storage.set_trial_user_attr(self.trial_id(number), "adl_handover", tag)
        self.heartbeat.held.discard(number)

    def tag_group(self, trials: list, location: str) -> None:
        """Mark a starting group's trials with its checkpoint (``adl_checkpoint``), row by row."""
        ck = {"path": location, "trials": [t.number for t in trials]}
        for t in trials:
            self.storage.set_trial_user_attr(self.trial_id(t.number), "adl_checkpoint", ck)

    # -- telling -----------------------------------------------------------------------------
    def finish(self, trial, record: dict, value: float | None, state: TrialState) -> bool:
        """Store the trial's record (user attribute ``adl_result``), then its state and value.
        False when the trial was failed as stale meanwhile (its re-queued copy counts instead)."""
        self.heartbeat.held.discard(trial.number)
        try:
            trial.set_user_attr("adl_result", record)
            self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            return False
        return True

    def records(self) -> list[dict]:
        return study_records(self.study)

    def progress(self) -> dict:
        return study_progress(self.study)


@dataclass
class Claim:
    """What ``SweepStudy.claim`` hands a worker: trials to train, and a group to resume (or None)."""

    trials: list
    resume: Resume | None = None


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
