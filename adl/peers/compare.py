"""``adl compare``: adl runs, adl sweeps and peer runs on one data set, in one table and two plots.

Each argument is a folder:

    adl run     metrics.json + cache_manifest.json (``adl train``)           -> "adl <head>"
    peer run    metrics.json with "method" + cache_manifest.json            -> "<method>"
    sweep       best.json + results.csv + sweep.json (``adl sweep``)         -> "adl sweep best (<head>)"

Runs with the same label are seeds of one method: the table gives the test metric's mean ±
population std over them. Cost columns:

    time (s)          mean training seconds of one run (adl: from the cache; peers: backbone
                      forward and backward every epoch)
    extraction (s)    adl only: the one backbone pass over every split that wrote the cache
    10-point sweep    adl: extraction + 10 x time (one cache serves every point);
                      peers: 10 x time (each point pays the backbone again)

Writes compare.md, compare.csv, quality_vs_params.png, quality_vs_time.png into ``out``.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from adl.cache import read_json, read_manifest, write_csv
from adl.cache.location import local_folder
from adl.errors import AdlError

SWEEP_POINTS = 10


@dataclass(frozen=True)
class CompareConfig:
    paths: tuple[str, ...]
    out: str = "compare"

    def __post_init__(self):
        if not self.paths:
            raise AdlError("nothing to compare: pass run or sweep folders, e.g. adl compare runs/a runs/b")


@dataclass(frozen=True)
class Entry:
    """One measured run (or a sweep's best point, its seeds pooled)."""

    path: str
    label: str
    metric: str
    tests: tuple[float, ...]  # the test metric, one value per seed
    params: int
    seconds: float  # training seconds of one run
    extraction: float  # seconds of the cache's backbone pass (adl), 0 for peers
    dataset: dict  # name, fingerprint, carving


def read_entry(path: str) -> Entry:
    p = Path(path)
    if (p / "best.json").is_file() and (p / "sweep.json").is_file():
        return _sweep_entry(p)
    if not (p / "metrics.json").is_file():
        raise AdlError(f"{p} is neither a run folder (metrics.json) nor a sweep folder (best.json, sweep.json)")
    doc = read_json(p / "metrics.json")
    man = _manifest(p / "cache_manifest.json", p)
    m = doc["metric"]
    if not doc.get("test"):
        raise AdlError(f"{p} has no test metrics (its cache has no labelled test split); nothing to compare")
    if "method" in doc:
        return Entry(str(p), doc["method"], m, (doc["test"][m],), int(doc["params"]), float(doc["seconds"]), 0.0,
                     _dataset(man))
    return Entry(str(p), f"adl {doc['head']}", m, (doc["test"][m],), int(doc["params"]), float(doc["seconds"]),
                 float(man.get("extraction_seconds") or 0.0), _dataset(man))


def _manifest(path: Path, folder: Path) -> dict:
    if not path.is_file():
        raise AdlError(f"{folder} lacks cache_manifest.json, so its data set is unknown; rerun it with this adl")
    return read_json(path)


def _dataset(man: dict) -> dict:
    d, spec = man["dataset"], man["dataset"].get("spec") or {}
    source = d["name"] if spec.get("kind") == "named" else (spec.get("path") or spec.get("hub_id") or d["name"])
    return {"name": d["name"] if source == d["name"] else f"{d['name']} ({source})", "fingerprint": d["fingerprint"], "carving": d.get("carving"),
            "splits": {k: v["n"] for k, v in man["splits"].items()}}


def _sweep_entry(p: Path) -> Entry:
    best = read_json(p / "best.json")
    if not best.get("best"):
        raise AdlError(f"sweep {p} has no finished point yet; nothing to compare")
    b, metric = best["best"], best["metric"]
    man = read_manifest(read_json(p / "sweep.json")["cache"])  # a folder or a URL
    with open(p / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("state") == "complete"]
    trials = {str(t) for t in b["trials"]}
    mine = [r for r in rows if r["trial"] in trials]
    tests = tuple(float(r[f"test_{metric}"]) for r in mine if r.get(f"test_{metric}"))
    seconds = statistics.fmean(float(r["seconds"]) for r in mine) if mine else 0.0
    head = mine[0]["head"] if mine else "head"
    return Entry(str(p), f"adl sweep best ({head})", metric, tests or (b["test"],), int(b["params"]), seconds,
                 float(man.get("extraction_seconds") or 0.0), _dataset(man))


def check_same_data(entries: list[Entry]) -> None:
    """All entries on one data set and carving, or one line saying which differ."""
    first = entries[0]
    for e in entries[1:]:
        a, b = first.dataset, e.dataset
        if a["name"] != b["name"]:
            raise AdlError(f"{e.path} is on data set {b['name']} but {first.path} is on {a['name']}: compare runs "
                           "on one data set")
        if a["fingerprint"] != b["fingerprint"] or a["splits"] != b["splits"]:
            raise AdlError(f"{e.path} and {first.path} are on different splits of {a['name']} (split sizes "
                           f"{b['splits']} vs {a['splits']}; data set fingerprints differ): extract both from one "
                           "--limit/--seed")
        if e.metric != first.metric:
            raise AdlError(f"{e.path} selects on {e.metric} but {first.path} on {first.metric}")


def table_rows(entries: list[Entry]) -> list[dict]:
    """One row per label (seeds pooled), in first-seen order."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.label, []).append(e)
    rows = []
    for label, es in groups.items():
        tests = [t for e in es for t in e.tests]
        seconds = statistics.fmean(e.seconds for e in es)
        extraction = max(e.extraction for e in es)
        rows.append({"method": label, "metric": es[0].metric, "mean": statistics.fmean(tests),
                     "std": statistics.pstdev(tests), "seeds": len(tests), "params": es[0].params,
                     "seconds": seconds, "extraction_seconds": extraction,
                     "sweep10_seconds": extraction + SWEEP_POINTS * seconds})
    return rows


def markdown(rows: list[dict], dataset: str) -> str:
    m = rows[0]["metric"]
    lines = [f"| method ({dataset}) | test {m} (mean ± std) | seeds | trainable params | time (s) | "
             f"extraction (s) | {SWEEP_POINTS}-point sweep (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {r['seeds']} | "
                     f"{r['params']:,} | {r['seconds']:.1f} | {r['extraction_seconds']:.1f} | "
                     f"{r['sweep10_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], x: str, xlabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.errorbar(r[x], 100 * r["mean"], yerr=100 * r["std"], fmt="o", capsize=3,
                    color="tab:blue" if r["method"].startswith("adl") else "tab:orange")
        ax.annotate(r["method"], (r[x], 100 * r["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {rows[0]['metric']} (%)")
    ax.set_title("adl heads (blue) vs peers (orange); bars: std over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compare(cfg: CompareConfig, *, console: Console | None = None) -> dict:
    console = console or Console()
    out = local_folder(cfg.out, "comparisons")
    entries = [read_entry(p) for p in cfg.paths]
    check_same_data(entries)
    rows = table_rows(entries)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, entries[0].dataset["name"])
    (out / "compare.md").write_text(text)
    write_csv(out / "compare.csv", rows)
    plot(rows, "params", "trainable parameters (log)", out / "quality_vs_params.png")
    plot(rows, "seconds", "training time of one run, s (log)", out / "quality_vs_time.png")
    console.print(text, highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote compare.md, compare.csv, quality_vs_params.png, quality_vs_time.png in {out}",
                  highlight=False, soft_wrap=True)
    return {"out": str(out), "rows": rows}
