"""A sweep's outputs, rebuilt from its study at any time (finished or still running).

    results.csv            one row per trial and seed: swept values, seed, head, trainable
                           parameters, val_* and test_* metrics, epochs, best epoch, seconds,
                           group size, active layers, final weight per layer (w_<layer>), state
    best.json              the best point by mean validation metric over its seeds
    (console)              a rich table of the top configurations
    *.png                  sweep_plots.draw_all

``report_sweep(folder)`` (``adl sweep --report DIR``) reads sweep.json to find the storage and
study, and redraws everything; it never trains.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table

from adl.cache import read_json, write_csv, write_json
from adl.errors import AdlError
from adl.sweep.plots import draw_all
from adl.sweep.storage import default_storage, open_storage, safe_url
from adl.sweep.study import study_progress, study_records

LEAD = ("trial", "state")
TAIL = ("seed", "head", "params")


def flat_rows(records: list[dict], dims: list[str], layers: list[int], metric: str) -> list[dict]:
    """One dict per (trial, seed) run, in results.csv's column order."""
    rows = []
    for rec in records:
        for run in rec["runs"]:
            row = {"trial": rec["trial"], "state": rec["state"]}
            row.update({d: run["point"].get(d) for d in dims if d != "seed"})
            row.update(seed=run.get("seed"), head=run.get("head"), params=run.get("params"))
            row.update({f"val_{k}": v for k, v in (run.get("val") or {}).items()})
            row.update({f"test_{k}": v for k, v in (run.get("test") or {}).items()})
            for k in ("epochs", "best_epoch", "seconds", "group_size", "stop_reason"):
                row[k] = run.get(k)
            row["active_layers"] = ";".join(str(l) for l in run.get("active_layers") or [])
            row.update({f"w_{l}": w for l, w in zip(layers, run.get("weights") or [])})
            row["error"] = run.get("error")
            rows.append(row)
    return rows


def by_point(rows: list[dict], dims: list[str], metric: str) -> list[dict]:
    """Completed runs grouped by point (seeds pooled), best mean validation metric first."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["state"] == "complete" and r.get(f"val_{metric}") is not None:
            groups.setdefault(tuple((d, r.get(d)) for d in dims if d != "seed"), []).append(r)
    points = []
    for key, runs in groups.items():
        val = [r[f"val_{metric}"] for r in runs]
        test = [r[f"test_{metric}"] for r in runs if r.get(f"test_{metric}") is not None]
        points.append({"point": dict(key), "seeds": [r["seed"] for r in runs], "val": statistics.fmean(val),
                       "val_std": statistics.pstdev(val), "test": statistics.fmean(test) if test else None,
                       "test_std": statistics.pstdev(test) if test else None, "params": runs[0]["params"],
                       "active_layers": runs[0]["active_layers"], "trials": [r["trial"] for r in runs],
                       "epochs": statistics.fmean(r["epochs"] for r in runs)})
    return sorted(points, key=lambda p: -p["val"])


def best_doc(points: list[dict], meta: dict, cache: str) -> dict:
    if not points:
        return {"metric": meta["metric"], "best": None}
    best = points[0]
    flags = " ".join(f"--{'lambda' if k == 'lam' else k.replace('_', '-')} {v}" for k, v in best["point"].items())
    return {"metric": meta["metric"], "best": best, "base": meta["definition"]["base"],
            "command": f"adl train --cache {cache} {flags}".strip(), "cache_hash": meta["cache_hash"]}


def top_table(points: list[dict], metric: str, n: int) -> Table:
    t = Table(title=f"top configurations (by mean validation {metric})", box=None, header_style="bold")
    dims = list(points[0]["point"]) if points else []
    for col in [*("lambda" if d == "lam" else d for d in dims), "seeds", f"val {metric}", f"test {metric}",
                "params", "active layers", "epochs"]:
        t.add_column(col, justify="right")
    pm = lambda m, s: "" if m is None else (f"{m:.4f}" if not s else f"{m:.4f} ± {s:.4f}")  # noqa: E731
    for p in points[:n]:
        values = (f"{v:.4g}" if isinstance(v, float) else str(v) for v in p["point"].values())
        t.add_row(*values, str(len(p["seeds"])), pm(p["val"], p["val_std"]),
                  pm(p["test"], p["test_std"]), f"{p['params']:,}", p["active_layers"] or "-", f"{p['epochs']:.0f}")
    return t


def read_baselines(paths: list[Path], metric: str) -> list[dict]:
    """single-layer and probe rows of the first baselines.csv found (``adl baselines`` format)."""
    for path in paths:
        if path.is_file():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            num = lambda v: float(v) if v not in (None, "") else None  # noqa: E731
            return [{"name": r["name"], "layer": r["layer"], "params": num(r.get("params")),
                     "val": num(r.get(f"val_{metric}")), "test": num(r.get(f"test_{metric}"))}
                    for r in rows if r.get("name") in ("single-layer", "linear-probe", "concat-probe")
                    and num(r.get("params"))]
    return []


def baseline_paths(out: Path, cache: str, given: str | None = None, sampled: bool = False) -> list[Path]:
    """Where a sweep's baselines are: the given file, else its own, else the cache folder's (not
    when the sweep trains on a --train-limit sample: those were fitted on the whole split)."""
    if given not in (None, "auto", "off"):
        p = Path(given)
        return [p / "baselines.csv" if p.is_dir() else p]
    return [out / "baselines.csv"] + ([] if sampled else [Path(cache) / "baselines.csv"])


def write_outputs(out: Path, study: optuna.Study, *, console: Console, top: int = 10,
                  baselines: str | None = None) -> dict:
    """results.csv, best.json, the table and the figures of ``study`` into ``out``."""
    meta = study.user_attrs.get("adl")
    if meta is None:
        raise AdlError(f"study {study.study_name!r} was not written by adl sweep; nothing to report")
    dims, layers, metric = meta["dims"], meta["layers"], meta["metric"]
    rows = flat_rows(study_records(study), dims, layers, metric)
    info = read_json(out / "sweep.json") if (out / "sweep.json").is_file() else {}
    cache, sampled = info.get("cache", ""), info.get("train_limit") is not None
    points = by_point(rows, dims, metric)
    if rows:
        write_csv(out / "results.csv", rows)
    write_json(out / "best.json", best_doc(points, meta, cache))
    base_rows = read_baselines(baseline_paths(out, cache, baselines, sampled), metric) if baselines != "off" else []
    figures = draw_all(out, rows, base_rows, dims, layers, metric)
    progress = study_progress(study)
    if points:
        console.print(top_table(points, metric, top))
        b = points[0]
        test = f", test {b['test']:.4f}" if b["test"] is not None else ""
        console.print(f"best: {b['point']} validation {metric} {b['val']:.4f}{test}", highlight=False)
    console.print(f"trials: {', '.join(f'{n} {s}' for s, n in sorted(progress.items())) or 'none'}; "
                  f"{len(figures)} figure(s) in {out}", highlight=False)
    return {"best": points[0] if points else None, "rows": len(rows), "progress": progress, "figures": figures}


def report_sweep(folder, *, storage: str | None = None, console: Console | None = None) -> dict:
    """Redraw a sweep folder's outputs from its study (``adl sweep --report DIR``)."""
    console = console or Console()
    out = Path(folder)
    if not (out / "sweep.json").is_file():
        raise AdlError(f"{out} is not a sweep folder (no sweep.json); give the --out of an `adl sweep`")
    info = read_json(out / "sweep.json")
    if storage is None and info["storage"] == "default" and not (out / "study.db").is_file():
        raise AdlError(f"{out} has no study.db; pass the sweep's --storage URL")
    url = storage or (default_storage(out) if info["storage"] == "default" else info["storage"])
    if "***" in url:
        raise AdlError(f"the study's storage URL has a password ({url}); pass it with --storage URL")
    try:
        study = optuna.load_study(study_name=info["study"], storage=open_storage(url))
    except KeyError:
        raise AdlError(f"no study {info['study']!r} in {safe_url(url)}; pass the sweep's --storage") from None
    return write_outputs(out, study, console=console)
