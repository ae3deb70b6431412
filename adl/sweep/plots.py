"""A sweep's figures (matplotlib, Agg backend), drawn from results.csv rows.

    metric_vs_hparams.png   validation (and test) metric against each swept hyperparameter
    layer_weights.png       heatmap of the final layer weights, configurations x layers
    quality_vs_params.png   test metric against trainable parameters (log x), with the
                            single-layer baselines and linear probes drawn in
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

MAX_HEATMAP_ROWS = 40


def _save(fig, path: Path) -> None:
    """Write via a temporary file + rename: several workers may redraw the same figure at once."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")  # long row labels stay inside
    plt.close(fig)
    os.replace(tmp, path)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _nan(v) -> float:
    n = _num(v)
    return np.nan if n is None else n


def point_label(row: dict, dims: list[str]) -> str:
    def fmt(v):
        n = _num(v)
        return f"{n:g}" if n is not None else v

    return " ".join(f"{'lambda' if d == 'lam' else d}={fmt(row.get(d))}" for d in dims)


def plot_metric_vs_hparams(rows: list[dict], dims: list[str], metric: str, path: Path) -> None:
    """One panel per swept hyperparameter: every run's validation/test metric, mean validation line."""
    dims = dims or ["seed"]
    cols = min(3, len(dims))
    nrows = math.ceil(len(dims) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, dim in zip(axes.flat, dims):
        values = [r.get(dim) for r in rows]
        nums = [_num(v) for v in values]
        numeric = all(n is not None for n in nums) and not all(isinstance(v, bool) for v in values)
        if numeric:
            x = np.array(nums)
        else:
            cats = list(dict.fromkeys(str(v) for v in values))
            x = np.array([cats.index(str(v)) for v in values], float)
            ax.set_xticks(range(len(cats)), cats)
        for split, color in (("val", "tab:blue"), ("test", "tab:orange")):
            y = np.array([_nan(r.get(f"{split}_{metric}")) for r in rows])
            if np.isfinite(y).any():
                ax.scatter(x, y, s=18, alpha=0.7, color=color, label=f"{split}")
        val = np.array([_nan(r.get(f"val_{metric}")) for r in rows])
        xs = np.unique(x)
        means = [np.nanmean(val[x == v]) if np.isfinite(val[x == v]).any() else np.nan for v in xs]
        ax.plot(xs, means, color="tab:blue", linewidth=1.2)
        if numeric and xs.min() > 0 and xs.max() / xs.min() >= 20:
            ax.set_xscale("log")
        ax.set(xlabel="lambda" if dim == "lam" else dim, ylabel=metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(dims):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    fig.suptitle(f"{metric} against each swept hyperparameter")
    _save(fig, path)


def plot_weight_heatmap(rows: list[dict], layers: list[int], dims: list[str], metric: str, path: Path) -> None:
    """Final layer weights, one row per configuration (best validation first, at most 40)."""
    rows = [r for r in rows if all(r.get(f"w_{l}") not in (None, "") for l in layers)]
    rows = sorted(rows, key=lambda r: -np.nan_to_num(_nan(r.get(f"val_{metric}")), nan=-np.inf))[:MAX_HEATMAP_ROWS]
    if not rows:
        return
    w = np.array([[float(r[f"w_{l}"]) for l in layers] for r in rows])
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(layers) + 3.2, 1.2 + 0.28 * len(rows)))
    im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(layers)), [str(l) for l in layers])
    labels = [f"{point_label(r, dims)}  ({_nan(r.get(f'val_{metric}')):.3f})" for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set(xlabel="layer", title=f"final layer weights (rows by validation {metric})")
    fig.colorbar(im, ax=ax, fraction=0.04, label="weight")
    _save(fig, path)


def plot_quality_vs_params(rows: list[dict], baselines: list[dict], metric: str, path: Path) -> None:
    """Test metric (validation where there is no test split) against trainable parameters, log x."""
    split = "test" if any(_num(r.get(f"test_{metric}")) is not None for r in rows) else "val"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(_num(r.get("params")), _num(r.get(f"{split}_{metric}"))) for r in rows]
    pts = [(p, q) for p, q in pts if p and q is not None]
    if pts:
        ax.scatter(*zip(*pts), s=22, alpha=0.75, color="tab:blue", label="sweep configurations")
    singles = [b for b in baselines if b["name"] == "single-layer" and b.get(split) is not None]
    if singles:
        ax.scatter([b["params"] for b in singles], [b[split] for b in singles], marker="s", s=26,
                   color="tab:gray", label="single layer")
        # labels alternate sides in score order, so two layers with near-equal scores stay legible
        for i, b in enumerate(sorted(singles, key=lambda b: b[split])):
            ax.annotate(str(b["layer"]), (b["params"], b[split]), fontsize=7, va="center",
                        xytext=(5 if i % 2 else -5, 0), ha="left" if i % 2 else "right",
                        textcoords="offset points")
        top = max(b[split] for b in singles)
        ax.axhline(top, color="tab:gray", linestyle="--", linewidth=1, label=f"best single layer ({top:.3f})")
    probes = [b for b in baselines if b["name"] == "linear-probe" and b.get("val") is not None]
    if probes:  # the probe a practitioner would pick: the layer with the best validation score
        b = max(probes, key=lambda b: b["val"])
        if b.get(split) is not None:
            ax.scatter([b["params"]], [b[split]], marker="^", s=50, color="tab:red",
                       label=f"linear probe, layer {b['layer']} picked on val ({b[split]:.3f})")
    for b in baselines:
        if b["name"] == "concat-probe" and b.get(split) is not None:
            ax.scatter([b["params"]], [b[split]], marker="v", s=50, color="tab:purple",
                       label=f"linear probe on all layers ({b[split]:.3f})")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on short spans
    ax.set(xlabel="trainable parameters (log)", ylabel=f"{split} {metric}", title=f"{split} {metric} vs head size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="best")
    _save(fig, path)


def draw_all(out: Path, rows: list[dict], baselines: list[dict], dims: list[str], layers: list[int],
             metric: str) -> list[str]:
    """Every figure into ``out``; returns the file names written."""
    done = [r for r in rows if r.get(f"val_{metric}") not in (None, "")]
    if not done:
        return []
    plot_metric_vs_hparams(done, dims, metric, out / "metric_vs_hparams.png")
    plot_weight_heatmap(done, layers, dims, metric, out / "layer_weights.png")
    plot_quality_vs_params(done, baselines, metric, out / "quality_vs_params.png")
    return ["metric_vs_hparams.png", "layer_weights.png", "quality_vs_params.png"]
