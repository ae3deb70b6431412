"""A learning curve (not a test): adl's default heads against the probes a practitioner fits,
from a few hundred training examples to the whole training split.

    .venv/bin/python bench/curve.py --cache cache/tweets --sizes 500,2000,all --seeds 0,1,2
    .venv/bin/python bench/curve.py --cache cache/tweets-full --name tweets --sizes 8000,all
    .venv/bin/python bench/curve.py --cache cache/wnut16 --sizes all --seeds 0,1,2 --name wnut16
    .venv/bin/python bench/curve.py --cache cache/tweets --sizes 500 --methods default,full,lora

Each (size, seed) point is saved to the results file as soon as it is done, under a lock, so an
interrupted run resumes where it stopped and two sizes can run at once in two processes. Points
from several caches join one curve when they share the backbone and the validation and test
splits (a cache extracted with --limit does share them with the whole set's: the limit samples
the training split after carving), so the small sizes can come from a small cache.

One cache per data set (with a tokens view and a pooled:mean view). For every training size N
and seed s, each method trains on the same seeded sample of N training examples
(``--train-limit N --seed s``; validation and test stay whole) and every choice is made on
validation. ``--methods`` picks the groups (heads by default):

    default
    adl train (defaults)     `adl train` with no flag, as a user runs it: its candidates raced
                             and mixed (adl.train.ensemble); its time is every candidate's
    heads
    adalayers (tokens)       `adl train --head adalayers`, otherwise defaults (the imdb preset)
    adalayers-pooled         `adl train --head adalayers-pooled`, otherwise defaults
    old default (best candidate)  the rule before the mix: the best on validation of the two
                             heads above (one on a token task) and the concat probe, a tie to
                             the cheaper; taken from their rows (same seed, sample and config)
    probe (val-picked layer) an L2 logistic regression per layer, C chosen on validation, then
                             the layer with the best validation score
    concat probe             the same on all layers concatenated
    scalar mix               ELMo's scalar mix, then linear (defaults)
    full, lora
    full fine-tuning, LoRA   `adl finetune --method full|lora` on the same sample, up to
                             PEER_EPOCHS epochs with early stopping (PEER_PATIENCE)

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
from adl.peers.config import FinetuneConfig  # noqa: E402
from adl.peers.run import run_finetune  # noqa: E402
from adl.train.config import TrainConfig  # noqa: E402
from adl.train.metrics import selection_metric  # noqa: E402
from adl.train.run import run_train, tie_rank  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("old default (best candidate)", "adalayers (tokens)", "adalayers-pooled", "probe (val-picked layer)",
         "concat probe", "scalar mix")
PEERS = {"full fine-tuning": "full", "LoRA": "lora"}
DEFAULT = "adl train (defaults)"
METHODS = (DEFAULT, *HEADS, *PEERS)
# Peers train to convergence: up to PEER_EPOCHS epochs, stopped after PEER_PATIENCE epochs without a
# better validation score (adl finetune's own caps, 5 and 10 epochs, stop full fine-tuning of a few
# hundred examples before it converges at lr 2e-5).
PEER_EPOCHS, PEER_PATIENCE = 20, 3


def finetune(cache: Path, n: int | None, seed: int, work: Path, metric: str, method: str) -> dict:
    """One peer (`adl finetune --method METHOD --train-limit N --seed S`) on the heads' sample."""
    cfg = FinetuneConfig(cache=str(cache), method=method, seed=seed, train_limit=n, device="cpu", overwrite=True,
                         max_epochs=PEER_EPOCHS, patience=PEER_PATIENCE, progress=False,
                         out=str(work / f"{n or 'all'}-{seed}" / method))
    doc = run_finetune(cfg, console=Console(stderr=True))["metrics"]
    return {"val": doc["validation"][metric], "test": doc["test"][metric], "seconds": doc["seconds"],
            "seconds_total": doc["seconds_total"], "epochs": doc["epochs"], "best_epoch": doc["best_epoch"],
            "stop_reason": doc["stop_reason"]}


def default_run(cache: Path, n: int | None, seed: int, work: Path, metric: str) -> dict:
    """`adl train --train-limit N --seed S` with no other flag, as a user runs it: its score, its
    training seconds (every candidate's, raced) and wall time, what it kept and every variant's score."""
    t = time.perf_counter()
    cfg = TrainConfig(cache=str(cache), seed=seed, train_limit=n, device="cpu", overwrite=True,
                      out=str(work / f"{n or 'all'}-{seed}" / "default"))
    doc = run_train(cfg, console=Console(quiet=True))["metrics"]
    return {DEFAULT: {"val": doc["validation"][metric], "test": doc["test"][metric], "seconds": doc["seconds"],
                      "wall_seconds": round(time.perf_counter() - t, 1), "head": doc["head"], "mix": doc.get("mix"),
                      "candidates": doc.get("candidates")}}


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
    """Add the old `adl train` default's row (before mixing and racing): of the runs ``adl.train.run.candidates`` names (the tokens
    head, the pooled head on a sequence task, the concat probe), the best on validation, a tie
    going to the cheaper by ``adl.train.run.tie_rank``, as ``run_train`` chooses. The runs are the
    same (same seed, sample and config), so the row is taken from theirs; its ``seconds`` are the
    sum of every candidate's, since `adl train` trains them all. A point with peers only (heads
    measured by another process) is returned as it is."""
    res = {k: v for k, v in res.items() if k not in ("adl train (defaults)", HEADS[0]) or "mix" in v}
    tried = [m for m in HEAD_OF if m in res]
    if not tried:
        return res
    kept = max(tried, key=lambda m: (res[m]["val"], tie_rank(HEAD_OF[m])))
    cost = sum(res[m].get("seconds") or 0.0 for m in tried)
    return {HEADS[0]: {**res[kept], "kept": kept, "seconds": cost}, **res}


def summarise(points: dict, sizes: list[str], methods: tuple[str, ...]) -> list[dict]:
    """Per size and method (those measured at that size): mean and std of the test metric and
    mean seconds over seeds; each head's verdict against the better probe, and the default's gap
    to full fine-tuning with its time ratio."""
    rows = []
    for size in sizes:
        here = [m for m in methods if any(m in p for p in points[size])]
        per = {m: [p[m] for p in points[size] if m in p] for m in here}
        stat = {m: (statistics.mean(r["test"] for r in v), statistics.stdev(r["test"] for r in v) if len(v) > 1
                    else 0.0) for m, v in per.items()}
        secs = {m: statistics.mean(r.get("seconds") or 0.0 for r in v) for m, v in per.items()}
        walls = {m: [r.get("wall_seconds") or r.get("seconds_total") for r in v] for m, v in per.items()}
        probe = max(("probe (val-picked layer)", "concat probe"), key=lambda m: stat[m][0] if m in stat else -1)
        for m in here:
            row = {"size": size, "method": m, "mean": stat[m][0], "std": stat[m][1], "seeds": len(per[m]),
                   "seconds": secs[m]}
            if all(walls[m]):  # the whole command, loading included (adl train's default, the peers)
                row["wall_seconds"] = statistics.mean(walls[m])
            if m.startswith(("adalayers", "adl train", "old default")) and probe in stat:
                row["vs_best_probe"] = verdict(stat[m], stat[probe], len(per[m])) | {"probe": probe}
            if m == DEFAULT and "full fine-tuning" in stat:  # measured in the same sessions as the peers
                ft = "full fine-tuning"
                row["vs_full_finetuning"] = verdict(stat[m], stat[ft], len(per[m])) | {
                    "time_ratio": secs[m] / secs[ft] if secs[ft] else None, "finetuning_seeds": len(per[ft]),
                    "wall_ratio": statistics.mean(walls[m]) / statistics.mean(walls[ft]) if all(walls[m] + walls[ft])
                    else None}
            rows.append(row)
    return rows


def variants(points: dict) -> dict:
    """Per size: the mean test score of each variant `adl train` recorded beside its default (the best
    single candidate, the mix, the mix with probes refit on train + validation), and how often the
    race stopped a candidate."""
    out = {}
    for size, pts in points.items():
        runs = [p[DEFAULT] for p in pts if "mix" in p.get(DEFAULT, {})]
        if runs:
            names = runs[0]["mix"]["variants"]
            out[size] = {"seeds": len(runs), **{v: statistics.mean(r["mix"]["variants"][v]["test"] for r in runs)
                                                 for v in names},
                         "raced": sum(c["stop_reason"].startswith("raced") for r in runs for c in r["candidates"].values())}
    return out


def verdict(mine: tuple[float, float], other: tuple[float, float], seeds: int) -> dict:
    """Wins / ties / loses: the gap in means against the larger of the two spreads (one seed: above / below)."""
    gap, spread = mine[0] - other[0], max(mine[1], other[1])
    if seeds < 2:  # one seed: no spread to call a win or a tie with
        return {"delta": gap, "spread": None, "verdict": "above" if gap > 0 else "below"}
    return {"delta": gap, "spread": spread, "verdict": "wins" if gap > spread else "loses" if gap < -spread else "ties"}


def markdown(rows: list[dict], metric: str, train_n: dict) -> str:
    lines = [f"| train examples | method | test {metric} (mean ± std) | training s (wall s) | vs the better probe | "
             "vs full fine-tuning (time ratio: training, wall) |", "|---|---|---|---|---|---|"]
    for r in rows:
        score = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" if r["seeds"] > 1 else f"{100 * r['mean']:.2f} (1 seed)"
        if r["seeds"] not in (1, 3):
            score += f" ({r['seeds']} seeds)"
        ft = r.get("vs_full_finetuning")
        ratio = ""
        if ft is not None and ft["time_ratio"] is not None:
            ratio = f"; {ft['time_ratio']:.2f}x" + (f", {ft['wall_ratio']:.2f}x" if ft.get("wall_ratio") else "")
            ratio += " (fine-tuning: 1 seed)" if ft["finetuning_seeds"] < 2 else ""
        wall = f" ({r['wall_seconds']:,.0f})" if "wall_seconds" in r else ""
        lines.append(f"| {train_n[r['size']]:,} | {r['method']} | {score} | {r['seconds']:,.0f}{wall} | "
                     f"{says(r.get('vs_best_probe'))} | {says(ft)}{ratio} |")
    return "\n".join(lines) + "\n"


def says(v: dict | None) -> str:
    if v is None:
        return ""
    spread = "one seed, no spread" if v["spread"] is None else f"spread {100 * v['spread']:.2f}"
    return f"{v['verdict']} ({100 * v['delta']:+.2f} points, {spread})"


def plot(rows: list[dict], metric: str, train_n: dict, title: str, path: Path, methods: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cost) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    for i, m in enumerate(m for m in methods if any(r["method"] == m for r in rows)):
        rs = [r for r in rows if r["method"] == m]
        n = [train_n[r["size"]] for r in rs]
        x = [k * (1 + 0.03 * (i - 3.5)) for k in n]  # a small offset keeps error bars apart
        style = dict(marker="o", label=m, linewidth=2.5 if m.startswith("adl train") else 1.2,
                     linestyle="--" if m in PEERS else "-")
        ax.errorbar(x, [100 * r["mean"] for r in rs], yerr=[100 * r["std"] for r in rs], capsize=3, **style)
        cost.plot(n, [max(r["seconds"], 0.1) for r in rs], **style)
    sizes = sorted({train_n[r["size"]] for r in rows})
    for a in (ax, cost):
        a.set_xscale("log")
        a.set_xticks(sizes, [f"{n:,}" for n in sizes])  # the measured sizes, not powers of ten
        a.minorticks_off()
        a.set_xlim(sizes[0] / 1.25, sizes[-1] * 1.25)
        a.set_xlabel("training examples (log scale)")
        a.grid(alpha=0.3)
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    cost.set_yscale("log")
    cost.set_ylabel("training seconds, one core (log scale)")
    cost.set_title("cost of one run (the default: all its candidates; extraction not counted)", fontsize=9)
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
    """Merge one (size, seed) point's methods into the results file under a lock (heads and peers
    of one size may run at once in several processes); refuse a cache whose held-out splits differ
    from the file's."""
    with locked(out):
        doc = load_results(out)
        if doc.get("held_out", held) != held or doc.get("metric", metric) != metric:
            raise SystemExit(f"{out} holds points from another backbone or other validation/test splits: "
                             "pass another --name")
        runs = doc["points"].get(str(n), [])
        old = next((p for p in runs if p["seed"] == point["seed"]), {})
        runs = [p for p in runs if p["seed"] != point["seed"]]
        doc["points"][str(n)] = sorted([*runs, {**old, **point}], key=lambda p: p["seed"])
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
    rows = summarise(points, sizes, methods)
    train_n = {s: int(s) for s in sizes}
    table = markdown(rows, doc["metric"], train_n)
    png = ROOT / "docs" / f"curve-{name}.png"
    seeds = sorted({p["seed"] for v in points.values() for p in v})
    fewer = [f"{int(k):,}: {len(v)}" for k, v in points.items() if len(v) < len(seeds)]
    title = f"{name}: {model}, seeds {', '.join(map(str, seeds))}" + (f" (seeds at {', '.join(fewer)})" if fewer else "")
    plot(rows, doc["metric"], train_n, title, png, methods)
    doc.update(points=points, rows=rows, markdown=table, train_sizes=train_n, variants=variants(points))
    if argv is not None:
        doc.setdefault("commands", []).append({"command": argv, "seconds": round(seconds, 1),
                                              "load_average_end": os.getloadavg()})
    print(table)
    print("variants (mean test):", json.dumps(doc["variants"]))
    print(f"wrote {png}")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--name", default=None, help="data set name in the output files (default: the cache folder's)")
    ap.add_argument("--sizes", default="500,2000,all", help="training sizes; 'all' is the whole training split")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", default="/tmp/adl-bench-curve")
    ap.add_argument("--methods", default="heads",
                    help="default (`adl train` with no flag), heads (each head and probe alone), full, lora "
                         "(adl finetune, to convergence); comma-separated")
    ap.add_argument("--redo", action="store_true", help="train (size, seed) points the results file already has")
    ap.add_argument("--report", action="store_true",
                    help="no training: rebuild the table and plot from bench/results/curve-<name>.json")
    a = ap.parse_args()
    cache = open_cache(a.cache)
    name = a.name or Path(a.cache).name
    metric = selection_metric(cache.task)
    total = int(cache.manifest["splits"]["train"]["n"])
    methods = tuple(m for m in METHODS if cache.task == "sequence" or m != "adalayers-pooled")  # no pooled NER head
    model = cache.manifest["model"].get("name") or cache.manifest["model"]["id"]
    out = ROOT / "bench" / "results" / f"curve-{name}.json"
    t0, held, work = time.perf_counter(), held_out(cache), Path(a.work) / name
    if a.report:
        return report(out, name, model, methods, None, 0.0)
    groups = a.methods.split(",")
    if set(groups) - {"default", "heads", *PEERS.values()}:
        raise SystemExit(f"--methods takes default, heads, {', '.join(PEERS.values())}")
    for size in a.sizes.split(","):
        n = total if size == "all" else min(int(size), total)
        for seed in map(int, a.seeds.split(",")):
            for group in groups:
                names = ([m for m in HEADS[1:] if m in methods] if group == "heads" else [DEFAULT] if group == "default"
                         else [m for m, v in PEERS.items() if v == group])
                have = next((p for p in load_results(out)["points"].get(str(n), []) if p["seed"] == seed), {})
                if all(m in have and (m != DEFAULT or "mix" in have[m]) for m in names) and not a.redo:
                    print(f"{name} n={n} seed={seed} {group}: already in {out.name} (--redo trains it again)")
                    continue
                t = time.perf_counter()
                limit = None if n == total else n
                if group == "heads":
                    point = one_point(Path(a.cache), limit, seed, work, metric, list(range(len(cache.layers))), methods)
                elif group == "default":
                    point = default_run(Path(a.cache), limit, seed, work, metric)
                else:
                    point = {names[0]: finetune(Path(a.cache), limit, seed, work, metric, group)}
                save_point(out, n, {**point, "seed": seed, "cache": a.cache}, held, metric)
                print(f"{name} n={n} seed={seed}: " + ", ".join(f"{m} {100 * point[m]['test']:.2f}" for m in names)
                      + f" ({time.perf_counter() - t:.0f}s)", flush=True)
    report(out, name, model, methods, "bench/curve.py " + " ".join(sys.argv[1:]), time.perf_counter() - t0)


if __name__ == "__main__":
    main()
