"""What stage two shows while it trains: a live epoch table, progress bars over epochs, summary lines.

A terminal gets rich's live widgets; a log file (stdout not a terminal) gets one plain line
per epoch instead, since a live table prints nothing until it stops.
"""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from adl.train.heads import PROBE_NAMES


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

    def update(self, row: dict) -> None:
        self.history.append(row)
        if self.console.is_terminal:
            self.live.update(self._table(), refresh=True)
        else:
            epoch, loss, val, lr, active = self._cells(row)
            at = f"epoch {epoch}" if "lr" in row else lr  # a probe's rows are its C values, not epochs
            rest = f", {lr}" if "lr" in row else ""
            self.console.print(f"{at}: loss {loss}, val {self.metric} {val}{rest}, active layers {active}",
                               highlight=False)

    def _cells(self, r: dict) -> tuple[str, ...]:
        active = [str(l) for l in self.layers if r[f"w_{l}"] > 0]
        step = f"lr {r['lr']:.2g}" if "lr" in r else f"C {r['C']:g}"  # a probe's rows are its C values
        return (str(r["epoch"]), f"{r['loss']:.4f}", f"{r['val_' + self.metric]:.4f}", step,
                ",".join(active) if len(active) < len(self.layers) else "all")

    def _table(self) -> Table:
        t = Table(title=f"training (selection: validation {self.metric})", box=None, header_style="bold")
        for col in ("epoch", "loss", f"val {self.metric}", "lr / C", "active layers"):
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
            f"{doc['seconds']:.1f}s | " + (doc["stop_reason"] if head in PROBE_NAMES else
                                           f"best epoch {doc['best_epoch']}/{doc['epochs']}"))
