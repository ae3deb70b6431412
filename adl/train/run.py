"""run_train(cfg): cache -> resolved config -> head -> fit -> a run folder.

A run folder (``--out``, default ``runs/<cache>-<head>-<YYYYmmdd-HHMMSS>``) holds:

    config.json                {"config": resolved TrainConfig, "cache_hash", "adl_version", "view"}
    metrics.json               validation (best epoch) and test metrics, per class / per type
    history.csv                per epoch: loss, val_<metric>..., lr, seconds, w_<layer>...
    head.safetensors           the head's tensors (no pickles)
    head.json                  spec + label names + layers + task + view + projection: rebuilds
                               the head without the cache (``load_head``)
    layer_weights.png          layer weights over epochs
    layer_weights_final.png    final weight per layer

head.safetensors/head.json are rewritten on every validation improvement and history.csv after
every epoch, so a run that diverges or is interrupted keeps its last good head and its history.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from adl import __version__
from adl.cache import open_cache, read_json, write_json
from adl.errors import AdlError
from adl.train.config import TrainConfig, resolve, view_for
from adl.train.data import TrainData, load_data
from adl.train.heads import build_head, head_from_spec, head_hparams, head_spec
from adl.train.metrics import selection_metric
from adl.train.plots import plot_final_weights, plot_weight_history
from adl.train.trainer import FitResult, TrainingDiverged, fit

# ---- the head ------------------------------------------------------------------------------

def gelu_in_cache(manifest: dict, view: str) -> bool:
    """True when the cache's tokens were stored as P GELU(Z): the head must not apply GELU again."""
    proj = manifest.get("projection")
    return view == "tokens" and isinstance(proj, dict) and proj.get("activation") == "gelu"


def make_head(cfg: TrainConfig, data: TrainData, manifest: dict, *, name: str | None = None,
              **extra) -> nn.Module:
    """Build head ``name`` (default cfg.head) for ``data`` with the hyperparameters it accepts.

    single-layer on a pooled view is adalayers-pooled with a one-hot mix (``fixed_layer``).
    ``extra`` overrides (baselines pass layer=i or layers=[...]).
    """
    name = name or cfg.head
    values = dict(k=cfg.k, alpha=cfg.alpha, cutoff=cfg.cutoff, dropout=cfg.dropout, heads=cfg.heads,
                  pos_emb=cfg.pos_emb, max_len=max(512, data.max_len), layers_enc=cfg.layers_enc, ff=cfg.ff,
                  norm_affine=cfg.norm_affine, post_gelu=cfg.post_gelu, hidden=cfg.hidden, layer=cfg.layer)
    values.update(extra)
    if name == "single-layer" and data.view != "tokens":
        name, values["fixed_layer"] = "adalayers-pooled", values.pop("layer")
    gelu_done = gelu_in_cache(manifest, data.view)
    if gelu_done and "activation" in head_hparams(name):
        values["activation"] = False
    kwargs = {k: v for k, v in values.items() if k in head_hparams(name) and v is not None}
    head = build_head(name, n_layers=data.n_layers, in_dim=data.in_dim, n_classes=len(data.label_names),
                      task=data.task, **kwargs)
    if gelu_done:
        _skip_gelu(head)
    return head


def _skip_gelu(head: nn.Module) -> None:
    # heads.py's AdaLayersHead/PooledHead do not take ``activation``; set it on their LayerMix.
    if hasattr(head, "mix"):
        head.mix.activation = False


def save_head(out: Path, head: nn.Module, info: dict) -> None:
    """head.safetensors (contiguous CPU tensors) + head.json (spec and what the tensors mean)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tmp = out / ".head.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "head.safetensors")
    write_json(out / "head.json", {**info, "spec": head_spec(head), "adl_version": __version__})


def load_head(run_dir) -> tuple[nn.Module, dict]:
    """Rebuild a trained head from a run folder alone: (head in eval mode, head.json contents)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not (run_dir / "head.json").is_file() or not (run_dir / "head.safetensors").is_file():
        raise AdlError(f"{run_dir} holds no trained head (head.json + head.safetensors); train one with `adl train`")
    info = read_json(run_dir / "head.json")
    head = head_from_spec(info["spec"])
    if info.get("gelu_in_cache"):
        _skip_gelu(head)
    head.load_state_dict(load_file(str(run_dir / "head.safetensors")))
    return head.eval(), info


# ---- the run folder ------------------------------------------------------------------------

def prepare_out(out: str, overwrite: bool) -> Path:
    """Create the run folder; refuse one that already holds a run unless ``overwrite``."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise AdlError(f"--out {path} is a file, not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AdlError(f"run folder {path} already exists; pass --overwrite to replace it or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def metrics_doc(result: FitResult, layers: list[int], head: str, view: str) -> dict:
    return {"head": head, "view": view, "metric": result.metric, "best_epoch": result.best_epoch,
            "stop_reason": result.stop_reason, "validation": result.validation, "test": result.test,
            "layer_weights": {str(l): w for l, w in zip(layers, result.weights)},
            "active_layers": [layers[i] for i in result.active_layers], "params": result.params,
            "seconds": round(result.seconds, 3), "epochs": len(result.history)}


# ---- display -------------------------------------------------------------------------------

class EpochTable:
    """A rich live table (last ``rows`` epochs): epoch, loss, validation metric, lr, active layers."""

    def __init__(self, console: Console, metric: str, layers: list[int], rows: int = 15):
        self.console, self.metric, self.layers, self.rows = console, metric, layers, rows
        self.history: list[dict] = []
        self.live = Live(self._table(), console=console, refresh_per_second=4, auto_refresh=False)

    def __enter__(self):
        if self.console.is_terminal:  # a log file gets one plain line per epoch instead
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.console.is_terminal:
            self.live.stop()

    def update(self, row: dict, head) -> None:
        self.history.append(row)
        if self.console.is_terminal:
            self.live.update(self._table(), refresh=True)
        else:
            epoch, loss, val, lr, active = self._cells(row)
            self.console.print(f"epoch {epoch}: loss {loss}, val {self.metric} {val}, lr {lr}, active layers {active}",
                               highlight=False)

    def _cells(self, r: dict) -> tuple[str, ...]:
        active = [str(l) for l in self.layers if r[f"w_{l}"] > 0]
        return (str(r["epoch"]), f"{r['loss']:.4f}", f"{r['val_' + self.metric]:.4f}", f"{r['lr']:.2g}",
                ",".join(active) if len(active) < len(self.layers) else "all")

    def _table(self) -> Table:
        t = Table(title=f"training (selection: validation {self.metric})", box=None, header_style="bold")
        for col in ("epoch", "loss", f"val {self.metric}", "lr", "active layers"):
            t.add_column(col, justify="right")
        for r in self.history[-self.rows:]:
            t.add_row(*self._cells(r))
        return t


@contextlib.contextmanager
def epoch_progress(console: Console, what: str, epochs: int):
    """A transient bar over configuration-epochs (early stops may end it short of ``epochs``);
    yields ``tick(val)``, called after every epoch of every configuration with its validation score."""
    best = -float("inf")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=epochs)

        def tick(val: float) -> None:
            nonlocal best
            best = max(best, val)
            bar.update(task, advance=1, description=f"{what}, best validation {best:.4f}")

        yield tick


def summary_line(head: str, doc: dict) -> str:
    m, test = doc["metric"], doc["test"]
    score = f"test {m} {test[m]:.4f}" if test else f"val {m} {doc['validation'][m]:.4f} (no labelled test split)"
    if test and "mcc" in test:
        score += f", mcc {test['mcc']:.4f}"
    return (f"{head}: {score} | active layers {doc['active_layers']} | {doc['params']:,} trainable parameters | "
            f"{doc['seconds']:.1f}s | best epoch {doc['best_epoch']}/{doc['epochs']}")


# ---- the recipe ----------------------------------------------------------------------------

def run_train(cfg: TrainConfig, *, console: Console | None = None) -> dict:
    """Train one head on a cache and write the run folder; returns {"out", "config", "metrics"}."""
    console = console or Console()
    t0 = time.perf_counter()
    cache = open_cache(cfg.cache)
    picked = cfg.head is None
    cfg = resolve(cfg, cache)
    view = view_for(cfg.head, cache, cfg.pool)
    out = prepare_out(cfg.out, cfg.overwrite)
    if picked:
        console.print(f"head: {cfg.head} (picked because the cache {'has' if view == 'tokens' else 'lacks'} "
                      "a tokens view; choose with --head)")
    data = load_data(cache, view, device=cfg.device, seed=cfg.seed, memory_gb=cfg.memory_gb)
    torch.manual_seed(cfg.seed)
    head = make_head(cfg, data, cache.manifest)
    write_json(out / "config.json", {"config": dataclasses.asdict(cfg), "cache_hash": cache.hash,
                                     "adl_version": __version__, "view": view})
    info = {"label_names": data.label_names, "layers": data.layers, "task": data.task, "view": view,
            "projection": cache.manifest.get("projection"), "gelu_in_cache": gelu_in_cache(cache.manifest, view),
            "cache_hash": cache.hash}
    table = EpochTable(console, selection_metric(data.task), data.layers)

    def on_epoch(row: dict, h: nn.Module) -> None:
        table.update(row, h)
        write_history(out / "history.csv", table.history)  # an interrupted run keeps its history

    try:
        with table:
            result = fit(head, data, cfg, on_epoch=on_epoch,
                         on_best=lambda h, epoch: save_head(out, h, {**info, "epoch": epoch}))
    except TrainingDiverged as e:
        where = f" in {out}/head.safetensors" if e.best_epoch else ""
        raise AdlError(f"{e}{where}") from None
    save_head(out, head, {**info, "epoch": result.best_epoch})
    doc = metrics_doc(result, data.layers, cfg.head, view)
    write_json(out / "metrics.json", doc)
    write_history(out / "history.csv", result.history)
    plot_weight_history(result.history, data.layers, out / "layer_weights.png")
    plot_final_weights(result.weights, data.layers, out / "layer_weights_final.png")
    console.print(summary_line(cfg.head, doc) + f" | {time.perf_counter() - t0:.1f}s total | {out}",
                  highlight=False, soft_wrap=True)
    console.print(f"plots: {out / 'layer_weights.png'}, {out / 'layer_weights_final.png'}", highlight=False,
                  soft_wrap=True)
    return {"out": str(out), "config": dataclasses.asdict(cfg), "metrics": doc}


def read_run(run_dir) -> dict:
    """config.json + metrics.json of a finished run (for sweeps and reports)."""
    run_dir = Path(run_dir)
    return {"config": json.loads((run_dir / "config.json").read_text()),
            "metrics": json.loads((run_dir / "metrics.json").read_text())}
