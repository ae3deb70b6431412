"""adl's heads against the peers that tune the backbone, on the real all-MiniLM-L6-v2.

Per data set (tweets sentiment, WNUT-16 NER): one cache (``adl extract --limit``), adl's preset
head and the best point of a small sweep, then every peer (``adl finetune``) for each seed,
then ``adl compare``. Everything goes through the CLI, as a user would run it.

    .venv/bin/python bench/peers.py                       # the full plan (3 seeds, every method)
    .venv/bin/python bench/peers.py --seeds 0 --limit 200 --methods full,lora

Writes bench/results/peers.json (settings, every run's metrics, the compare rows) and prints
the markdown tables. On 2 shared CPU cores the budget flags decide the wall time: a peer pays
the backbone forward and backward on every training example of every epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADL = str(ROOT / ".venv" / "bin" / "adl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SWEEP = {"tweets": ["--alpha", "16,70", "--k", "32,64"], "wnut16": ["--alpha", "32,128", "--k", "64,128"]}


FAILED: list[str] = []


def adl(*args) -> bool:
    """Run one adl command; a failure is recorded (and its run left out), not fatal."""
    cmd = [ADL, *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    res = subprocess.run(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print("\n".join(res.stdout.strip().splitlines()[-2:]), flush=True)
    if res.returncode:
        FAILED.append(f"{' '.join(cmd[1:])}: {res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ''}")
    return res.returncode == 0


def bench_dataset(name: str, a, work: Path) -> dict:
    cache, runs = work / f"cache-{name}", []
    if not (cache / "manifest.json").is_file():
        adl("extract", "--model", "minilm", "--dataset", name, "--limit", a.limit, "--out", cache, "--overwrite")
    sequence = json.loads((cache / "manifest.json").read_text())["task"] == "sequence"
    for seed in a.seeds:
        run = work / name / f"adl-preset-{seed}"
        if (run / "metrics.json").is_file() or adl("train", "--cache", cache, "--head", "adalayers",
                                                   "--seed", seed, "--max-epochs", a.adl_epochs, "--out", run,
                                                   "--overwrite"):
            runs.append(run)
        run = work / name / f"adl-pooled-{seed}"  # the cheap head: pooled states, no attention over tokens
        if sequence and ((run / "metrics.json").is_file() or adl(
                "train", "--cache", cache, "--head", "adalayers-pooled", "--seed", seed, "--max-epochs", a.adl_epochs,
                "--out", run, "--overwrite")):
            runs.append(run)
    if name in a.sweep:
        sweep = work / name / "sweep"
        if (sweep / "best.json").is_file() or adl("sweep", "--cache", cache, *SWEEP[name], "--seeds", len(a.seeds),
                                                  "--max-epochs", a.adl_epochs, "--baselines", "off", "--out", sweep):
            runs.append(sweep)
    for seed in a.peer_seeds:  # seed-major: an interrupted bench still has every method once
        for method in a.methods:
            if method == "setfit" and name != "tweets":
                continue
            run = work / name / f"{method}-{seed}"
            if (run / "metrics.json").is_file():  # measured by an earlier invocation with the same --work
                runs.append(run)
                continue
            budget = (["--max-steps", a.setfit_steps] if method == "setfit"
                      else ["--max-epochs", a.peer_epochs, "--patience", 1])
            if adl("finetune", "--cache", cache, "--method", method, "--seed", seed, *budget, "--out", run,
                   "--overwrite"):
                runs.append(run)
    out = work / name / "compare"
    adl("compare", *runs, "--out", out)
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    man = json.loads((cache / "manifest.json").read_text())
    detail = {str(r): json.loads((r / "metrics.json").read_text()) for r in runs if (r / "metrics.json").is_file()}
    return {"splits": {k: v["n"] for k, v in man["splits"].items()}, "extraction_seconds": man["extraction_seconds"],
            "rows": rows, "targets": targets(rows), "markdown": (out / "compare.md").read_text(), "runs": detail}


def targets(rows: list[dict]) -> list[dict]:
    """The issue's three targets for every adl row, against full fine-tuning and the cheapest peer sweep:
    within 2 points of full fine-tuning; under a tenth of its time (training alone, and with the
    extraction); the cheapest 10-point sweep by more than 10x."""
    num = {r["method"]: {k: float(r[k]) for k in ("mean", "seconds", "extraction_seconds", "sweep10_seconds")}
           for r in rows}
    full = num.get("full")
    peers = [v["sweep10_seconds"] for k, v in num.items() if not k.startswith("adl")]
    out = []
    for name, v in num.items():
        if not name.startswith("adl") or full is None:
            continue
        gap = 100 * (full["mean"] - v["mean"])
        time_ratio = v["seconds"] / full["seconds"]
        with_extraction = (v["seconds"] + v["extraction_seconds"]) / full["seconds"]
        sweep_ratio = min(peers) / v["sweep10_seconds"] if peers else None
        out.append({"adl": name, "points_below_full": round(gap, 2), "within_2_points": gap <= 2,
                    "time_vs_full": round(time_ratio, 3), "time_with_extraction_vs_full": round(with_extraction, 3),
                    "under_a_tenth": with_extraction < 0.1, "cheapest_peer_sweep_over_adl_sweep":
                    None if sweep_ratio is None else round(sweep_ratio, 2),
                    "sweep_10x_cheaper": sweep_ratio is not None and sweep_ratio > 10})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="tweets,wnut16")
    p.add_argument("--methods", default="full,bitfit,lora,ptuning-bias,setfit")
    p.add_argument("--seeds", default="0,1,2", help="seeds of adl's heads (and of the peers, by default)")
    p.add_argument("--peer-seeds", default=None, help="seeds of the peers (default --seeds)")
    p.add_argument("--limit", type=int, default=400, help="examples per split (adl extract --limit)")
    p.add_argument("--adl-epochs", type=int, default=30)
    p.add_argument("--peer-epochs", type=int, default=3)
    p.add_argument("--setfit-steps", type=int, default=100)
    p.add_argument("--sweep", default="tweets,wnut16", help="data sets that get adl's small sweep")
    p.add_argument("--work", default="/tmp/adl-bench-peers")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers.json"))
    a = p.parse_args()
    a.methods, a.seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    a.peer_seeds = [int(s) for s in a.peer_seeds.split(",")] if a.peer_seeds else a.seeds
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    start, results = time.perf_counter(), {}
    for name in a.datasets.split(","):
        results[name] = bench_dataset(name, a, work)
    doc = {"settings": {k: v for k, v in vars(a).items() if k not in ("out", "work")},
           "machine": {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()},
           "wall_seconds": round(time.perf_counter() - start, 1), "command": " ".join(sys.argv), "results": results,
           "failed": FAILED}
    Path(a.out).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    for name, r in results.items():
        print(f"\n{name} (splits {r['splits']})\n{r['markdown']}")
        for t in r["targets"]:
            print(json.dumps(t))
    print(f"wrote {a.out} ({doc['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
