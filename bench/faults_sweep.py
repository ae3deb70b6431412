"""Fault injection for sweeps (not a test): kill -9 workers of a 2-worker sweep at random moments.

    .venv/bin/python bench/faults_sweep.py [--kills 12] [--storage journal|sqlite] [--seed 0]

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
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from synthetic import write_synthetic_cache  # noqa: E402

from adl.sweep.study import open_storage  # noqa: E402

GRID = ["--alpha", "1,2,4,8", "--k", "4,8", "--cutoff", "0,0.1"]  # 16 points
FAST = ["--head", "adalayers-pooled", "--hidden", "8", "--max-epochs", "3", "--lr", "0.01", "--batch-size", "16",
        "--group-size", "2", "--baselines", "off"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--storage", choices=("journal", "sqlite"), default="sqlite")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
