"""run_sweep(cfg): claim trials from the study, train them in shape groups, tell the results.

    cache -> SweepSpace -> SweepStudy (storage, checks, resume) -> loop:
        claim up to group_size trials -> one job per (trial, seed) -> resolve each config
        -> partition by group_key -> fit_group (or trainer.fit one by one) -> tell
    -> results.csv, best.json, table, plots (sweep_report)

Every worker runs this same loop against the same storage; see study.py for how trials are
shared and resumed. ``seconds`` of a trial is its group's wall time divided by the group size.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console

from adl import __version__
from adl.cache import open_cache, write_json
from adl.cache.location import is_url, mask
from adl.errors import AdlError
from adl.sweep.config import SweepConfig, SweepSpace
from adl.sweep import checkpoint
from adl.sweep.group import fit_group, group_key
from adl.sweep.report import baseline_paths, write_outputs
from adl.sweep.resume import Resume
from adl.sweep.storage import default_storage, safe_url
from adl.sweep.study import OrderedGridSampler, SweepStudy
from adl.train.baselines import Views, layer_baselines, write_baselines_csv
from adl.train.config import resolve, view_for
from adl.train.console import epoch_progress
from adl.train.data import TrainData
from adl.train.head_io import make_head
from adl.train.metrics import selection_metric
from adl.train.trainer import FitResult, Solo, TrainingDiverged, fit_all


@dataclasses.dataclass
class Job:
    trial: object  # optuna Trial (None: a resumed row told before the kill, trained along, not told again)
    point: dict  # the swept values (with "seed" when seeds are swept)
    cfg: object  # resolved TrainConfig
    view: str
    first: bool  # the trial's first seed (the one reported to the pruner)
    result: FitResult | None = None
    error: str | None = None
    skipped: bool = False  # a later seed of a pruned trial
    told: bool = False  # its trial was told by this worker (not failed as stale meanwhile)

    @property
    def settled(self) -> bool:
        return self.result is not None or self.error is not None or self.skipped


def _with_seed(data: TrainData, seed: int) -> TrainData:
    """The same loaded arrays with another batch-order seed (SplitData only keeps the seed)."""
    parts = {}
    for name in ("train", "validation", "test"):
        split = getattr(data, name)
        if split is not None:
            split = copy.copy(split)
            split.seed = seed
        parts[name] = split
    return dataclasses.replace(data, **parts)


class Worker:
    """Loads each view once, trains jobs in groups, tells each trial as soon as its jobs are done,
    and checkpoints each running group (``adl.sweep.checkpoint``)."""

    def __init__(self, cfg: SweepConfig, cache, space: SweepSpace, console: Console):
        self.cfg, self.cache, self.space, self.console = cfg, cache, space, console
        self.metric = selection_metric(cache.task)
        self.views = Views(cache, resolve(cfg.fixed, cache))
        self.study: SweepStudy | None = None  # set once the study is open
        self.pending: dict[int, list[Job]] = {}  # trial number -> its jobs, until it is told
        self.values: list[float] = []  # validation values told since the last progress line
        self.stats = {"writes": 0, "bytes": 0, "seconds": 0.0, "epochs": 0, "epoch_seconds": 0.0}
        self.resumed: dict[int, int] = {}  # epoch -> configurations resumed from it
        self.fresh = 0  # configurations started from epoch 0

    def data(self, view: str, seed: int) -> TrainData:
        return _with_seed(self.views.get(view), seed)

    def build(self, job: Job, data: TrainData):
        torch.manual_seed(job.cfg.seed)  # the same initialisation as `adl train` with this seed
        return make_head(job.cfg, data, self.cache.manifest)

    def precheck(self, points: list[dict]) -> None:
        """Build one head per distinct shape, and its optimizer, so a bad combination (k not a
        multiple of heads, a head the cache cannot feed) fails before the study starts, not as
        failed trials. The first optimizer of a process also loads torch's compiler stack
        (``torch.optim`` imports ``torch._dynamo``; seconds of imports): paid here, before this
        worker holds trials that its peers could otherwise train."""
        seen = set()
        for point in points:
            cfg = resolve(self.cfg.config(point), self.cache)
            key = group_key(cfg)
            if key not in seen:
                seen.add(key)
                view = view_for(cfg.head, self.cache, cfg.pool)
                data = self.data(view, cfg.seed)
                Solo(self.build(Job(None, point, cfg, view, True), data), cfg, data.train.device)

    def job(self, trial, point: dict, first: bool) -> Job:
        try:
            cfg = resolve(self.cfg.config(point), self.cache)
            return Job(trial, point, cfg, view_for(cfg.head, self.cache, cfg.pool), first)
        except AdlError as e:
            return Job(trial, point, None, "", first, error=str(e))

    def jobs(self, trials: list) -> list[Job]:
        out = []
        for trial in trials:
            point = dict(trial.params)
            seeds = self.space.seeds or [None]
            out += [self.job(trial, point if seed is None else {**point, "seed": seed}, i == 0)
                    for i, seed in enumerate(seeds)]
        return out

    def run(self, jobs: list[Job]) -> None:
        """Train every job (groups by shape; first seeds first, so pruned trials skip later seeds)."""
        self._expect(jobs)
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.error is None:
                groups.setdefault((not job.first, job.view, group_key(job.cfg)), []).append(job)
        pruned = set()
        size = self.cfg.group_size if self.cfg.vectorise else 1
        for key in sorted(groups, key=lambda k: k[0]):
            for j in groups[key]:
                j.skipped = j.trial.number in pruned
            todo = [j for j in groups[key] if not j.skipped]
            for start in range(0, len(todo), size):
                self._train(todo[start:start + size], pruned)
        self._settle([j.trial for j in jobs])

    def resume(self, resume: Resume) -> None:
        """Train a dead worker's group from its checkpoint, or from scratch when the checkpoint is
        missing, damaged or not this group's (said in one line). Rows told before the kill train
        along (so the others' arithmetic is the uninterrupted run's) and are not told again."""
        if not resume.whole:
            self.run(self.jobs(resume.trials))
            return
        seeds = self.space.seeds or [None]  # a checkpointed trial has one job: its first seed
        jobs = [self.job(trial, params if seeds[0] is None else {**params, "seed": seeds[0]}, True)
                for trial, params in zip(resume.rows, resume.params)]
        self._expect(jobs)
        if any(j.error for j in jobs):
            self._settle(resume.trials)
            return
        payload = self._checkpoint(resume.location, jobs)
        if payload is not None:
            told = sum(j.trial is None for j in jobs)
            self.console.print(f"resuming {_resumable(jobs, payload['state'])} configuration(s) of a stopped worker's "
                               f"group from epoch {payload['epoch']}" +
                               (f" ({told} told before it stopped train along)" if told else "") +
                               f"; checkpoint {mask(resume.location)}", highlight=False, soft_wrap=True)
        self._train(jobs, set(), resume=(resume.location, payload))
        self._settle(resume.trials)

    def _checkpoint(self, location: str, jobs: list[Job]) -> dict | None:
        """The checkpoint of a group of ``jobs``, or None (said why: the group starts from scratch)."""
        try:
            payload = checkpoint.read(location)
            if payload is not None and (payload.get("digest") != self.cfg.digest() or
                                        payload.get("jobs") != [j.point for j in jobs]):
                raise checkpoint.CheckpointDamaged(f"checkpoint {mask(location)} is not this group's")
        except checkpoint.CheckpointDamaged as e:
            self.console.print(f"warning: {e}; starting its {len(jobs)} configuration(s) from scratch",
                               highlight=False, soft_wrap=True)
            return None
        if payload is None:
            where = "" if is_url(location) else " (or it is on another machine's disk: give every worker " \
                "--checkpoints with a URL or a folder they all reach)"
            self.console.print(f"no checkpoint of a stopped worker's group at {mask(location)}: none was "
                               f"written yet{where}; starting its {len(jobs)} configuration(s) from scratch",
                               highlight=False, soft_wrap=True)
        return payload

    def _expect(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.trial is not None:
                self.pending.setdefault(job.trial.number, []).append(job)

    def _settle(self, trials: list) -> None:
        """Tell every trial in ``trials`` whose jobs are all done (each one once)."""
        for trial in dict.fromkeys(t for t in trials if t is not None):
            jobs = self.pending.get(trial.number)
            if jobs and all(j.settled for j in jobs):
                del self.pending[trial.number]
                told, value = _tell(self.study, trial, jobs, self.metric, self.cache.layers, self.console)
                if value is not None:
                    self.values.append(value)
                for j in jobs:
                    j.told = told

    def _train(self, jobs: list[Job], pruned: set, resume: tuple[str, dict | None] | None = None) -> None:
        data = self.data(jobs[0].view, jobs[0].cfg.seed)
        try:
            heads = [self.build(j, data) for j in jobs]
        except AdlError as e:
            for j in jobs:
                j.error = str(e)
            return
        prune, epochs = self.cfg.search == "tpe", set()
        location, payload = resume or (self._new_checkpoint(jobs), None)
        state = None if payload is None else payload["state"]
        saver = None if location is None else checkpoint.Saver(
            location, {"digest": self.cfg.digest(), "jobs": [j.point for j in jobs],
                       "trials": [None if j.trial is None else j.trial.number for j in jobs]},
            self.cfg.checkpoint_every_s)
        if state is None:
            self.fresh += sum(j.trial is not None for j in jobs)
        else:
            self.resumed[state["epoch"]] = self.resumed.get(state["epoch"], 0) + _resumable(jobs, state)

        def on_epoch(i: int, row: dict) -> bool:
            job = jobs[i]
            tick(row[f"val_{self.metric}"])
            epochs.add(row["epoch"])
            self.stats["epoch_seconds"] += row["seconds"]
            if not (prune and job.first):
                return False
            job.trial.report(row[f"val_{self.metric}"], row["epoch"])
            if job.trial.should_prune():
                pruned.add(job.trial.number)
                return True
            return False

        def on_done(i: int, res) -> None:
            job = jobs[i]
            if isinstance(res, TrainingDiverged):
                job.error = str(res)
            else:
                job.result = res
                res.group_size = len(jobs)
            self._settle([job.trial])

        what = f"training {len(jobs)} configuration(s){' together' if len(jobs) > 1 else ''}"
        hooks = dict(on_epoch=on_epoch, on_done=on_done, checkpoint=saver, resume=state)
        with epoch_progress(self.console, what, sum(j.cfg.max_epochs for j in jobs)) as tick:
            if self.cfg.vectorise:
                fit_group(heads, data, [j.cfg for j in jobs], **hooks)
            else:
                fit_all(Solo(heads[0], jobs[0].cfg, data.train.device), data, [jobs[0].cfg], heads, **hooks)
        self.stats["epochs"] += len(epochs)
        if saver is not None:
            for k in ("writes", "bytes", "seconds"):
                self.stats[k] += saver.stats[k]
            if all(j.told or j.trial is None for j in jobs):  # else a peer resumed it: its file now
                checkpoint.delete(location)

    def _new_checkpoint(self, jobs: list[Job]) -> str | None:
        """A checkpoint location for a group starting fresh, recorded on its trials; None when its
        trials are not one job each (tpe with --seeds: a trial's seeds train in separate groups)."""
        if self.study is None or any(len(self.pending.get(j.trial.number, ())) != 1 for j in jobs):
            return None
        location = checkpoint.new_location(self.cfg.checkpoint_root())
        self.study.tag_group([j.trial for j in jobs], location)
        return location


def _resumable(jobs: list[Job], state: dict) -> int:
    """Configurations a checkpoint resumes: running at its epoch and not told since."""
    return sum(jobs[r].trial is not None for r in state["rows"])


def run_record(job: Job, layers: list[int]) -> dict:
    """One (trial, seed) run as stored in the study and written to results.csv."""
    rec = {"seed": job.point.get("seed", job.cfg.seed if job.cfg else None), "point": job.point,
           "head": job.cfg.head if job.cfg else None, "error": job.error}
    r = job.result
    if r is not None:
        scalars = lambda m: {k: v for k, v in (m or {}).items() if isinstance(v, (int, float))}  # noqa: E731
        rec.update(params=r.params, val=scalars(r.validation), test=scalars(r.test) if r.test else None,
                   epochs=len(r.history), best_epoch=r.best_epoch, stop_reason=r.stop_reason,
                   seconds=round(r.seconds, 3), group_size=getattr(r, "group_size", 1), weights=r.weights,
                   active_layers=[layers[i] for i in r.active_layers])
    return rec


def _tell(study: SweepStudy, trial, jobs: list[Job], metric: str, layers: list[int],
          console: Console) -> tuple[bool, float | None]:
    """Tell a trial (its record, state and value); (False, None) when it was failed as stale meanwhile."""
    runs = [run_record(j, layers) for j in jobs]
    ok = [r for r in runs if r.get("val") is not None]
    errors = [r["error"] for r in runs if r["error"]]
    pruned = any(j.result is not None and j.result.stop_reason == "pruned" for j in jobs)
    value = float(np.mean([r["val"][metric] for r in ok])) if ok else None
    state = TrialState.FAIL if errors else TrialState.PRUNED if pruned else TrialState.COMPLETE
    if not study.finish(trial, {"point": {k: v for k, v in jobs[0].point.items() if k != "seed"}, "runs": runs,
                                "value": value, "metric": metric}, value, state):
        console.print(f"trial {trial.number} was declared stale and re-queued while this worker ran it (no "
                      "heartbeat within the grace period); its result is dropped, the re-queued copy counts",
                      highlight=False)
        return False, None
    return True, value


def train_baselines(worker: Worker, out) -> None:
    """<out>/baselines.csv with the single-layer heads (one per layer) and the linear probes,
    trained on the sweep's view with the fixed config's budget, unless a baselines.csv is found
    in the sweep or cache folder. A file lock keeps local workers from training them twice."""
    from filelock import FileLock

    cfg, cache = worker.cfg, worker.cache
    with FileLock(str(out / ".baselines.lock")):
        sampled = cfg.fixed.train_limit is not None
        if any(p.is_file() for p in baseline_paths(out, str(cache.root), sampled=sampled)):
            return
        base = resolve(cfg.fixed, cache)
        if base.head not in ("adalayers", "adalayers-pooled"):
            return
        worker.console.print(f"training the single-layer and linear-probe baselines ({2 * len(cache.layers) + 1} runs; "
                             "--baselines off skips them)", highlight=False)
        rows = layer_baselines(base, worker.views, worker.console, view=view_for(base.head, cache, base.pool))
        write_baselines_csv(out / "baselines.csv", rows, worker.metric)


def open_sweep_study(cfg: SweepConfig, cache, space: SweepSpace, out) -> SweepStudy:
    metric = selection_metric(cache.task)
    meta = {"cache_hash": cache.hash, "digest": cfg.digest(), "definition": cfg.definition(), "metric": metric,
            "task": cache.task, "layers": cache.layers, "adl_version": __version__,
            "dims": list(space.grid) if space.search == "grid" else list(space.dims) +
            (["seed"] if cfg.seeds > 1 else [])}
    if space.search == "grid":
        sampler, pruner = OrderedGridSampler(space.points), optuna.pruners.NopPruner()
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.base.seed, constant_liar=True)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
    url = cfg.storage or default_storage(out)
    return SweepStudy(url, cfg.study or out.name, meta, space, sampler=sampler, pruner=pruner)


def run_sweep(cfg: SweepConfig, *, console: Console | None = None) -> dict:
    """Run (or resume, or join as another worker) the sweep; write its outputs; return a summary."""
    console = console or Console()
    t0 = time.perf_counter()
    cache = open_cache(cfg.base.cache)
    space = SweepSpace(cfg)
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    worker = Worker(cfg, cache, space, console)
    worker.precheck(space.points or [{}])
    study = open_sweep_study(cfg, cache, space, out)
    worker.study = study
    write_json(out / "sweep.json", {"storage": "default" if cfg.storage is None else safe_url(cfg.storage),
                                    "study": study.study.study_name, "cache": str(cache.root),
                                    "definition": cfg.definition(), "digest": cfg.digest(),
                                    "train_limit": cfg.fixed.train_limit,
                                    "checkpoints": mask(cfg.checkpoint_root()),
                                    "adl_version": __version__})
    if cfg.checkpoints is None and not study.url.startswith(("sqlite:", "journal:")):
        console.print(f"note: group checkpoints go to {cfg.checkpoint_root()} on this machine; a worker on another "
                      "machine cannot resume from them: give every worker --checkpoints with a URL (s3://bucket/"
                      "prefix) or a folder they all reach", highlight=False, soft_wrap=True)
    total = len(space.points) if space.search == "grid" else cfg.trials
    console.print(f"sweep {study.study.study_name}: {cfg.search}, {total} trials, storage "
                  f"{safe_url(study.url)}", highlight=False, soft_wrap=True)
    try:
        ran = _loop(cfg, study, worker, cache, console, total)
    finally:
        study.close()
    if cfg.baselines == "auto":
        train_baselines(worker, out)
    summary = write_outputs(out, study.study, console=console, top=cfg.top, baselines=cfg.baselines)
    console.print(f"{ran} trial(s) run by this worker in {time.perf_counter() - t0:.1f}s; {_story(worker)}; "
                  f"results in {out}", highlight=False, soft_wrap=True)
    return {**summary, "out": str(out), "ran": ran, "resumed": dict(worker.resumed), "fresh": worker.fresh,
            "checkpoints": dict(worker.stats)}


def _loop(cfg: SweepConfig, study: SweepStudy, worker: Worker, cache, console: Console, total: int) -> int:
    ran, claimed, waiting = 0, [], 0
    try:
        while True:
            if n := study.recover():
                console.print(f"re-queued {n} trial(s) of workers that stopped", highlight=False)
            claim = study.claim(cfg.group_size)
            if not (claimed := claim.trials):
                if not (others := study.running_elsewhere()):
                    break
                if others != waiting:  # their points come back here if those workers stop beating
                    console.print(f"waiting for {others} trial(s) running in other workers", highlight=False)
                    waiting = others
                study.wait()
                continue
            t0 = time.perf_counter()
            if claim.resume is not None:
                worker.resume(claim.resume)
            else:
                worker.run(worker.jobs(claimed))
            ran += len(claimed)
            done = study.progress().get("complete", 0)
            best = max(worker.values, default=float("nan"))
            worker.values = []
            console.print(f"[{done}/{total}] {len(claimed)} trial(s) in {time.perf_counter() - t0:.1f}s, "
                          f"best validation {worker.metric} {best:.4f}", highlight=False)
            claimed = []
    except BaseException:
        study.release([t for t in claimed if t.number in study.heartbeat.held])
        raise
    return ran


def _story(worker: Worker) -> str:
    """What this worker trained: resumed (from which epochs) and fresh; what checkpoints cost."""
    resumed = sum(worker.resumed.values())
    text = f"resumed {resumed} configuration(s)"
    if resumed:
        text += " (" + ", ".join(f"{n} from epoch {e}" for e, n in sorted(worker.resumed.items())) + ")"
    text += f", started {worker.fresh} fresh"
    st = worker.stats
    if st["writes"]:
        per_epoch = st["epoch_seconds"] / max(st["epochs"], 1)
        text += (f"; {st['writes']} checkpoint(s) of {st['bytes'] / st['writes'] / 1e6:.2f} MB in "
                 f"{1e3 * st['seconds'] / st['writes']:.0f} ms each, {100 * st['seconds'] / st['writes'] / per_epoch:.1f}%"
                 f" of an epoch ({per_epoch:.2f} s)")
    return text
