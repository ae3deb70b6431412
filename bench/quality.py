"""Quality on real data: adalayers vs best single layer vs last layer vs scalar mix vs head2toe.

The real all-MiniLM-L6-v2 (7 hidden states) on two real offline data sets (DATA.md):
WNUT-16 Twitter NER (entity F1, tokens view) and the crowd-labelled tweet sentiment corpus
(accuracy, pooled view: the adalayers-pooled head), seeded splits, ``--seeds`` training seeds,
every method trained by `adl baselines` with the same trainer and budget.

"Best single layer" is chosen per seed on the validation metric (what a user could do) and
its test score reported; the best single layer by mean test score (an oracle) is printed too.

    .venv/bin/python bench/quality.py                  # ~15-30 min on 2 cores
    .venv/bin/python bench/quality.py --seeds 1 --max-epochs 5   # a quick look

Writes bench/results/quality.json and prints a table of mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TASKS = {
    # name: (extract flags, metric, train overrides)
    "wnut16": (["--dataset", "wnut16"], "f1", {"lr": 1e-3}),
    "tweets": (["--dataset", "tweets", "--views", "pooled", "--limit", "6000"], "accuracy", {"lr": 1e-3}),
}
METHODS = ("adalayers", "best single layer (val)", "last-layer", "scalar-mix", "head2toe")


def ensure_cache(name: str, flags: list[str], root: Path) -> Path:
    out = root / name
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "adl", "extract", "--model", "minilm", *flags, "--out", str(out), "--overwrite"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def one_seed(cache: Path, seed: int, metric: str, overrides: dict, max_epochs: int, out: Path) -> dict:
    from adl.train.baselines import run_baselines
    from adl.train.config import TrainConfig

    cfg = TrainConfig(cache=str(cache), out=str(out), seed=seed, max_epochs=max_epochs, overwrite=True, **overrides)
    rows = run_baselines(cfg)["rows"]
    val, test = f"val_{metric}", f"test_{metric}"
    singles = [r for r in rows if r["name"] == "single-layer"]
    best = max(singles, key=lambda r: r[val])
    method = lambda r: "adalayers" if r["name"].startswith("adalayers") else r["name"]  # noqa: E731
    scores = {method(r): r[test] for r in rows if method(r) in METHODS}
    scores["best single layer (val)"] = best[test]
    scores["best single layer (val) index"] = best["layer"]
    scores["single"] = {str(r["layer"]): r[test] for r in singles}
    return scores


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for m in METHODS:
        v = np.array([s[m] for s in per_seed], float)
        out[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "runs": v.tolist()}
    layers = per_seed[0]["single"].keys()
    means = {l: float(np.mean([s["single"][l] for s in per_seed])) for l in layers}
    oracle = max(means, key=means.get)
    out["best single layer (oracle, by mean test)"] = {"layer": oracle, "mean": means[oracle]}
    out["single layers (mean test)"] = means
    ada, single = np.array(out["adalayers"]["runs"]), np.array(out["best single layer (val)"]["runs"])
    out["adalayers - best single (val)"] = {
        "mean": float((ada - single).mean()),
        "spread": float(max(out["adalayers"]["std"], out["best single layer (val)"]["std"])),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--cache-root", default=str(ROOT / "cache" / "bench"))
    args = ap.parse_args()
    report = {"model": "minilm (all-MiniLM-L6-v2, 7 hidden states)", "seeds": args.seeds,
              "max_epochs": args.max_epochs, "tasks": {}}
    for name in args.tasks.split(","):
        flags, metric, overrides = TASKS[name]
        cache = ensure_cache(name, flags, Path(args.cache_root))
        per_seed = [one_seed(cache, s, metric, overrides, args.max_epochs, RESULTS / "quality" / f"{name}-seed{s}")
                    for s in range(args.seeds)]
        report["tasks"][name] = {"metric": metric, "train_overrides": overrides, "per_seed": per_seed,
                                 "summary": summarise(per_seed)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "quality.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['model']}, {report['seeds']} seeds, max {report['max_epochs']} epochs: test mean +- std")
    for name, t in report["tasks"].items():
        s = t["summary"]
        print(f"\n{name} ({t['metric']})")
        for m in METHODS:
            print(f"  {m:28s} {s[m]['mean']:.4f} +- {s[m]['std']:.4f}")
        o = s["best single layer (oracle, by mean test)"]
        print(f"  {'best single layer (oracle)':28s} {o['mean']:.4f} (layer {o['layer']})")
        d = s["adalayers - best single (val)"]
        verdict = "beats" if d["mean"] > d["spread"] else "does not beat"
        print(f"  adalayers {verdict} the best single layer by more than the seed spread "
              f"({d['mean']:+.4f} vs spread {d['spread']:.4f})")


if __name__ == "__main__":
    main()
