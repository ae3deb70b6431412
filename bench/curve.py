"""A learning curve (not a test): adl's default heads against the probes a practitioner fits,
from a few hundred training examples to the whole training split.

    .venv/bin/python bench/curve.py --cache cache/tweets --sizes 500,2000,all --seeds 0,1,2
    .venv/bin/python bench/curve.py --cache cache/tweets-full --name tweets --sizes 8000,all
    .venv/bin/python bench/curve.py --cache cache/wnut16 --sizes all --seeds 0,1,2 --name wnut16

Each (size, seed) point is saved to the results file as soon as it is done, under a lock, so an
interrupted run resumes where it stopped and two sizes can run at once in two processes. Points
from several caches join one curve when they share the backbone and the validation and test
splits (a cache extracted with --limit does share them with the whole set's: the limit samples
the training split after carving), so the small sizes can come from a small cache.

One cache per data set (with a tokens view and a pooled:mean view). For every training size N
and seed s, each method trains on the same seeded sample of N training examples
(``--train-limit N --seed s``; validation and test stay whole) and every choice is made on
validation:

    adalayers (tokens)       `adl train --head adalayers`, otherwise defaults (the imdb preset)
    adalayers-pooled         `adl train --head adalayers-pooled`, otherwise defaults
    adl train (defaults)     `adl train` with no flag: it trains the two heads above (one on a
                             token task) and the concat probe below, and keeps the best on
                             validation; the runs are identical (same seed, sample and config),
                             so its row is taken from theirs by that rule
    probe (val-picked layer) an L2 logistic regression per layer, C chosen on validation, then
                             the layer with the best validation score
    concat probe             the same on all layers concatenated
    scalar mix               ELMo's scalar mix, then linear (defaults)

Runs go through ``run_train`` in this process, as `adl train` runs them. Writes
bench/results/curve-<name>.json (every run's validation and test score, and the table, over every
size the file holds) and
docs/curve-<name>.png (test metric against training size, mean and standard deviation over
seeds, one line per method); prints the markdown table with where adalayers wins, ties
(within the larger of the two seed spreads) or loses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402

from adl.cache import open_cache, write_json  # noqa: E402
from adl.train.config import TrainConfig  # noqa: E402
from adl.train.metrics import selection_metric  # noqa: E402
from adl.train.run import run_train, tie_rank  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("adl train (defaults)", "adalayers (tokens)", "adalayers-pooled", "probe (val-picked layer)",
           "concat probe", "scalar mix")


def train(cfg: TrainConfig, metric: str) -> dict:
    doc = run_train(cfg, console=Console(quiet=True))["metrics"]
    return {"val": doc["validation"][metric], "test": doc["test"][metric], "seconds": doc.get("seconds")}


def one_point(cache: Path, n: int | None, seed: int, work: Path, metric: str, layers: list[int],
              methods: tuple[str, ...]) -> dict:
    """Every method on one (size, seed): {method: {"val", "test", ...}}."""
    base = TrainConfig(cache=str(cache), seed=seed, train_limit=n, device="cpu", overwrite=True)
    out = lambda name: str(work / f"{n or 'all'}-{seed}" / name)  # noqa: E731
    res = {"adalayers (tokens)": train(dataclasses.replace(base, head="adalayers", out=out("adalayers")), metric)}
    if "adalayers-pooled" in methods:  # sequence tasks only: a pooled head has no tokens to tag
        res["adalayers-pooled"] = train(dataclasses.replace(base, head="adalayers-pooled", out=out("pooled")), metric)
    probes = {layer: train(dataclasses.replace(base, head="linear-probe", layer=layer, out=out(f"probe-{layer}")),
                           metric) for layer in layers}
    best = max(probes, key=lambda layer: probes[layer]["val"])  # picked on validation, never on test
    res["probe (val-picked layer)"] = {**probes[best], "layer": best}
    res["concat probe"] = train(dataclasses.replace(base, head="concat-probe", out=out("concat")), metric)
    res["scalar mix"] = train(dataclasses.replace(base, head="scalar-mix", out=out("scalar-mix")), metric)
    return with_default(res)


HEAD_OF = {"adalayers (tokens)": "adalayers", "adalayers-pooled": "adalayers-pooled", "concat probe": "concat-probe"}


def with_default(res: dict) -> dict:
    """Add the `adl train` default's row: of the runs ``adl.train.run.candidates`` names (the tokens
    head, the pooled head on a sequence task, the concat probe), the best on validation, a tie
    going to the cheaper by ``adl.train.run.tie_rank``, as ``run_train`` chooses. The runs are the
    same (same seed, sample and config), so the row is taken from theirs."""
    res = {k: v for k, v in res.items() if k != "adl train (defaults)"}
    kept = max((m for m in HEAD_OF if m in res), key=lambda m: (res[m]["val"], tie_rank(HEAD_OF[m])))
    return {"adl train (defaults)": {**res[kept], "kept": kept}, **res}


def summarise(points: dict, sizes: list[str], methods: tuple[str, ...]) -> list[dict]:
    """Per size and method: mean and std of the test metric over seeds; adalayers' verdict."""
    rows = []
    for size in sizes:
        per = {m: [p[m]["test"] for p in points[size]] for m in methods}
        stat = {m: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for m, v in per.items()}
        probe = max(("probe (val-picked layer)", "concat probe"), key=lambda m: stat[m][0])
        for m in methods:
            row = {"size": size, "method": m, "mean": stat[m][0], "std": stat[m][1], "seeds": len(per[m])}
            if m.startswith(("adalayers", "adl train")):
                gap, spread = stat[m][0] - stat[probe][0], max(stat[m][1], stat[probe][1])
                verdict = "wins" if gap > spread else "loses" if gap < -spread else "ties"
                if len(per[m]) < 2:  # one seed: no spread to call a win or a tie with
                    spread, verdict = None, "above" if gap > 0 else "below"
                row["vs_best_probe"] = {"probe": probe, "delta": gap, "spread": spread, "verdict": verdict}
            rows.append(row)
    return rows


def markdown(rows: list[dict], metric: str, train_n: dict) -> str:
    lines = [f"| train examples | method | test {metric} (mean ± std) | vs the better probe |", "|---|---|---|---|"]
    for r in rows:
        v = r.get("vs_best_probe")
        spread = "one seed, no spread" if v is None or v["spread"] is None else f"spread {100 * v['spread']:.2f}"
        verdict = "" if v is None else f"{v['verdict']} ({100 * v['delta']:+.2f} points, {spread})"
        score = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" if r["seeds"] > 1 else f"{100 * r['mean']:.2f} (1 seed)"
        lines.append(f"| {train_n[r['size']]:,} | {r['method']} | {score} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metric: str, train_n: dict, title: str, path: Path, methods: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, m in enumerate(methods):
        rs = [r for r in rows if r["method"] == m]
        x = [train_n[r["size"]] * (1 + 0.03 * (i - 2.5)) for r in rs]  # a small offset keeps error bars apart
        ax.errorbar(x, [100 * r["mean"] for r in rs], yerr=[100 * r["std"] for r in rs], marker="o", capsize=3,
                    label=m, linewidth=2.5 if m.startswith("adl train") else 1.2)
    ax.set_xscale("log")
    sizes = sorted({train_n[r["size"]] for r in rows})
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])  # the measured sizes, not powers of ten
    ax.minorticks_off()
    ax.set_xlim(sizes[0] / 1.25, sizes[-1] * 1.25)
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def held_out(cache) -> dict:
    """What makes two caches' points comparable: the backbone and the validation and test splits
    (rows and tokens). A cache extracted with --limit shares them with the whole data set's cache
    (the limit samples the training split after carving), so its sizes join the same curve."""
    splits = cache.manifest["splits"]
    return {"model": cache.manifest["model"]["config_hash"],
            **{s: [splits[s]["n"], splits[s]["tokens"]] for s in ("validation", "test") if s in splits}}


def load_results(out: Path) -> dict:
    """bench/results/curve-<name>.json: {"points": {training size: [one dict per seed]}, ...}."""
    return json.loads(out.read_text()) if out.is_file() else {"points": {}}


def save_point(out: Path, n: int, point: dict, held: dict, metric: str) -> None:
    """Add one (size, seed) point to the results file under a lock (two sizes may run at once in
    two processes); refuse a cache whose held-out splits differ from the file's."""
    with locked(out):
        doc = load_results(out)
        if doc.get("held_out", held) != held or doc.get("metric", metric) != metric:
            raise SystemExit(f"{out} holds points from another backbone or other validation/test splits: "
                             "pass another --name")
        runs = [p for p in doc["points"].get(str(n), []) if p["seed"] != point["seed"]]
        doc["points"][str(n)] = sorted([*runs, point], key=lambda p: p["seed"])
        doc.update(held_out=held, metric=metric)
        write_json(out, doc)


@contextlib.contextmanager
def locked(out: Path):
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def report(out: Path, name: str, model: str, methods: tuple[str, ...], argv: str | None, seconds: float) -> None:
    """The table and the plot from every point in the results file."""
    with locked(out):
        doc = load_results(out)
        write_json(out, _report(doc, name, model, methods, argv, seconds))


def _report(doc: dict, name: str, model: str, methods: tuple[str, ...], argv: str | None, seconds: float) -> dict:
    points = {k: [with_default(p) for p in v] for k, v in sorted(doc["points"].items(), key=lambda kv: int(kv[0]))}
    sizes = list(points)
    methods = tuple(m for m in methods if all(m in p for v in points.values() for p in v))
    rows = summarise(points, sizes, methods)
    train_n = {s: int(s) for s in sizes}
    table = markdown(rows, doc["metric"], train_n)
    png = ROOT / "docs" / f"curve-{name}.png"
    seeds = sorted({p["seed"] for v in points.values() for p in v})
    fewer = [f"{int(k):,}: {len(v)}" for k, v in points.items() if len(v) < len(seeds)]
    title = f"{name}: {model}, seeds {', '.join(map(str, seeds))}" + (f" (seeds at {', '.join(fewer)})" if fewer else "")
    plot(rows, doc["metric"], train_n, title, png, methods)
    doc.update(points=points, rows=rows, markdown=table, train_sizes=train_n)
    if argv is not None:
        doc.setdefault("commands", []).append({"command": argv, "seconds": round(seconds, 1),
                                              "load_average_end": os.getloadavg()})
    print(table)
    print(f"wrote {png}")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--name", default=None, help="data set name in the output files (default: the cache folder's)")
    ap.add_argument("--sizes", default="500,2000,all", help="training sizes; 'all' is the whole training split")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default="/tmp/adl-bench-curve")
    ap.add_argument("--redo", action="store_true", help="train (size, seed) points the results file already has")
    ap.add_argument("--report", action="store_true",
                    help="no training: rebuild the table and plot from bench/results/curve-<name>.json")
    a = ap.parse_args()
    cache = open_cache(a.cache)
    name = a.name or Path(a.cache).name
    metric = selection_metric(cache.task)
    total = int(cache.manifest["splits"]["train"]["n"])
    methods = tuple(m for m in METHODS if cache.task == "sequence" or m != "adalayers-pooled")
    model = cache.manifest["model"].get("name") or cache.manifest["model"]["id"]
    out = ROOT / "bench" / "results" / f"curve-{name}.json"
    t0, held, work = time.perf_counter(), held_out(cache), Path(a.work) / name
    if a.report:
        return report(out, name, model, methods, None, 0.0)
    for size in a.sizes.split(","):
        n = total if size == "all" else min(int(size), total)
        for seed in map(int, a.seeds.split(",")):
            have = {p["seed"] for p in load_results(out)["points"].get(str(n), [])}
            if seed in have and not a.redo:
                print(f"{name} n={n} seed={seed}: already in {out.name} (--redo trains it again)")
                continue
            t = time.perf_counter()
            point = one_point(Path(a.cache), None if n == total else n, seed, work, metric,
                              list(range(len(cache.layers))), methods)
            save_point(out, n, {**point, "seed": seed, "cache": a.cache}, held, metric)
            print(f"{name} n={n} seed={seed}: " + ", ".join(f"{m} {100 * point[m]['test']:.2f}" for m in methods)
                  + f" ({time.perf_counter() - t:.0f}s)", flush=True)
    report(out, name, model, methods, "bench/curve.py " + " ".join(sys.argv[1:]), time.perf_counter() - t0)


if __name__ == "__main__":
    main()
