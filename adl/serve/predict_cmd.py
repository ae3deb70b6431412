"""``adl predict``: trained heads on new texts, a file, or a data set's split, in one pass.

    inputs (--text | --file | --split) -> Predictor -> a table on the terminal (few inputs)
                                                     + --out FILE.jsonl (id, text, one key per head), or
                                                       --out - (the same JSONL on stdout)
                                                     + metrics per head when the inputs have labels

A file is written only where ``--out`` names one: adl never drops files into the current folder
unasked.

``--split S`` without ``--dataset`` re-reads the data set the first run's cache recorded, with
the same columns, limit and seed (the same carving), so ``adl predict --run R --split test``
scores exactly the run's test set. Metrics have the keys of the ``test`` block of the run's
metrics.json and are computed by the trainer's own ``score``.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from adl.cache import write_json
from adl.checks import INT_GE1, check
from adl.devices import check_device
from adl.errors import AdlError
from adl.extract.datasets import TEXT_CANDIDATES, load_dataset, reread_dataset
from adl.extract.sources import read_table
from adl.serve.predictor import Predictor
from adl.train.trainer import score


@dataclass(frozen=True)
class PredictConfig:
    runs: list[str]
    texts: list[str] = field(default_factory=list)
    file: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    split: str | None = None
    dataset: str | None = None
    out: str | None = None
    batch_size: int | None = None
    device: str = "auto"

    def __post_init__(self):
        if not self.runs:
            raise AdlError("no head given: pass --run RUN_FOLDER (repeat it for several heads)")
        given = [flag for flag, v in (("--text", self.texts), ("--file", self.file), ("--split", self.split)) if v]
        if len(given) != 1:
            raise AdlError("give exactly one input: --text T (repeatable), --file PATH or --split S"
                           + (f" (got {' and '.join(given)})" if given else ""))
        if self.dataset and not self.split:
            raise AdlError("--dataset goes with --split S: which split of that data set to predict")
        if (self.text_column or self.label_column) and not self.file:
            flag = "--text-column" if self.text_column else "--label-column"
            raise AdlError(f"{flag} goes with --file (a .csv, .jsonl or .parquet file)")
        check(self, {"batch_size": INT_GE1})
        check_device(self.device)


@dataclass
class Inputs:
    items: list  # strings, or lists of words (a token data set)
    ids: list  # row ids in the source
    labels: object = None  # sequence ids (N,) or per-word tag ids; None: unlabelled
    label_names: list[str] | None = None
    raw_labels: list | None = None  # a file's label column, per kept row: names or ids (None: missing)
    skipped: int = 0  # empty lines/rows dropped


def read_file(path: str, column: str | None, label_column: str | None = None) -> Inputs:
    """.txt: one text per line; .csv/.jsonl/.parquet: the text column (given or detected) and the
    labels, if any: ``label_column``, or a column named ``label``."""
    p = Path(path)
    if not p.is_file():
        raise AdlError(f"file not found: {path}")
    if p.suffix.lower() in (".txt", "") and (column or label_column):
        raise AdlError(f"{path} is plain text (one text per line): it has no columns; drop "
                       f"{'--text-column' if column else '--label-column'}")
    cols = read_table(p)
    name = column or next((c for c in TEXT_CANDIDATES if c in cols), None)
    if name not in cols:
        looked = f"column '{column}' not found" if column else f"no text column ({', '.join(TEXT_CANDIDATES)})"
        raise AdlError(f"{path}: {looked}; the columns are: {', '.join(cols)}; pass --text-column NAME")
    if label_column and label_column not in cols:
        raise AdlError(f"{path}: label column '{label_column}' not found; the columns are: {', '.join(cols)}")
    labels = cols.get(label_column or "label")
    keep = [(i, str(t)) for i, t in enumerate(cols[name]) if t is not None and str(t).strip()]
    return Inputs([t for _, t in keep], [i for i, _ in keep], skipped=len(cols[name]) - len(keep),
                  raw_labels=None if labels is None else [labels[i] for i, _ in keep])


def label_ids(raw: list, names: list[str]) -> np.ndarray | None:
    """A file's labels as a head's class ids: its label names, or ids 0..C-1 (as numbers or digit
    strings); missing values are -1 (not scored). None when they are neither."""
    out = np.full(len(raw), -1, np.int64)
    for i, v in enumerate(raw):
        text = "" if v is None else str(v).strip()
        if text in names:
            out[i] = names.index(text)
        elif text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
            out[i] = int(text)
        elif text:
            return None
    return out


def read_split(cfg: PredictConfig, manifest: dict) -> Inputs:
    """--split S of --dataset, or of the run's own data set re-read exactly (``reread_dataset``)."""
    fix = "re-extract and retrain, or pass --dataset to predict on it as it is now"
    ds = load_dataset(cfg.dataset) if cfg.dataset else reread_dataset(manifest, f"run {cfg.runs[0]}", fix)
    if cfg.split not in ds.splits:
        raise AdlError(f"data set {ds.name} has no split '{cfg.split}'; it has {', '.join(ds.splits)}")
    s = ds.splits[cfg.split]
    items = s.texts if ds.task == "sequence" else s.words
    return Inputs(list(items), s.ids.tolist(), s.labels, ds.label_names)


def gather(cfg: PredictConfig, manifest: dict) -> Inputs:
    if cfg.split:
        return read_split(cfg, manifest)
    if cfg.file:
        return read_file(cfg.file, cfg.text_column, cfg.label_column)
    keep = [t for t in cfg.texts if t.strip()]
    return Inputs(keep, list(range(len(keep))), skipped=len(cfg.texts) - len(keep))


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def head_metrics(p: Predictor, enc, pred, inputs: Inputs) -> dict:
    """name -> metrics (the test block's keys) for every head trained on these labels."""
    out = {}
    ts = enc.ts
    for name in pred.logits:
        run = p.feeds[name].run
        if inputs.raw_labels is not None and run.task == "sequence":  # a file's label column
            ids = label_ids(inputs.raw_labels, run.label_names)
            if ids is not None and (ids >= 0).any():
                flat = np.array([int(z.argmax()) for z in pred.logits[name]], np.int64)
                out[name] = score(flat, SimpleNamespace(task="sequence", labels=ids, offsets=None), run.label_names)
            continue
        if inputs.labels is None or run.label_names != inputs.label_names or (run.task == "token") != (
                ts.word_ids is not None):
            continue
        logits = pred.logits[name]
        if run.task == "token":
            flat = np.concatenate([z.argmax(-1) for z in logits]) if logits else np.zeros(0, np.int64)
            split = SimpleNamespace(task="token", labels=ts.token_labels, offsets=ts.offsets)
        else:
            flat = np.array([int(z.argmax()) for z in logits], np.int64)
            split = SimpleNamespace(task="sequence", labels=ts.labels, offsets=None)
        out[name] = score(flat, split, run.label_names)
    return out


def metrics_table(metrics: dict) -> Table:
    table = Table(title="metrics")
    table.add_column("head")
    keys = sorted({k for m in metrics.values() for k, v in m.items() if isinstance(v, float)})
    for k in keys:
        table.add_column(k, justify="right")
    for name, m in metrics.items():
        table.add_row(escape(name), *[f"{m[k]:.4f}" if k in m else "" for k in keys])
    return table


FEW = 20  # inputs up to this many (or any --text) are shown as a table: a screenful


def _cell(answer: dict) -> str:
    """One head's answer for one input, for the table: 'label 0.93' or 'Apple ORG [0:5]; ...'."""
    if "label" in answer:
        return f"{answer['label']} {answer['probs'][answer['label']]:.2f}"
    return "; ".join(f"{e['text']} {e['type']} [{e['start']}:{e['end']}]" for e in answer["entities"]) or "(none)"


def predictions_table(enc, pred) -> Table:
    """Each input's text, then per head its label and probability, or its entities (character spans)."""
    table = Table(title="predictions", show_lines=True)
    table.add_column("text", overflow="fold")
    for name in pred.heads:
        table.add_column(escape(name), overflow="fold")
    for i, text in enumerate(enc.texts):
        table.add_row(escape(text), *[escape(_cell(pred.heads[name][i])) for name in pred.heads])
    return table


def write_jsonl(f, inputs: Inputs, enc, pred) -> None:
    """One JSON object per input: id (row in the source), text, one key per head."""
    for i, row_id in enumerate(inputs.ids):
        row = {"id": row_id, "text": enc.texts[i], **{name: pred.heads[name][i] for name in pred.heads}}
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_predict(cfg: PredictConfig, console: Console | None = None, stdout=None) -> dict:
    """Predict; show a table (few inputs), write the JSONL where --out says (and metrics beside it),
    print metrics and throughput; -> a summary dict. ``stdout``: where ``--out -`` and the table go."""
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    stdout = stdout or sys.stdout
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # each shown as one line, not as a Python warning
        warnings.simplefilter("always")
        p = Predictor(cfg.runs, device=cfg.device, batch_size=cfg.batch_size)
    for w in caught:
        console.print(f"[yellow]warning:[/] {escape(str(w.message))}")
    inputs = gather(cfg, p.manifest)
    if inputs.skipped:
        console.print(f"skipped {inputs.skipped} empty input{'s' if inputs.skipped != 1 else ''}")
    if not inputs.items:
        raise AdlError("no non-empty input to predict")
    enc = p.encode(inputs.items, inputs.labels)
    if enc.cut.any():
        console.print(f"truncated {int(enc.cut.sum())} input(s) to max_length {p.max_length} tokens, as at extraction")
    start = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task("predict", total=len(inputs.items))
        pred = p.forward(enc, on_rows=lambda rows, _: bar.update(task, advance=len(rows)))
    seconds = time.perf_counter() - start
    p.decode(enc, pred)
    out = Path(cfg.out) if cfg.out and cfg.out != "-" else None
    if cfg.out == "-":
        write_jsonl(stdout, inputs, enc, pred)
        stdout.flush()
    elif out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            write_jsonl(f, inputs, enc, pred)
    shown = cfg.out != "-" and (bool(cfg.texts) or len(inputs.items) <= FEW)
    if shown:
        Console(file=stdout, highlight=False, soft_wrap=False).print(predictions_table(enc, pred))
    metrics = head_metrics(p, enc, pred, inputs)
    if inputs.raw_labels is not None:
        unscored = [n for n in pred.heads if n not in metrics]
        if unscored:
            console.print(f"not scored: {', '.join(unscored)} (the file's labels are neither the head's label "
                          "names nor its class ids, or the head tags tokens)")
    result = {"out": cfg.out, "n": len(inputs.items), "seconds": seconds, "metrics": metrics}
    if metrics:
        console.print(metrics_table(metrics))
        if out is not None:
            path = out.with_name(out.stem + ".metrics.json")
            write_json(path, metrics)
            result["metrics_file"] = str(path)
    tokens = enc.ts.n_tokens
    where = {None: "" if shown else "; pass --out FILE.jsonl (or --out - for stdout) to keep the predictions",
             "-": "; JSONL on stdout"}.get(cfg.out, f"; wrote {escape(str(out))}")
    console.print(f"{len(inputs.items)} inputs, {len(pred.heads)} head(s): {len(inputs.items) / seconds:,.1f} inputs/s, "
                  f"{tokens / seconds:,.0f} tokens/s ({seconds:.2f} s forward, {time.perf_counter() - t0:.1f} s total)"
                  + where)
    return result
