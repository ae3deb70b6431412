"""Fault injection on stage one, measured (not a test): the real all-MiniLM-L6-v2 on real tweets.

    .venv/bin/python bench/faults.py [--limit 200] [--kills 10] [--seed 0]

Every run is the real CLI (`python -m adl extract --model minilm --dataset tweets --limit N
--views pooled,tokens`) in its own process. Rows (the sweep rows of issue 11 are not here):

- kill -9 at a random moment of `adl extract`, --kills times per format (zarr, hdf5): half
  uniform over a clean run's wall time (start-up included), half uniform over its writing
  phase (after the first progress file); then the same command again;
- disk full: a real tmpfs in a private user+mount namespace, filled up (cat /dev/zero) at a
  random moment after the first commit; then the space is freed and the command rerun;
- damage to a finished cache: a random zarr chunk file deleted, or truncated; the HDF5
  shard truncated; the manifest truncated;
- `--overwrite` (another format) and a second writer started together, at a random offset.

Survived: the rerun finishes and its cache is bit-identical (every array of every shard, and
done.json's checksums) to a clean run, and verify_cache finds nothing; for damage, both
verify_cache and open_cache name it (open_cache refuses; nothing is read as data); every
process that fails prints one `error:` line (exit 2), never a traceback. Data lost counts
trials whose final cache differs from the clean run or reads damaged data.
Results: a markdown table on stdout, details in bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from adl.cache import open_cache, read_json, verify_cache
from adl.cache.backends import open_backend
from adl.cache.shards import FORMATS
from adl.errors import AdlError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def command(out: Path, fmt: str, limit: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adl", "extract", "--model", "minilm", "--dataset", "tweets", "--limit",
            str(limit), "--views", "pooled,tokens", "--format", fmt, "--out", str(out), *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=900)


def one_line_error(stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return bool(lines) and lines[-1].startswith("error: ") and "Traceback" not in stderr


def content(root: Path) -> dict:
    """Every array of every shard (raw bytes) and the checksums of done.json."""
    m = read_json(root / "manifest.json")
    out = {}
    for p in sorted(root.glob(f"shard-*{FORMATS[m['format']]}")):
        store = open_backend(p, m["format"], "r")
        for split in m["splits"]:
            for name in ("ids", "offsets", "labels", "pooled_mean", "tokens"):
                if store.has(f"{split}/{name}"):
                    out[f"{p.name}/{split}/{name}"] = np.asarray(store.array(f"{split}/{name}")[:]).tobytes()
        store.close()
    for p in sorted(root.glob("shard-*.done.json")):
        out[p.name] = json.dumps(read_json(p)["arrays"], sort_keys=True).encode()
    return out


def same_as_clean(root: Path, clean: dict) -> bool:
    try:
        return (root / "manifest.json").is_file() and content(root) == clean and verify_cache(root) == []
    except Exception:  # noqa: BLE001 - any failure to read back is a lost trial
        return False


PROGRESS = "shard-00000-of-00001.progress.json"


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    while not path.exists() and proc.poll() is None:
        time.sleep(0.01)


def timed_clean(out: Path, fmt: str, limit: int) -> tuple[float, float]:
    """A clean run: -> (wall seconds, seconds of its writing phase: first commit file to exit)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(out, fmt, limit), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    wait_for(out / PROGRESS, proc)
    t1 = time.perf_counter()
    err = proc.communicate()[1]
    if proc.returncode != 0:
        sys.exit(f"the clean {fmt} run failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, time.perf_counter() - t1


def kill_trials(work: Path, fmt: str, limit: int, n: int, clean: dict, timing: tuple, rng) -> list[dict]:
    """Even trials: a moment uniform over the whole run (start-up included); odd trials: uniform
    over its writing phase (from the first progress file on), where the store is at risk."""
    trials, t = [], -1
    while sum(x["killed"] for x in trials) < n and len(trials) < 2 * n:  # n kills that landed
        t += 1
        out = work / f"kill-{fmt}-{t}"
        phase = "whole run" if t % 2 == 0 else "writing"
        at = rng.uniform(0.0, 0.95 * timing[0 if phase == "whole run" else 1])
        proc = subprocess.Popen(command(out, fmt, limit), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        if phase == "writing":
            wait_for(out / PROGRESS, proc)
        time.sleep(at)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        committed = read_json(out / PROGRESS) if (out / PROGRESS).is_file() else None
        again = run(command(out, fmt, limit))
        ok = again.returncode == 0 and same_as_clean(out, clean)
        trials.append({"format": fmt, "phase": phase, "kill_at_s": round(at, 2), "killed": killed,
                       "committed": committed,
                       "rerun_rc": again.returncode, "identical": ok, "stderr": again.stderr[-300:] if not ok else ""})
        shutil.rmtree(out, ignore_errors=True)
        print(f"  kill {fmt} #{t}: {phase} +{at:.1f}s killed={killed} committed={committed} -> identical={ok}", flush=True)
    return trials


def small_filesystem_works() -> bool:
    probe = "mkdir -p /tmp/adl-probe && mount -t tmpfs -o size=1m tmpfs /tmp/adl-probe"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


def disk_full_trials(work: Path, fmt: str, limit: int, n: int, clean: dict, rng) -> list[dict]:
    """A tmpfs as large as twice the cache, filled at a random moment after the first commit."""
    size_mb = 2 * sum(len(v) for v in clean.values()) // 2**20 + 16
    trials = []
    for t in range(n):
        mnt, copy, logs = work / f"mnt-{fmt}-{t}", work / f"full-{fmt}-{t}", work / f"logs-{fmt}-{t}"
        mnt.mkdir()
        logs.mkdir()
        delay = rng.uniform(0.0, 2.0)
        cmd = " ".join(command(mnt / "c", fmt, limit))
        progress = mnt / "c" / PROGRESS
        script = (f"mount -t tmpfs -o size={size_mb}m tmpfs {mnt} || exit 1; "
                  f"({cmd} 2> {logs}/err1; echo $? > {logs}/rc1) & "
                  f"while [ ! -e {progress} ]; do sleep 0.01; done; sleep {delay:.2f}; "
                  f"cat /dev/zero > {mnt}/filler 2>/dev/null; wait; rm -f {mnt}/filler; "
                  f"{cmd} 2> {logs}/err2; echo $? > {logs}/rc2; cp -r {mnt}/c {copy}")
        subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, cwd=ROOT, timeout=1800)
        err1 = (logs / "err1").read_text()
        rc1, rc2 = (logs / "rc1").read_text().strip(), (logs / "rc2").read_text().strip()
        full = rc1 == "2" and one_line_error(err1) and "disk full" in err1.strip().splitlines()[-1]
        ok = (rc1 == "0" or full) and rc2 == "0" and same_as_clean(copy, clean)
        trials.append({"format": fmt, "fill_after_first_commit_s": round(delay, 2), "first_rc": rc1,
                       "first_error": err1.strip().splitlines()[-1][:200] if err1.strip() else "",
                       "hit_full_disk": rc1 == "2", "rerun_rc": rc2, "identical": ok})
        shutil.rmtree(copy, ignore_errors=True)
        print(f"  disk full {fmt} #{t}: first rc {rc1} ({trials[-1]['first_error'][:60]}) -> identical={ok}",
              flush=True)
    return trials


def damage_trials(work: Path, clean_dirs: dict, n: int, rng) -> list[dict]:
    def zarr_chunk(root: Path) -> Path:
        chunks = sorted(p for p in (root / "shard-00000-of-00001.zarr").rglob("c/*/0/0") if p.is_file())
        return rng.choice(chunks)

    kinds = {
        "zarr chunk deleted": ("zarr", lambda r: zarr_chunk(r).unlink()),
        "zarr chunk truncated": ("zarr", lambda r: _truncate(zarr_chunk(r), rng)),
        "hdf5 shard truncated": ("hdf5", lambda r: _truncate(r / "shard-00000-of-00001.h5", rng)),
        "manifest truncated": (None, lambda r: _truncate(r / "manifest.json", rng)),
    }
    trials = []
    for kind, (fmt, damage) in kinds.items():
        for t in range(n):
            fmt_t = fmt or rng.choice(["zarr", "hdf5"])
            root = work / f"damage-{t}"
            shutil.copytree(clean_dirs[fmt_t], root)
            damage(root)
            problems = verify_cache(root)
            try:
                open_cache(root).close()
                refused = ""
            except AdlError as e:
                refused = str(e)
            ok = bool(problems) and bool(refused)
            trials.append({"damage": kind, "format": fmt_t, "verify": problems[:2], "open_cache": refused[:200],
                           "detected": ok})
            shutil.rmtree(root)
            print(f"  {kind} ({fmt_t}) #{t}: verify={problems[:1]} refused={bool(refused)}", flush=True)
    return trials


def _truncate(path: Path, rng) -> None:
    os.truncate(path, int(path.stat().st_size * rng.uniform(0.05, 0.95)))


def race_trials(work: Path, limit: int, n: int, clean: dict, rng) -> list[dict]:
    """A zarr writer and an --overwrite hdf5 writer started together (random offset < 3 s)."""
    trials = []
    for t in range(n):
        out = work / f"race-{t}"
        offset = rng.uniform(0.0, 3.0)
        first = subprocess.Popen(command(out, "zarr", limit), env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT)
        time.sleep(offset)
        second = subprocess.Popen(command(out, "hdf5", limit, "--overwrite"), env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT)
        errs = [p.communicate(timeout=900)[1] for p in (first, second)]
        rcs = [first.returncode, second.returncode]
        clean_errors = all(rc == 0 or (rc == 2 and one_line_error(e)) for rc, e in zip(rcs, errs))
        fmt = read_json(out / "manifest.json")["format"] if (out / "manifest.json").is_file() else None
        ok = clean_errors and fmt is not None and same_as_clean(out, clean[fmt])
        trials.append({"offset_s": round(offset, 2), "rc": rcs, "errors": [e.strip().splitlines()[-1][:200]
                       for e, rc in zip(errs, rcs) if rc], "final_format": fmt, "identical": ok})
        shutil.rmtree(out, ignore_errors=True)
        print(f"  race #{t}: offset {offset:.1f}s rc={rcs} final={fmt} -> ok={ok}", flush=True)
    return trials


def row(name: str, trials: list[dict], key: str) -> dict:
    survived = sum(bool(t[key]) for t in trials)
    return {"fault": name, "tried": len(trials), "survived": survived, "data_lost": len(trials) - survived}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="examples per split (tweets: 3 splits)")
    ap.add_argument("--kills", type=int, default=10, help="kill -9 trials that land, per format")
    ap.add_argument("--disk-full", type=int, default=2, help="full-disk trials per format")
    ap.add_argument("--damage", type=int, default=3, help="trials per kind of damage")
    ap.add_argument("--races", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="adl-faults-"))
    clean, clean_dirs, seconds = {}, {}, {}
    for fmt in ("zarr", "hdf5"):
        clean_dirs[fmt] = work / f"clean-{fmt}"
        seconds[fmt] = timed_clean(clean_dirs[fmt], fmt, args.limit)
        clean[fmt] = content(clean_dirs[fmt])
        print(f"clean {fmt}: {seconds[fmt][0]:.1f} s, writing phase {seconds[fmt][1]:.1f} s", flush=True)
    kills = [t for fmt in ("zarr", "hdf5")
             for t in kill_trials(work, fmt, args.limit, args.kills, clean[fmt], seconds[fmt], rng)]
    full = []
    if small_filesystem_works():
        full = [t for fmt in ("zarr", "hdf5") for t in disk_full_trials(work, fmt, args.limit, args.disk_full,
                                                                        clean[fmt], rng)]
    damage = damage_trials(work, clean_dirs, args.damage, rng)
    races = race_trials(work, args.limit, args.races, clean, rng)
    landed = [t for t in kills if t["killed"]]  # a moment after the run had ended kills nothing
    rows = [row("kill -9 at a random moment of `adl extract` (zarr and hdf5), then rerun", landed, "identical"),
            row("disk full during extraction (a real tmpfs filled mid-run; zarr and hdf5), then rerun", full,
                "identical"),
            row("one chunk file deleted or truncated; HDF5 shard truncated; manifest truncated", damage, "detected"),
            row("`--overwrite` and a second writer started together", races, "identical")]
    print("\n| fault | tried | survived | data lost |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['tried']} | {r['survived']} | {r['data_lost']} |")
    result = {"command": " ".join(["bench/faults.py", *sys.argv[1:]]), "limit": args.limit, "seed": args.seed,
              "clean_seconds": {k: [round(x, 1) for x in v] for k, v in seconds.items()}, "rows": rows,
              "trials": {"kill": kills, "disk_full": full, "damage": damage, "race": races},
              "seconds": round(time.perf_counter() - start, 1), "load_average": os.getloadavg()}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "faults.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{result['seconds']:.0f} s; details in bench/results/faults.json")


if __name__ == "__main__":
    main()
