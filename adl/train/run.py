"""run_train(cfg): cache -> resolved config -> head -> fit -> a run folder.

The run folder (``--out``, default ``runs/<cache>-<head>-<YYYYmmdd-HHMMSS>``) and its files are
``adl.train.rundir``'s. metrics.json holds validation (best epoch) and test metrics, per class /
per type, the number of training examples used and, when adl chose the head, the candidates'
scores, cost and stop reasons (``candidates``) and the mix it kept (``mix``: members, weights,
and the scores of the variants measured beside it). The partial folder gets the head on every validation
improvement and history.csv after every epoch, so a run that diverges or is interrupted keeps
its last good head and its history there.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from rich.console import Console

from adl import __version__
from adl.cache import open_cache, write_json
from adl.cache.durable import write_bytes
from adl.errors import AdlError
from adl.train.config import TrainConfig, pooled_view, resolve, view_for
from adl.train.console import EpochTable, summary_line
from adl.train.data import TrainData, load_data
from adl.train.ensemble import mixed
from adl.train.head_io import make_head
from adl.train.metrics import selection_metric
from adl.train.plots import plot_final_weights, plot_weight_history
from adl.train.probe import fit_head
from adl.train.race import Race
from adl.train.rundir import prepare_out, publish, save_head, write_config, write_history
from adl.train.trainer import FitResult, TrainingDiverged


def metrics_doc(result: FitResult, layers: list[int], head: str, view: str, train_examples: int) -> dict:
    return {"head": head, "view": view, "train_examples": train_examples, "metric": result.metric,
            "best_epoch": result.best_epoch, "stop_reason": result.stop_reason, "validation": result.validation,
            "test": result.test, "layer_weights": {str(l): w for l, w in zip(layers, result.weights)},
            "active_layers": [layers[i] for i in result.active_layers], "params": result.params,
            "seconds": round(result.seconds, 3), "epochs": len(result.history)}


# ---- the recipe ----------------------------------------------------------------------------

@dataclasses.dataclass
class Trained:
    cfg: TrainConfig
    view: str
    data: TrainData
    head: torch.nn.Module
    result: FitResult
    info: dict  # head.json's task, layers, view, pool, projection


def candidates(cfg: TrainConfig, cache) -> list[TrainConfig]:
    """The resolved configs ``adl train`` tries. One when ``--head`` is given. Otherwise every
    default head the cache allows, each with the preset's values: the tokens head (a tokens
    view), adalayers-pooled (a sequence task with a pooled view), and the concat probe (an L2
    logistic regression on all layers, C chosen on validation). ``run_train`` trains them
    cheapest first, stops the costly ones once they cannot catch the best so far on validation
    (``adl.train.race``), and keeps the mix of their probabilities that validation prefers
    (``adl.train.ensemble``: one of them alone is on the grid too).

    Why (docs/quality.md, bench/curve.py): on tweets from 500 to 29,795 training examples the
    pooled head scored above the tokens head and above the best linear probe, where the tokens
    head could lose to the probe; on WNUT-16 (1,916 sentences) the tokens head and the concat
    probe tie, and either can win on a seed. The published setups (IMDB, 25k long reviews) favour
    the tokens head. The pooled head costs a few percent of a tokens head's training and the
    probe 10-30 %, so adl trains them all rather than guess from the data size or the task."""
    first = resolve(cfg, cache)
    if cfg.head is not None:
        return [first]
    others = ["concat-probe"]
    if cache.task == "sequence" and first.head == "adalayers" and pooled_view(cache, cfg.pool) is not None:
        others.insert(0, "adalayers-pooled")
    return [first, *(resolve(dataclasses.replace(cfg, head=h), cache) for h in others)]


# training order is this one reversed (the cheapest first); on a validation tie the later (cheaper) is the best single
TIE_ORDER = ("adalayers", "adalayers-pooled", "concat-probe")


def tie_rank(head: str) -> int:
    """Where ``head`` stands in TIE_ORDER (-1 for a head given with --head: it has no rival)."""
    return TIE_ORDER.index(head) if head in TIE_ORDER else -1


def fit_candidate(cfg: TrainConfig, cache, console: Console, out: Path | None,
                  loaded: dict[str, TrainData] | None = None, leader: float | None = None) -> Trained:
    """Load the view (or take it from ``loaded``, which it fills), build and train one head with
    the live table; with ``out``, the head is saved there at every validation improvement and
    history.csv after every epoch. With ``leader`` (a rival's validation score) the head races it
    (``adl.train.race``) and stops once it cannot catch it."""
    view = view_for(cfg.head, cache, cfg.pool)
    loaded = {} if loaded is None else loaded
    if view not in loaded:
        loaded[view] = load_data(cache, view, device=cfg.device, seed=cfg.seed, memory_gb=cfg.memory_gb,
                                 train_limit=cfg.train_limit)
    data = loaded[view]
    torch.manual_seed(cfg.seed)
    head = make_head(cfg, data, cache.manifest)
    info = {"label_names": data.label_names, "layers": data.layers, "task": data.task, "view": view,
            "pool": view.split(":", 1)[1] if view.startswith("pooled:") else None,
            "projection": cache.manifest.get("projection") if view == "tokens" else None, "cache_hash": cache.hash}
    metric = selection_metric(data.task)
    table = EpochTable(console, metric, data.layers)
    race = None if leader is None else Race(leader, cfg.patience)

    def on_epoch(i: int, row: dict) -> bool:
        table.update(row)
        if out is not None:
            write_history(out / "history.csv", table.history)  # an interrupted run keeps its history
        return race is not None and race.behind(row[f"val_{metric}"])

    on_best = None if out is None else (lambda i, epoch: save_head(out, head, {**info, "epoch": epoch}))
    try:
        with table:
            result = fit_head(head, data, cfg, on_epoch=on_epoch, on_best=on_best)
    except TrainingDiverged as e:
        where = f" in {out}/head.safetensors (the unfinished run)" if e.best_epoch and out is not None else ""
        raise AdlError(f"{e}{where}") from None
    return Trained(cfg, view, data, head, result, info)


def run_train(cfg: TrainConfig, *, console: Console | None = None) -> dict:
    """Train one head on a cache and write the run folder; returns {"out", "config", "metrics"}.

    With no --head: the candidates train cheapest first, each racing the best so far
    (``fit_candidate``), and ``mixed`` keeps the mix of them that validation prefers."""
    console = console or Console()
    t0 = time.perf_counter()
    cache = open_cache(cfg.cache)
    configs = candidates(cfg, cache)
    final = Path(configs[0].out)
    out = prepare_out(configs[0].out, configs[0].overwrite, "train")
    if len(configs) > 1:
        names = [c.head + (" (tokens)" if c.head == "adalayers" else "") for c in configs]
        console.print(f"head: a mix, chosen on validation, of {', '.join(names[:-1])} and {names[-1]}, with the "
                      f"{configs[0].preset} preset (cheapest first; a candidate stops once it cannot catch the "
                      "best so far; choose one head with --head)", highlight=False, soft_wrap=True)
    write_json(out / "cache_manifest.json", cache.manifest)
    loaded: dict[str, TrainData] = {}
    metric = selection_metric(cache.task)
    tried: list[Trained] = []
    for c in sorted(configs, key=lambda c: -tie_rank(c.head)):  # cheapest first: it sets the pace
        lead = max(tried, key=lambda t: t.result.validation[metric], default=None)
        t = fit_candidate(c, cache, console, out if c is configs[0] else None, loaded,
                          None if lead is None else lead.result.validation[metric])
        if t.result.stop_reason == "pruned":
            t.result.stop_reason = (f"raced: stopped at epoch {len(t.result.history)}, when it could no longer "
                                    f"catch {lead.cfg.head}'s validation {metric} "
                                    f"({lead.result.validation[metric]:.4f})")
            console.print(f"{c.head}: {t.result.stop_reason}", highlight=False, soft_wrap=True)
        tried.append(t)
    best = max(tried, key=lambda t: (t.result.validation[metric], tie_rank(t.cfg.head)))
    cfg, data, result = best.cfg, best.data, best.result
    head, view, info, doc = best.head, best.view, best.info, metrics_doc(result, data.layers, cfg.head, best.view,
                                                                          data.train.n)
    if len(tried) > 1:
        mix = mixed(tried, best, cache)
        head, view, info = mix.head, mix.view, mix.info
        weights = head.weights().detach().float().cpu()
        doc.update(head=mix.name, view=view, validation=mix.validation, test=mix.test, mix=mix.doc,
                   seconds=round(sum(t.result.seconds for t in tried), 3),
                   params=sum(p.numel() for p in head.parameters()),
                   active_layers=[data.layers[i] for i in torch.nonzero(weights > 0).flatten().tolist()])
        doc["candidates"] = {t.cfg.head: {"view": t.view, f"validation_{metric}": t.result.validation[metric],
                                          "test_" + metric: (t.result.test or {}).get(metric),
                                          "best_epoch": t.result.best_epoch, "epochs": len(t.result.history),
                                          "stop_reason": t.result.stop_reason, "seconds": round(t.result.seconds, 3)}
                             for t in tried}
        scores = ", ".join(f"{t.cfg.head} {t.result.validation[metric]:.4f}" for t in tried)
        console.print(f"kept {mix.name} (validation {metric}: {scores}; the mix {mix.validation[metric]:.4f})",
                      highlight=False, soft_wrap=True)
    write_config(out, "train", {"config": dataclasses.asdict(cfg), "cache_hash": cache.hash,
                                "adl_version": __version__, "view": view})
    if view == "tokens" and cache.root.exists("projection.safetensors"):  # the cache may be a URL
        write_bytes(out / "projection.safetensors", cache.root.read_bytes("projection.safetensors"))
    save_head(out, head, {**info, "epoch": result.best_epoch})
    write_json(out / "metrics.json", doc)
    write_history(out / "history.csv", result.history)
    plot_weight_history(result.history, data.layers, out / "layer_weights.png")
    plot_final_weights(result.weights, data.layers, out / "layer_weights_final.png")
    publish(out, final)
    out = final
    sample = f" | {data.train.n} training examples" if cfg.train_limit is not None else ""
    console.print(summary_line(doc["head"], doc) + f"{sample} | {time.perf_counter() - t0:.1f}s total | {out}",
                  highlight=False, soft_wrap=True)
    console.print(f"plots: {out / 'layer_weights.png'}, {out / 'layer_weights_final.png'}", highlight=False,
                  soft_wrap=True)
    return {"out": str(out), "config": dataclasses.asdict(cfg), "metrics": doc}
