"""run_train(cfg): cache -> resolved config -> head -> fit -> a run folder.

A run folder (``--out``, default ``runs/<cache>-<head>-<YYYYmmdd-HHMMSS>``) holds:

    config.json                {"config": resolved TrainConfig, "cache_hash", "adl_version", "view"}
    metrics.json               validation (best epoch) and test metrics, per class / per type,
                               and the number of training examples used
    history.csv                per epoch: loss, val_<metric>..., lr, seconds, w_<layer>...
    head.safetensors           the head's tensors (no pickles)
    head.json                  spec + label names + layers + task + view: rebuilds the head
                               without the cache (``head_io.load_head``)
    cache_manifest.json        the cache's manifest: the backbone (id, revision, config hash,
                               states), tokenizer, max_length, data set and carving
    projection.safetensors     the cache's stored projection, when it has one
    layer_weights.png          layer weights over epochs
    layer_weights_final.png    final weight per layer

A run is written aside, in ``<out>.partial/``, and swapped in whole when it finishes: an
existing run is replaced entirely or not at all. The partial folder gets the head on every
validation improvement and history.csv after every epoch, so a run that diverges or is
interrupted keeps its last good head and its history there. adl replaces or deletes only
folders holding nothing but the files above.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from adl import __version__
from adl.cache import open_cache, write_csv, write_json
from adl.cache.durable import refuse_unsafe_out
from adl.errors import AdlError
from adl.train.config import TrainConfig, resolve, view_for
from adl.train.console import EpochTable, summary_line
from adl.train.data import load_data
from adl.train.head_io import make_head, save_head
from adl.train.metrics import selection_metric
from adl.train.plots import plot_final_weights, plot_weight_history
from adl.train.probe import fit_head
from adl.train.trainer import FitResult, TrainingDiverged

RUN_FILES = frozenset({"config.json", "metrics.json", "history.csv", "head.safetensors", "head.json",
                       "cache_manifest.json", "projection.safetensors", "layer_weights.png",
                       "layer_weights_final.png", "baselines.csv", "baselines.png"})


def _adl_written(path: Path) -> bool:
    """True for a folder whose every entry is a file adl writes into run folders (or its temp files)."""
    return all(p.name in RUN_FILES or (p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file())
               for p in path.iterdir())


def prepare_out(out: str, overwrite: bool) -> Path:
    """The partial folder a new run is written into (``<out>.partial``, fresh); refuse an ``out``
    that exists unless ``overwrite``, and any folder that holds files adl did not write."""
    path = Path(out)
    refuse_unsafe_out(path, "runs/NAME")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise AdlError(f"run folder {path} already exists; pass --overwrite to replace it or choose another --out")
        if not _adl_written(path):
            raise AdlError(f"--out {path} holds files adl did not write; adl replaces only its own run folders: "
                           "choose another --out")
    partial = path.with_name(path.name + ".partial")
    if partial.is_symlink() or (partial.exists() and not (partial.is_dir() and _adl_written(partial))):
        raise AdlError(f"{partial} exists and is not an unfinished adl run; move it away or choose another --out")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, out: Path) -> None:
    """Swap the finished run in: the old run (adl-written, checked by prepare_out) goes whole."""
    old = out.with_name(out.name + ".replaced")
    if out.is_dir():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(partial, out)
    if old.exists():
        shutil.rmtree(old)


def write_history(path: Path, history: list[dict]) -> None:
    if history:
        write_csv(path, history)


def metrics_doc(result: FitResult, layers: list[int], head: str, view: str, train_examples: int) -> dict:
    return {"head": head, "view": view, "train_examples": train_examples, "metric": result.metric,
            "best_epoch": result.best_epoch, "stop_reason": result.stop_reason, "validation": result.validation,
            "test": result.test, "layer_weights": {str(l): w for l, w in zip(layers, result.weights)},
            "active_layers": [layers[i] for i in result.active_layers], "params": result.params,
            "seconds": round(result.seconds, 3), "epochs": len(result.history)}


# ---- the recipe ----------------------------------------------------------------------------

def run_train(cfg: TrainConfig, *, console: Console | None = None) -> dict:
    """Train one head on a cache and write the run folder; returns {"out", "config", "metrics"}."""
    console = console or Console()
    t0 = time.perf_counter()
    cache = open_cache(cfg.cache)
    picked = cfg.head is None
    cfg = resolve(cfg, cache)
    view = view_for(cfg.head, cache, cfg.pool)
    final = Path(cfg.out)
    out = prepare_out(cfg.out, cfg.overwrite)
    if picked:
        console.print(f"head: {cfg.head} (picked because the cache {'has' if view == 'tokens' else 'lacks'} "
                      "a tokens view; choose with --head)")
    data = load_data(cache, view, device=cfg.device, seed=cfg.seed, memory_gb=cfg.memory_gb,
                     train_limit=cfg.train_limit)
    torch.manual_seed(cfg.seed)
    head = make_head(cfg, data, cache.manifest)
    write_json(out / "config.json", {"config": dataclasses.asdict(cfg), "cache_hash": cache.hash,
                                     "adl_version": __version__, "view": view})
    write_json(out / "cache_manifest.json", cache.manifest)
    if (cache.root / "projection.safetensors").is_file() and view == "tokens":
        shutil.copyfile(cache.root / "projection.safetensors", out / "projection.safetensors")
    info = {"label_names": data.label_names, "layers": data.layers, "task": data.task, "view": view,
            "pool": view.split(":", 1)[1] if view.startswith("pooled:") else None,
            "projection": cache.manifest.get("projection") if view == "tokens" else None, "cache_hash": cache.hash}
    table = EpochTable(console, selection_metric(data.task), data.layers)

    def on_epoch(i: int, row: dict) -> None:
        table.update(row)
        write_history(out / "history.csv", table.history)  # an interrupted run keeps its history

    try:
        with table:
            result = fit_head(head, data, cfg, on_epoch=on_epoch,
                         on_best=lambda i, epoch: save_head(out, head, {**info, "epoch": epoch}))
    except TrainingDiverged as e:
        where = f" in {out}/head.safetensors (the unfinished run)" if e.best_epoch else ""
        raise AdlError(f"{e}{where}") from None
    save_head(out, head, {**info, "epoch": result.best_epoch})
    doc = metrics_doc(result, data.layers, cfg.head, view, data.train.n)
    write_json(out / "metrics.json", doc)
    write_history(out / "history.csv", result.history)
    plot_weight_history(result.history, data.layers, out / "layer_weights.png")
    plot_final_weights(result.weights, data.layers, out / "layer_weights_final.png")
    publish(out, final)
    out = final
    sample = f" | {data.train.n} training examples" if cfg.train_limit is not None else ""
    console.print(summary_line(cfg.head, doc) + f"{sample} | {time.perf_counter() - t0:.1f}s total | {out}",
                  highlight=False, soft_wrap=True)
    console.print(f"plots: {out / 'layer_weights.png'}, {out / 'layer_weights_final.png'}", highlight=False,
                  soft_wrap=True)
    return {"out": str(out), "config": dataclasses.asdict(cfg), "metrics": doc}
