"""Fault injection for sweeps (not a test): kill -9 workers of a 2-worker sweep at random moments.

    .venv/bin/python bench/faults_sweep.py [--kills 12] [--storage journal|sqlite] [--seed 0]
    .venv/bin/python bench/faults_sweep.py --preempt [--heads adalayers-pooled,adalayers] [--startup]

--preempt measures what a kill costs (see ``preempt``), and first one worker's start-up stage
by stage (``stage_times``; --startup: only that); the rest of this docstring is the random-kill mode.

Two `adl sweep` processes share one study (a 16-point grid over a small synthetic cache,
grouped two at a time). At random moments one of them, chosen at random, is killed with
SIGKILL and started again, until --kills kills were made; then both run to the end. With a
short heartbeat (0.5 s) and grace period (3 s), set through ADL_SWEEP_HEARTBEAT_S and
ADL_SWEEP_GRACE_S, the killed worker's trials go stale and are re-queued while the sweep runs.

Survived = every run exited 0 at the end and every grid point is COMPLETE exactly once (no
point lost, none run twice). Writes bench/results/faults_sweep.json and prints a table row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # this checkout's adl, the tests' helpers

from synthetic import write_synthetic_cache  # noqa: E402

from adl.sweep.storage import open_storage  # noqa: E402

GRID = ["--alpha", "1,2,4,8", "--k", "4,8", "--cutoff", "0,0.1"]  # 16 points
FAST = ["--head", "adalayers-pooled", "--hidden", "8", "--max-epochs", "3", "--lr", "0.01", "--batch-size", "16",
        "--group-size", "2", "--baselines", "off"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--storage", choices=("journal", "sqlite"), default="sqlite")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preempt", action="store_true", help="measure the rerun after kills at 25/50/75%%")
    ap.add_argument("--heads", default="adalayers-pooled,adalayers")
    ap.add_argument("--startup", action="store_true", help="with --preempt: only the start-up stages")
    args = ap.parse_args()
    if args.preempt:
        preempt(args.heads.split(","), only_startup=args.startup)
        return
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="adl-faults-sweep-"))
    cache = write_synthetic_cache(tmp / "cache", n=(64, 32, 32))
    url = f"journal:{tmp / 'study.log'}" if args.storage == "journal" else f"sqlite:///{tmp / 'study.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ADL_SWEEP_HEARTBEAT_S": "0.5", "ADL_SWEEP_GRACE_S": "3"}
    cmd = [sys.executable, "-m", "adl", "sweep", "--cache", str(cache), "--storage", url, "--study", "faults",
           *GRID, *FAST]

    def start(i: int) -> subprocess.Popen:
        return subprocess.Popen([*cmd, "--out", str(tmp / f"w{i}")], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    t0, procs, kills, moments = time.time(), [start(0), start(1)], 0, []
    while kills < args.kills:
        time.sleep(rng.uniform(1.0, 8.0))  # a worker needs ~3 s to import torch and open the study
        i = rng.randrange(2)
        if procs[i].poll() is not None:  # it finished: start it again, a finished sweep reruns nothing
            procs[i] = start(i)
            continue
        procs[i].send_signal(signal.SIGKILL)
        procs[i].wait()
        kills += 1
        moments.append(round(time.time() - t0, 1))
        procs[i] = start(i)
    codes = [p.wait(timeout=900) for p in procs]
    final = subprocess.run([*cmd, "--out", str(tmp / "check")], env=env, capture_output=True, text=True)
    study = optuna.load_study(study_name="faults", storage=open_storage(url))
    complete = [t.user_attrs["adl_point"] for t in study.get_trials() if t.state.name == "COMPLETE"]
    lost = sorted(set(range(16)) - set(complete))
    twice = sorted({p for p in complete if complete.count(p) > 1})
    survived = codes == [0, 0] and final.returncode == 0 and not lost and not twice
    row = {"fault": "kill -9 at random moments of a 2-worker sweep, then rerun", "storage": args.storage,
           "tried": kills, "survived": kills if survived else 0, "points": 16, "complete": len(complete),
           "lost_points": lost, "points_run_twice": twice, "kill_moments_s": moments, "exit_codes": codes,
           "seconds": round(time.time() - t0, 1)}
    out = HERE / "results" / "faults_sweep.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[args.storage] = row
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"| kill -9 at random moments of a 2-worker sweep ({args.storage}), then rerun | {kills} | "
          f"{row['survived']} | points lost {len(lost)}, run twice {len(twice)} |")


# ---- --preempt: what a kill costs ------------------------------------------------------------
# A 32-point grid (alpha x cutoff x lambda in one shape, x k: two shapes of 16 points), two
# workers started together, sharing one study in one sweep folder, checkpoints every epoch.
# Started together they take turns asking, so each trains about half of each shape as a group,
# one shape after the other, and both work from the first claim to the end: a share of the
# clean run's training time T is then a share of the work. First a clean run: T (first claim
# to last trial told, from the study's timestamps) and the checkpoints' size and time (the
# workers' last lines). Then, for 25%, 50% and 75% of T after the first claim, a fresh sweep
# whose two workers are killed with SIGKILL at that moment, and a rerun of both. The rerun's
# training time should be the share of T not yet done at the kill, plus at most one epoch.
# Its wall time is shown in parts: start-up (process start to the first claim: Python, torch
# and the other imports, the cache, the precheck, opening the study, finding the dead workers),
# training, and the end (results.csv, plots, exit).
# (Bit-for-bit equality of a resumed group with the same group uninterrupted is a test,
# tests/test_sweep_preempt.py: two workers claim a grid's points in a timing-dependent order,
# so two sweeps' groups need not hold the same configurations.)

PREEMPT_GRID = ["--alpha", "1,2,4,8", "--cutoff", "0,0.1", "--lambda", "0,0.001", "--k", "8,16"]  # 32 points
PREEMPT_RUN = {  # sized so that a clean run trains for a minute or two on a busy 2-core machine
    "adalayers-pooled": ["--max-epochs", "8", "--patience", "8", "--batch-size", "32"],
    "adalayers": ["--max-epochs", "6", "--patience", "6", "--batch-size", "32", "--train-limit", "600",
                  "--heads", "4"],
}
PREEMPT_CACHE = dict(n=(3000, 300, 300), layers=7, dim=64, strength=0.3)  # all-MiniLM-L6-v2's 7 layers, small D


def _study(out: Path):
    try:
        return optuna.load_study(study_name=out.name, storage=open_storage(f"sqlite:///{out / 'study.db'}"))
    except Exception:  # noqa: BLE001  (not created yet)
        return None


def _two_workers(cmd: list[str], env: dict, out: Path, kill_after: float | None = None) -> tuple[float, list[str]]:
    """Run two workers of ``cmd``, started together; (wall seconds, their outputs). With
    ``kill_after``: kill -9 both that many seconds after the study's first claim."""
    t0 = time.perf_counter()
    start = lambda: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # noqa: E731
                                     text=True)
    procs = [start(), start()]
    if kill_after is not None:
        first = None
        while first is None and all(p.poll() is None for p in procs):
            study = _study(out)
            starts = [t.datetime_start for t in study.get_trials() if t.datetime_start] if study else []
            first = min(starts, default=None)
            time.sleep(0.2)
        time.sleep(max(0.0, kill_after - (datetime.datetime.now() - first).total_seconds()))
        for p in procs:
            p.send_signal(signal.SIGKILL)
    outputs = [p.communicate(timeout=3600)[0] for p in procs]
    if kill_after is None and any(p.returncode for p in procs):
        raise SystemExit("a worker failed:\n" + "\n".join(outputs))
    return time.perf_counter() - t0, outputs


def _training_span(out: Path, since: datetime.datetime) -> tuple[float, float]:
    """(seconds from ``since`` to the first claim after it, seconds from that claim to the last
    trial told)."""
    trials = [t for t in _study(out).get_trials() if t.datetime_start and t.datetime_start >= since]
    if not any(t.datetime_complete for t in trials):
        return 0.0, 0.0  # the sweep had finished before the kill
    first = min(t.datetime_start for t in trials)
    return (first - since).total_seconds(), \
        (max(t.datetime_complete for t in trials if t.datetime_complete) - first).total_seconds()


def _story(outputs: list[str]) -> dict:
    """Sum of the workers' last lines: resumed / fresh configurations, resume epochs, checkpoints."""
    out = {"resumed": 0, "fresh": 0, "from_epochs": [], "ckpt_mb": [], "ckpt_ms": [], "ckpt_share_pct": [],
           "epoch_s": []}
    for text in outputs:
        text = " ".join(text.split())
        m = re.search(r"resumed (\d+) configuration\(s\)(?: \(([^)]*)\))?, started (\d+) fresh", text)
        out["resumed"] += int(m[1])
        out["fresh"] += int(m[3])
        out["from_epochs"] += [int(e) for e in re.findall(r"from epoch (\d+)", m[2] or "")]
        c = re.search(r"checkpoint\(s\) of ([\d.]+) MB in (\d+) ms each, ([\d.]+)% of an epoch \(([\d.]+) s\)", text)
        if c:
            for key, v in zip(("ckpt_mb", "ckpt_ms", "ckpt_share_pct", "epoch_s"), c.groups()):
                out[key].append(float(v))
    return out


def _points_once(out: Path) -> bool:
    complete = [t.user_attrs["adl_point"] for t in _study(out).get_trials() if t.state.name == "COMPLETE"]
    return sorted(complete) == list(range(32))


def preempt(heads: list[str], only_startup: bool = False) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="adl-preempt-"))
    cache = write_synthetic_cache(tmp / "cache", **PREEMPT_CACHE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "250",
           "ADL_SWEEP_HEARTBEAT_S": "2", "ADL_SWEEP_GRACE_S": "60"}
    rows = []
    for head in heads:
        def cmd(out: Path) -> list[str]:
            return [sys.executable, "-m", "adl", "sweep", "--cache", str(cache), "--out", str(out), "--head", head,
                    *PREEMPT_GRID, *PREEMPT_RUN[head], "--group-size", "16", "--checkpoint-every-s", "0",
                    "--baselines", "off"]

        stages = stage_times(head, cache, tmp)
        print(f"{head}: one worker's start-up, stage by stage (s): {stages}", flush=True)
        _save_startup(head, stages, os.getloadavg()[0])
        if only_startup:
            continue
        clean = tmp / f"{head}-clean"
        since = datetime.datetime.now()
        wall, outputs = _two_workers(cmd(clean), env, clean)
        clean_startup, full = _training_span(clean, since)
        ckpt = _story(outputs)
        epoch = sum(ckpt["epoch_s"]) / len(ckpt["epoch_s"])
        for share in (0.25, 0.5, 0.75):
            out, load = tmp / f"{head}-{int(100 * share)}", os.getloadavg()[0]
            _two_workers(cmd(out), env, out, kill_after=share * full)
            since = datetime.datetime.now()
            rerun_wall, outputs = _two_workers(cmd(out), env, out)  # the usual restart: both at once
            story, (startup, span) = _story(outputs), _training_span(out, since)
            said = [line.strip() for text in outputs for line in text.splitlines()
                    if re.search(r"resuming|no checkpoint|warning|re-queued|waiting for", line)]
            row = {"head": head, "killed_at": share, "training_s": round(full, 1), "rerun_training_s": round(span, 1),
                   "rerun_share": round(span / full, 3), "target_share": round(1 - share + epoch / full, 3),
                   "epoch_s": round(epoch, 2), "sweep_wall_s": round(wall, 1), "rerun_wall_s": round(rerun_wall, 1),
                   "sweep_startup_s": round(clean_startup, 1), "rerun_startup_s": round(startup, 1),
                   "rerun_end_s": round(rerun_wall - startup - span, 1), "rerun_said": said,
                   "load_average_1min": round(load, 1),
                   "resumed": story["resumed"], "from_epochs": story["from_epochs"], "fresh": story["fresh"],
                   "points_once": _points_once(out), "checkpoint_mb": max(ckpt["ckpt_mb"]),
                   "checkpoint_ms": round(sum(ckpt["ckpt_ms"]) / len(ckpt["ckpt_ms"])),
                   "checkpoint_share_of_epoch": round(sum(ckpt["ckpt_share_pct"]) / len(ckpt["ckpt_share_pct"]) / 100,
                                                      4)}
            rows.append(row)
            _save_rows(rows)
            print(f"| {head} | {int(100 * share)}% | {row['training_s']} s | {row['rerun_training_s']} s = "
                  f"{100 * row['rerun_share']:.0f}% | {100 * row['target_share']:.0f}% | {row['resumed']} "
                  f"(from epochs {sorted(set(row['from_epochs']))}), {row['fresh']} fresh | "
                  f"{row['sweep_wall_s']} s / {row['rerun_wall_s']} s (start-up {row['rerun_startup_s']} s, end "
                  f"{row['rerun_end_s']} s) | {row['points_once']} | "
                  f"{row['checkpoint_mb']:.2f} MB, {row['checkpoint_ms']} ms = "
                  f"{100 * row['checkpoint_share_of_epoch']:.1f}% of a {row['epoch_s']} s epoch |", flush=True)


STAGES = r"""
import json, sys, time
t0 = time.perf_counter(); marks = {}
def mark(what):
    marks[what] = round(time.perf_counter() - t0 - sum(marks.values()), 2)
import torch; mark("import torch")
import optuna; mark("import optuna")
from adl.sweep import worker as W; from adl.sweep.config import SweepConfig, SweepSpace, parse_space
from adl.train.config import TrainConfig; from rich.console import Console; mark("import adl")
cache_dir, out, head, grid, run = json.loads(sys.argv[1])
cfg = SweepConfig(base=TrainConfig(cache=cache_dir, head=head, **run), space=parse_space(grid), out=out, group_size=16,
                  checkpoint_every_s=0, baselines="off")
cache = W.open_cache(cache_dir); mark("open the cache")
space = SweepSpace(cfg); worker = W.Worker(cfg, cache, space, Console(quiet=True))
worker.precheck(space.points); mark("precheck: load the view, build a head and its optimizer per shape")
study = W.open_sweep_study(cfg, cache, space, cfg.out_dir()); worker.study = study; mark("open the study (new)")
study.recover(); claim = study.claim(16); mark(f"claim {len(claim.trials)} trials")
study.close(); print(json.dumps(marks))
"""


def stage_times(head: str, cache: Path, tmp: Path) -> dict:
    """One worker's fixed costs before it trains, stage by stage (a fresh process, a new study)."""
    grid = {"alpha": "1,2,4,8", "cutoff": "0,0.1", "lam": "0,0.001", "k": "8"}
    run = dict(zip(PREEMPT_RUN[head][::2], PREEMPT_RUN[head][1::2]))
    run = {k.lstrip("-").replace("-", "_"): int(v) for k, v in run.items()}
    arg = json.dumps([str(cache), str(tmp / f"{head}-startup"), head, grid, run])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STAGES, arg], env=env, capture_output=True, text=True, check=True)
    return {"process_s": round(time.perf_counter() - t0, 2), **json.loads(proc.stdout.strip().splitlines()[-1])}


def _save_rows(rows: list[dict]) -> None:
    """Merge ``rows`` into bench/results/faults_sweep.json (by head and kill moment)."""
    path = HERE / "results" / "faults_sweep.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    old = results.get("preempt", {}).get("rows", [])
    keys = {(r["head"], r["killed_at"]) for r in rows}
    results["preempt"] = {**results.get("preempt", {}), "cache": {"synthetic": PREEMPT_CACHE}, "grid": PREEMPT_GRID,
                          "runs": PREEMPT_RUN,
                          "env": {"OMP_NUM_THREADS": 1, "cores": os.cpu_count()},
                          "rows": [r for r in old if (r["head"], r["killed_at"]) not in keys] + rows}
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def _save_startup(head: str, stages: dict, load: float) -> None:
    path = HERE / "results" / "faults_sweep.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("preempt", {}).setdefault("startup", {})[head] = {**stages, "load_average_1min": round(load, 1)}
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
