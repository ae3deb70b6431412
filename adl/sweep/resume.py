"""Taking over a dead worker's group: exactly one worker gathers all of its rows.

A group's trials carry the user attribute ``adl_checkpoint`` = {"path": where its checkpoint
is, "trials": the trial number of each row when the group started}. When its worker dies,
each of its trials is failed and re-queued on its own (Optuna's
``RetryHeartbeatStaleTrialCallback``: a WAITING copy with the same user attributes, whose
``retry_history`` names the trials it retries), and copies are popped one at a time by
whichever worker asks. A group must come back whole to one worker to be resumed, so:

- Row i's *line* is trial ``trials[i]`` and every copy of it; row i is *told* when a trial of
  its line holds a result (``adl_result``), i.e. the configuration was told before the kill.
- The *leader* is the first row not told. A WAITING trial becomes RUNNING once only (the
  storage's atomic pop: ``ask()``, or ``set_trial_state_values`` on that trial), so exactly
  one worker gets the leader's copy: that worker owns the group.
- A worker that pops a copy of another row tries to pop the leader's copy itself; if a peer
  has it, it hands its copy over (user attribute ``adl_handover``, then stops beating it) and
  asks again. The owner pops the group's remaining WAITING copies and takes the handed-over
  ones, then resumes every row from the checkpoint; rows told before the kill train along
  (the group's arithmetic stays that of the uninterrupted run) but are not told again.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

from optuna.exceptions import ExperimentalWarning
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

RUNNING, WAITING = TrialState.RUNNING, TrialState.WAITING
warnings.filterwarnings("ignore", category=ExperimentalWarning, module=__name__)  # retry_history


@dataclass
class Resume:
    """A group this worker owns: its checkpoint's location and each row's trial (None: told)."""

    location: str
    rows: list  # optuna Trial | None, in the order of the checkpoint's rows
    params: list[dict]  # each row's parameters (told rows included)
    whole: bool = True  # False: some row could not be gathered (resume impossible; train those held fresh)

    @property
    def trials(self) -> list:
        return [t for t in self.rows if t is not None]


def _line(t, root: int) -> bool:
    return t.number == root or root in RetryHeartbeatStaleTrialCallback.retry_history(t)


def _newest(trials, root: int):
    """The newest WAITING or RUNNING trial of a row's line, or None."""
    live = [t for t in trials if t.state in (WAITING, RUNNING) and _line(t, root)]
    return max(live, key=lambda t: t.number, default=None)


class Adoption:
    """One worker's attempt to own the group of a checkpointed trial it popped (see module doc)."""

    def __init__(self, study, trial, ck: dict):
        self.study, self.ck, self.roots = study, ck, list(ck["trials"])
        self.mine = {trial.number: trial}

    def run(self, patience_s: float) -> Resume | None:
        """The group (``Resume``) when this worker owns it, None when a peer does (ours handed over)."""
        deadline, owner = time.monotonic() + patience_s, False
        while True:
            trials = [t for t in self.study.study.get_trials(deepcopy=False)
                      if (t.user_attrs.get("adl_checkpoint") or {}).get("path") == self.ck["path"]]
            told = [any(_line(t, r) and t.state.is_finished() and "adl_result" in t.user_attrs for t in trials)
                    for r in self.roots]
            newest = [None if done else _newest(trials, r) for r, done in zip(self.roots, told)]
            untold = [i for i, done in enumerate(told) if not done]
            if not untold:  # cannot happen (a copy exists only for a row not told); be safe
                return Resume(self.ck["path"], [], [], whole=False)
            if not owner:
                owner = self._lead(newest[untold[0]])
                if owner is None:
                    return None
            if owner and self._gather([newest[i] for i in untold]):
                params = [next(t.params for t in trials if _line(t, r)) for r in self.roots]
                return Resume(self.ck["path"], [None if told[i] else self.mine[newest[i].number]
                                                for i in range(len(self.roots))], params)
            if time.monotonic() > deadline:
                return Resume(self.ck["path"], list(self.mine.values()), [], whole=False)
            self.study.recover()  # a stale row not failed yet
            time.sleep(0.2)

    def _lead(self, lead) -> bool | None:
        """True: the leader's copy is ours; None: a peer has it (ours handed over); False: not yet."""
        if lead is None or lead.number in self.roots and lead.state == RUNNING and lead.number not in self.mine:
            return False  # the leader's row has no copy yet (its stale trial is not failed yet)
        if lead.number in self.mine or (lead.state == WAITING and self._pop(lead.number)):
            return True
        if lead.state == WAITING:
            return False  # popped by a peer just now: look again
        for number in list(self.mine):
            self.study.hand_over(number, f"{self.ck['path']}#{number}")
        return None

    def _gather(self, copies) -> bool:
        """Take every untold row's newest copy; True when all are ours."""
        ok = True
        for c in copies:
            if c is None:
                ok = False
            elif c.number in self.mine:
                continue
            elif c.state == WAITING:
                ok = self._pop(c.number) and ok
            elif c.user_attrs.get("adl_handover") == f"{self.ck['path']}#{c.number}":
                self.mine[c.number] = self.study.take(c.number)
            else:
                ok = False  # a peer popped it a moment ago and is about to hand it over
        return ok

    def _pop(self, number: int) -> bool:
        trial = self.study.pop(number)
        if trial is not None:
            self.mine[number] = trial
        return trial is not None

