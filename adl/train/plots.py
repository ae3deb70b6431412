"""The run's figures (matplotlib, Agg backend: no display needed, safe on servers and in tests)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_weight_history(history: list[dict], layers: list[int], path: Path) -> None:
    """layer_weights.png: weight w_l of every layer (one line each) against the epoch."""
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [r["epoch"] for r in history]
    for layer in layers:
        ax.plot(epochs, [r[f"w_{layer}"] for r in history], marker=".", label=f"layer {layer}")
    ax.set(xlabel="epoch", ylabel="layer weight (after cutoff)", ylim=(0, 1.02), title="Layer weights during training")
    ax.legend(fontsize="small", ncol=2 if len(layers) > 8 else 1, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)


def plot_final_weights(weights: list[float], layers: list[int], path: Path) -> None:
    """layer_weights_final.png: bar chart of the final weight per layer."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([str(l) for l in layers], weights, color="tab:blue")
    ax.set(xlabel="layer", ylabel="weight", ylim=(0, 1.02), title="Final layer weights")
    _save(fig, path)


def plot_baselines(layers: list[int], scores: list[float], adalayers: float | None, metric: str, path: Path) -> None:
    """baselines.png: single-layer test scores as bars, adalayers as a horizontal line across them."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([str(l) for l in layers], scores, color="tab:gray", label="single layer")
    if adalayers is not None:
        ax.axhline(adalayers, color="tab:red", linewidth=2, label=f"adalayers ({adalayers:.3f})")
    low = min(scores + ([adalayers] if adalayers is not None else []))
    ax.set(xlabel="layer", ylabel=f"test {metric}", ylim=(max(0.0, low - 0.1), 1.0),
           title=f"Single-layer heads vs adalayers (test {metric})")
    ax.legend(loc="lower right")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
