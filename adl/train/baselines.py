"""run_baselines(cfg): the neighbouring methods on the same cache, trainer and budget.

Every trained baseline uses the resolved TrainConfig unchanged (same lr, batch size,
max_epochs, patience, lr_patience, seed, dropout where the head has one):

    adalayers     the method (adalayers on a tokens view, else adalayers-pooled)
    single-layer  one row per layer i: the same head with the mix fixed one-hot on i; its
                  projection W_i IS trained (the reference code left it random)
    linear-probe  one row per layer: L2 logistic regression on the layer's pooled states,
                  solved to convergence, C chosen on validation (probe.fit_probe)
    concat-probe  the same on all layers concatenated
    scalar-mix    ELMo: gamma * sum_i softmax(s)_i z_i, then linear
    head2toe      linear head on all layers' normalised features with group lasso
                  (coefficient ``lasso``), keep the top ``keep`` fraction of layers by group
                  norm, retrain on those layers without the lasso
    hsv           training-free hidden-state variability per layer (Xie et al. 2022), lower
                  is better, on at most HSV_ROWS training rows: pooled features for sequence
                  tasks (mean over tokens when only a tokens view exists), first-sub-token
                  features of words for token tasks

Writes ``baselines.csv`` (name, layer, val_<metric>, test_<metric>, params, seconds, hsv),
``baselines.png`` (single-layer test scores as bars, adalayers as a line) and config.json.
A sweep trains the single-layer and probe rows with ``layer_baselines`` and writes them
with ``write_baselines_csv``, so its plots read the same file format.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from adl import __version__
from adl.cache import open_cache, write_csv
from adl.train.config import TrainConfig, auto_head, resolve, view_for
from adl.train.console import epoch_progress
from adl.train.data import TrainData, load_data
from adl.train.head_io import make_head
from adl.train.heads import masked_mean
from adl.train.metrics import hidden_state_variability, selection_metric
from adl.train.plots import plot_baselines
from adl.train.probe import fit_head
from adl.train.rundir import prepare_out, publish, write_config

HSV_ROWS = 4096  # rows (examples or words) for the hsv score: memory HSV_ROWS * L * D * 4 bytes


class Views:
    """Loads each view of ``cache`` once (with ``cfg``'s device, seed, memory budget and train_limit)."""

    def __init__(self, cache, cfg: TrainConfig):
        self.cache, self.cfg, self.loaded = cache, cfg, {}

    def get(self, view: str) -> TrainData:
        if view not in self.loaded:
            self.loaded[view] = load_data(self.cache, view, device=self.cfg.device, seed=self.cfg.seed,
                                          memory_gb=self.cfg.memory_gb, train_limit=self.cfg.train_limit)
        return self.loaded[view]

    def for_head(self, name: str) -> TrainData:
        return self.get(view_for(name, self.cache, self.cfg.pool))


def _train(name: str, label: str, shown, cfg: TrainConfig, views: Views, console: Console, *,
           data: TrainData | None = None, **extra):
    """Fit one baseline head (``shown``: its csv "layer" entry) on ``data`` (default: the head's
    own view); returns (csv row, FitResult, head)."""
    data = data or views.for_head(name)
    torch.manual_seed(cfg.seed)
    head = make_head(cfg, data, views.cache.manifest, name=name, **extra)
    m = selection_metric(data.task)
    with epoch_progress(console, label, cfg.max_epochs) as tick:
        result = fit_head(head, data, cfg, on_epoch=lambda i, row: tick(row[f"val_{m}"]))
    row = {"name": label, "layer": shown, f"val_{m}": result.validation[m],
           f"test_{m}": result.test[m] if result.test else None, "params": result.params,
           "seconds": round(result.seconds, 3), "hsv": None}
    test = f"test {row[f'test_{m}']:.4f}" if result.test else "no test split"
    console.print(f"{label:<14} layer {str(shown):<8} val {m} {result.validation[m]:.4f}  {test}  "
                  f"{result.params:,} params  {result.seconds:.1f}s", highlight=False, soft_wrap=True)
    return row, result, head


def layer_baselines(cfg: TrainConfig, views: Views, console: Console, view: str | None = None) -> list[dict]:
    """One single-layer row per layer (the mix fixed one-hot, W_i trained) on ``view`` (default:
    the head's own), then the linear probes (logistic regression, C chosen on validation): one
    per layer and one on all layers concatenated, on their own (pooled) view."""
    data = views.get(view) if view is not None else None
    layers = views.cache.layers
    rows = [_train("single-layer", "single-layer", layer, cfg, views, console, data=data, layer=i)[0]
            for i, layer in enumerate(layers)]
    rows += [_train("linear-probe", "linear-probe", layer, cfg, views, console, layer=i)[0]
             for i, layer in enumerate(layers)]
    return rows + [_train("concat-probe", "concat-probe", "all", cfg, views, console)[0]]


def _head2toe(cfg: TrainConfig, views: Views, console: Console) -> list[dict]:
    """Group-lasso fit on all layers, keep the top ``keep`` fraction of groups, retrain on them."""
    first_row, _, first = _train("head2toe", "head2toe-lasso", "all", cfg, views, console)
    kept = first.select_layers(cfg.keep)
    layers = views.for_head("head2toe").layers
    row, _, _ = _train("head2toe", "head2toe", ";".join(str(layers[i]) for i in kept),
                       dataclasses.replace(cfg, lasso=0.0), views, console, layers=kept)
    return [first_row, row]


def hsv_features(data: TrainData, seed: int, max_rows: int = HSV_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(n, L, D) features and (n,) labels of a seeded random subset of the training split.

    Sequence tasks: one pooled vector per labelled example. Token tasks: one vector per word
    (its first sub-token), examples drawn until ``max_rows`` words.
    """
    split = data.train
    rng = np.random.default_rng(seed)
    if data.task == "token":
        c = np.concatenate([[0], np.cumsum(split.labels != -100)])
        words = c[split.offsets[1:]] - c[split.offsets[:-1]]  # labelled words per example
        order = rng.permutation(split.n)
        take = order[np.cumsum(words[order]) <= max_rows]
    else:
        labeled = np.flatnonzero(split.labels >= 0)
        take = rng.permutation(labeled)[:max_rows]
    chosen = np.zeros(split.n, bool)
    chosen[take] = True
    xs, ys = [], []
    with torch.no_grad():
        for b in split.batches(256):
            sel = torch.from_numpy(chosen[b.index]).to(b.z.device)
            if data.task == "token":
                keep = (b.y != -100) & sel[:, None]
                xs.append(b.z[keep].cpu()), ys.append(b.y[keep].cpu())
            else:
                z = masked_mean(b.z, b.mask) if b.z.dim() == 4 else b.z
                xs.append(z[sel].cpu()), ys.append(b.y[sel].cpu())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def _hsv_rows(data: TrainData, seed: int) -> list[dict]:
    x, y = hsv_features(data, seed)
    return [{"name": "hsv", "layer": layer, "params": 0, "seconds": None,
             "hsv": hidden_state_variability(x[:, i], y)} for i, layer in enumerate(data.layers)]


def run_baselines(cfg: TrainConfig, *, console: Console | None = None) -> dict:
    """Train adalayers and every baseline on ``cfg.cache``; write baselines.csv/png; return the rows."""
    console = console or Console()
    t0 = time.perf_counter()
    cache = open_cache(cfg.cache)
    cfg = resolve(dataclasses.replace(cfg, head=None, layer=None), cache, kind="baselines")
    final, out = Path(cfg.out), prepare_out(cfg.out, cfg.overwrite, "baselines")
    write_config(out, "baselines", {"config": dataclasses.asdict(cfg), "cache_hash": cache.hash,
                                    "adl_version": __version__, "kind": "baselines"})
    views, ada_name = Views(cache, cfg), auto_head(cache)
    console.print(f"baselines on {cache.root} ({cache.task} task, {len(cache.layers)} layers, "
                  f"selection: validation {selection_metric(cache.task)})", highlight=False, soft_wrap=True)
    rows = [_train(ada_name, ada_name, "mix", cfg, views, console)[0]]
    rows += layer_baselines(cfg, views, console)
    rows.append(_train("scalar-mix", "scalar-mix", "all", cfg, views, console)[0])
    rows += _head2toe(cfg, views, console)
    rows += _hsv_rows(views.for_head("linear-probe"), cfg.seed)
    metric = selection_metric(cache.task)
    write_baselines_csv(out / "baselines.csv", rows, metric)
    _plot(rows, metric, out)
    publish(out, final)
    out = final
    console.print(_table(rows, metric))
    console.print(f"baselines written to {out}/baselines.csv and baselines.png "
                  f"({time.perf_counter() - t0:.1f}s)", highlight=False, soft_wrap=True)
    return {"out": str(out), "rows": rows, "metric": metric}


def write_baselines_csv(path: Path, rows: list[dict], metric: str) -> None:
    """baselines.csv (atomic: several sweep workers may write the same file)."""
    write_csv(path, rows, ["name", "layer", f"val_{metric}", f"test_{metric}", "params", "seconds", "hsv"])


def _plot(rows: list[dict], metric: str, out) -> None:
    split = "test" if rows[0][f"test_{metric}"] is not None else "val"
    singles = [r for r in rows if r["name"] == "single-layer"]
    plot_baselines([r["layer"] for r in singles], [r[f"{split}_{metric}"] for r in singles],
                   rows[0][f"{split}_{metric}"], f"{metric} ({split})" if split == "val" else metric,
                   out / "baselines.png")


def _table(rows: list[dict], metric: str) -> Table:
    t = Table(title="baselines", box=None, header_style="bold")
    for col in ("name", "layer", f"val {metric}", f"test {metric}", "params", "hsv"):
        t.add_column(col, justify="right")
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        t.add_row(r["name"], str(r["layer"]), fmt(r.get(f"val_{metric}")), fmt(r.get(f"test_{metric}")),
                  f"{r['params']:,}", fmt(r["hsv"]))
    return t
