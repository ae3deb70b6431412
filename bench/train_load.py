"""The finiteness check that `adl train` runs on every view it loads, timed on a real cache (not a test).

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_load.py --cache cache/tweets [--split validation] [--repeats 3]

Reads one split's tokens view as training loads it (float32, whole), then times, in one run and
best of --repeats each: reading it from the store; the float32 sum that clears a finite view
(``SplitData._finite``'s fast path); the float64 sum it replaced; and ``isfinite().all()``.
Results: bench/results/train_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from adl.cache import open_cache


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--split", default="validation")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    cache = open_cache(a.cache)
    holder = {}

    def read():
        values, _ = cache.read(a.split, "tokens")
        holder["x"] = torch.from_numpy(np.asarray(values[:], np.float32))

    seconds = {"read the tokens view": best(read, a.repeats)}
    x = holder["x"]
    checks = {"float32 sum (now)": lambda: torch.isfinite(x.sum(dtype=torch.float32)),
              "float64 sum (before)": lambda: torch.isfinite(x.sum(dtype=torch.float64)),
              "isfinite().all()": lambda: torch.isfinite(x).all()}
    seconds.update({name: best(fn, a.repeats) for name, fn in checks.items()})
    result = {"command": f"bench/train_load.py --cache {a.cache} --split {a.split} --repeats {a.repeats}",
              "values": x.numel(), "torch_threads": torch.get_num_threads(), "seconds_best": seconds,
              "ratios": {"float64 sum / float32 sum": seconds["float64 sum (before)"] / seconds["float32 sum (now)"],
                         "float64 sum / reading the view": seconds["float64 sum (before)"] / seconds["read the tokens view"],
                         "float32 sum / reading the view": seconds["float32 sum (now)"] / seconds["read the tokens view"]},
              "load_average": [round(v, 2) for v in os.getloadavg()]}
    out = Path(__file__).parent / "results" / "train_load.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
