"""run_finetune(cfg): cache manifest -> the same examples as raw text -> a peer -> a run folder.

The run folder has ``adl train``'s files (adl.train.rundir's prepare_out / publish / write_history):

    config.json           {"adl_run": "finetune", "config": resolved FinetuneConfig, "cache_hash",
                          "adl_version", "method", "source"}
    metrics.json          validation (selected epoch) and test metrics, plus the cost: trainable
                          parameters, seconds to the selected checkpoint and in total, peak memory,
                          backbone forward passes
    history.csv           per epoch: loss, val_<metric>..., lr, seconds
    cache_manifest.json   the cache's manifest (backbone, data set, carving)

Peer weights are not kept: a run is a measurement for ``adl compare``, not a model to serve.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console

from adl import __version__
from adl.cache import open_cache, write_json
from adl.errors import AdlError
from adl.extract import models
from adl.extract.recorded import recorded_backbone
from adl.peers.config import PROMPT_METHODS, SOURCES, FinetuneConfig, resolve
from adl.peers.data import load_peer_data, refuse_projection
from adl.peers.loop import PeerResult, fit_peer
from adl.peers.model import build
from adl.peers.setfit import fit_setfit
from adl.train.console import EpochTable
from adl.train.metrics import selection_metric
from adl.train.rundir import prepare_out, publish, write_config, write_history


def default_out(cache: str, method: str) -> str:
    return str(Path("runs") / f"{Path(cache).name}-{method}-{datetime.now():%Y%m%d-%H%M%S}")


def cache_pool(manifest: dict) -> str:
    """The pool of the cache's first pooled view (what adl's pooled heads read), else mean / last."""
    pools = [v.split(":", 1)[1] for v in manifest["views"] if v.startswith("pooled:")]
    return pools[0] if pools else ("last" if manifest["model"]["states"] == "decoder" else "mean")


def run_finetune(cfg: FinetuneConfig, *, console: Console | None = None) -> dict:
    """Train one peer on a cache's examples and write its run folder; -> {"out", "config", "metrics"}."""
    console = console or Console()
    t0 = time.perf_counter()
    cfg = resolve(cfg)
    cache = open_cache(cfg.cache)
    man = cache.manifest
    refuse_projection(man, cache.root)
    if cfg.method == "setfit" and man["task"] != "sequence":
        raise AdlError("--method setfit classifies whole texts; this cache is a token task (NER): use full, "
                       "bitfit, lora, prompt or ptuning-bias")
    recorded = recorded_backbone(man, f"cache {cache.root}")
    model_id = recorded.model_id
    cfg = dataclasses.replace(cfg, out=cfg.out or default_out(cfg.cache, cfg.method))
    final = Path(cfg.out)
    out = prepare_out(cfg.out, cfg.overwrite, "finetune")
    reserve = cfg.virtual_tokens if cfg.method in PROMPT_METHODS else 0
    data = load_peer_data(cache, reserve=reserve, backbone=recorded, train_limit=cfg.train_limit, seed=cfg.seed)
    device = models.select_device(cfg.device)
    write_config(out, "finetune", {"config": dataclasses.asdict(cfg), "cache_hash": cache.hash,
                                   "adl_version": __version__, "method": cfg.method, "source": SOURCES[cfg.method],
                                   "max_length": data.max_length})
    write_json(out / "cache_manifest.json", man)
    table = EpochTable(console, selection_metric(data.task), [])

    def on_epoch(i: int, row: dict) -> None:
        table.update(row)
        write_history(out / "history.csv", table.history)

    console.print(f"{cfg.method} on {model_id}: {len(data.splits['train'])} train examples, lr {cfg.lr:g}, "
                  f"batch {cfg.batch_size}, up to {cfg.max_epochs} epoch(s) ({SOURCES[cfg.method]})",
                  highlight=False, soft_wrap=True)
    with table:
        if cfg.method == "setfit":
            result = fit_setfit(model_id, data, cfg, on_epoch=on_epoch, revision=recorded.info.revision)
        else:
            backbone = recorded.load(device)
            torch.manual_seed(cfg.seed)
            model = build(backbone, cfg, len(data.label_names), data.task, cache_pool(man)).to(device.device)
            result = fit_peer(model, data, cfg, device, on_epoch=on_epoch)
    doc = metrics_doc(result, cfg, time.perf_counter() - t0, device.kind)
    write_json(out / "metrics.json", doc)
    write_history(out / "history.csv", result.history)
    publish(out, final)
    console.print(summary(doc) + f" | {final}", highlight=False, soft_wrap=True)
    return {"out": str(final), "config": dataclasses.asdict(cfg), "metrics": doc}


def peak_memory_mb(device_kind: str) -> float:
    """The process's peak resident memory (Linux ru_maxrss, KiB), or CUDA's peak allocation."""
    if device_kind == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def metrics_doc(result: PeerResult, cfg: FinetuneConfig, total: float, device_kind: str) -> dict:
    f = result.forwards
    return {"method": cfg.method, "metric": result.metric, "best_epoch": result.best_epoch,
            "stop_reason": result.stop_reason, "validation": result.validation, "test": result.test,
            "params": result.params, "seconds": round(result.seconds, 3),
            "seconds_to_best": round(result.seconds_to_best, 3), "seconds_total": round(total, 3),
            "peak_memory_mb": round(peak_memory_mb(device_kind), 1), "memory_device": device_kind,
            "forwards": {"examples": f.examples, "backward_examples": f.backward, "batches": f.batches},
            "epochs": len(result.history), "seed": cfg.seed}


def summary(doc: dict) -> str:
    m = doc["metric"]
    return (f"{doc['method']}: test {m} {doc['test'][m]:.4f} | {doc['params']:,} trainable parameters | "
            f"{doc['seconds_to_best']:.1f}s to the selected epoch, {doc['seconds']:.1f}s training, "
            f"{doc['seconds_total']:.1f}s total | peak memory {doc['peak_memory_mb']:.0f} MB | "
            f"{doc['forwards']['examples']:,} backbone example passes | best epoch {doc['best_epoch']}/{doc['epochs']}")
