"""Load any data source adl supports into one in-memory ``LoadedDataset``.

    load_dataset(spec) -> LoadedDataset(task, label_names, splits{train, validation, test, ...})

Steps: open the source (``adl.extract.sources``), choose the text and label columns,
decide the task (token when the text column holds lists of words), encode the labels as
ids, check for empty inputs, carve missing validation/test splits out of train (10% each,
stratified by label for sequence tasks, seeded), optionally subsample to ``limit`` rows per
split, and fingerprint the result. No model and no tokenizer are involved.

Every example keeps ``ids``: its row index in the original split or file, so predictions
can be joined back to the source whatever carving or limiting happened.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from adl.checks import INT_GE0, Num, check
from adl.errors import AdlError
from adl.extract.sources import NAMED, RawSource, open_source

TEXT_CANDIDATES = ("text", "sentence", "tokens", "content", "review")
LABEL_CANDIDATES = ("label", "labels", "ner_tags", "tags", "sentiment")
CANONICAL = ("train", "validation", "test")
CARVE_FRACTION = 0.1  # share of the source split carved out for each missing split
_INT = re.compile(r"-?\d+")

__all__ = ["Split", "LoadedDataset", "load_dataset", "reload_dataset", "reread_dataset", "describe_spec", "carve", "check_classes", "NAMED"]


@dataclass(frozen=True, eq=False)  # eq=False: arrays make field-wise == ambiguous
class Split:
    name: str                      # "train" | "validation" | "test" (or other hub split names)
    texts: list[str] | None        # sequence tasks: one string per example
    words: list[list[str]] | None  # token tasks: pre-split words per example
    labels: np.ndarray | list[list[int]] | None  # sequence int64 (N,); token per-word ids; None = unlabeled
    ids: np.ndarray                # int64 (N,): row index in the ORIGINAL split or file

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class LoadedDataset:
    name: str                      # short name, default cache folder cache/<name>
    task: str                      # "sequence" or "token"
    label_names: list[str]
    splits: dict[str, Split]       # ordered: train, validation, test first
    spec: dict                     # JSON-able: source kind, hub id/config or path, columns, limit, seed
    carving: dict                  # JSON-able: which splits came from which, fraction, seed, stratified
    unlabeled: list[str]           # names of splits without labels
    fingerprint: str               # sha256 hex over texts/words + labels + ids


def load_dataset(spec: str, *, text_column: str | None = None, label_column: str | None = None,
                 limit: int | None = None, seed: int = 42) -> LoadedDataset:
    """Load ``spec`` (named set, hub id, or ``csv:``/``jsonl:``/``parquet:``/``conll:`` file)."""
    check(SimpleNamespace(limit=limit, seed=seed), {"limit": Num(1, integer=True, example="1000"), "seed": INT_GE0})
    src = open_source(spec)
    tcol, lcol = _pick_columns(src, text_column, label_column)
    task = _detect_task(src, tcol)
    inputs = {s: _read_inputs(src, s, tcol, task) for s in src.splits}
    label_names, labels = _encode_labels(src, lcol, task)
    if task == "token":
        for s in src.splits:
            _check_aligned(s, inputs[s], labels[s], src.splits[s].ids)
    sources, positions, carving = _plan(src, labels, task, seed)
    splits = {}
    for i, (new, orig) in enumerate(sources.items()):
        pos = positions[new]
        if limit is not None and len(pos) > limit:
            strata = labels[orig][pos] if task == "sequence" and labels[orig] is not None else None
            pos = pos[carve(len(pos), [limit], np.random.default_rng([seed, i]), strata)[0]]
        splits[new] = _take(new, task, inputs[orig], labels[orig], src.splits[orig].ids, pos)
    # limit subsamples (seeded, stratified for sequence tasks): the first rows of a hub
    # split are often one class (IMDB is sorted by label), so "first N" would mislead
    carving["limit"] = None if limit is None else {"rows": limit, "stratified": task == "sequence"}
    full_spec = {**src.spec, "text_column": tcol, "label_column": lcol, "limit": limit, "seed": seed}
    return LoadedDataset(
        name=src.name, task=task, label_names=label_names, splits=splits, spec=full_spec,
        carving=carving, unlabeled=[n for n, s in splits.items() if s.labels is None],
        fingerprint=fingerprint(task, label_names, splits))


# ---------------------------------------------------------------------------- columns and task


def _pick_columns(src: RawSource, text_column, label_column) -> tuple[str, str]:
    """Given names win over named-set defaults, which win over auto-detection."""
    cols = next(iter(src.splits.values())).columns
    listing = ", ".join(cols)
    picked = []
    for given, default, candidates, flag, what in (
            (text_column, src.text_column, TEXT_CANDIDATES, "--text-column", "text"),
            (label_column, src.label_column, LABEL_CANDIDATES, "--label-column", "label")):
        name = given or default or next((c for c in candidates if c in cols), None)
        if name is None:
            raise AdlError(f"no {what} column found (looked for {', '.join(candidates)}); the "
                           f"columns are: {listing}; pass {flag} NAME")
        if name not in cols:
            raise AdlError(f"{what} column '{name}' not found; the columns are: {listing}; "
                           f"pass one of them with {flag}")
        picked.append(name)
    if picked[0] == picked[1]:
        raise AdlError(f"text and label columns are both '{picked[0]}'; pick two different "
                       f"columns among: {listing}")
    for split_name, split in src.splits.items():
        missing = [c for c in picked if c not in split.columns]
        if missing:
            raise AdlError(f"split '{split_name}' lacks column(s) {', '.join(missing)}; its "
                           f"columns are: {', '.join(split.columns)}")
    return picked[0], picked[1]


def _detect_task(src: RawSource, tcol: str) -> str:
    """Token task when the text column holds lists of words, sequence when it holds strings."""
    split = next(iter(src.splits.values()))
    first = next((v for v in split.column(tcol) if v is not None), None)
    if isinstance(first, str):
        return "sequence"
    if isinstance(first, (list, tuple)):
        return "token"
    raise AdlError(f"text column '{tcol}' holds {type(first).__name__} values; it must hold "
                   "strings (sequence task) or lists of words (token task); pass --text-column")


def _read_inputs(src: RawSource, split_name: str, tcol: str, task: str) -> list:
    """The text column as str (sequence) or list[str] (token); empty inputs are an error."""
    values = src.splits[split_name].column(tcol)
    ids = src.splits[split_name].ids
    if task == "sequence":
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
    else:
        values = [list(v) if isinstance(v, (list, tuple)) else v for v in values]
        bad = [i for i, v in enumerate(values)
               if not isinstance(v, list) or not v or not all(isinstance(w, str) for w in v)]
    if bad:
        shown = ", ".join(str(int(ids[i])) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise AdlError(f"split '{split_name}' has {len(bad)} empty or missing input(s) in column "
                       f"'{tcol}' at row id(s) {shown}; remove or fill those rows")
    return values


# ---------------------------------------------------------------------------- labels


def _encode_labels(src: RawSource, lcol: str, task: str):
    """Map labels to ids 0..C-1 -> (label_names, {split: int64 (N,) | list[list[int]] | None}).

    ClassLabel features give the names; other ints map through their sorted distinct values
    (identity when they are 0..C-1); strings map in sorted order. A split whose labels are
    all -1 (the hub's marker for hidden test labels) is unlabeled (None).
    """
    rows = {s: sp.column(lcol) for s, sp in src.splits.items()}
    flat = {s: _flatten(s, v, task, src.splits[s].ids, lcol) for s, v in rows.items()}
    if src.untyped and all(isinstance(x, str) and _INT.fullmatch(x) for v in flat.values() for x in v):
        flat = {s: [int(x) for x in v] for s, v in flat.items()}
    kinds = {_kind(x) for v in flat.values() for x in v}
    if "other" in kinds or len(kinds) > 1:
        raise AdlError(f"label column '{lcol}' must hold class ids (integers) or class names "
                       f"(strings), found {sorted(kinds)}; pass the right --label-column")
    labelled = {s: v for s, v in flat.items() if not (kinds == {"int"} and _all_unlabeled(s, v))}
    names = _classlabel_names(src.features.get(lcol))
    values = sorted({x for v in labelled.values() for x in v})
    if not values:
        raise AdlError(f"no split has labels in column '{lcol}'; adl needs a labelled train split")
    if names is None and kinds == {"int"} and task == "token":
        raise AdlError(f"label column '{lcol}' holds integer tags ({', '.join(map(str, values[:5]))}"
                       f"{', ...' if len(values) > 5 else ''}) without tag names, and entity F1 needs names "
                       "such as B-PER, I-LOC, O: write the tags as strings, or use a hub or parquet set whose "
                       "tag feature is a ClassLabel with names")
    if names is not None and kinds == {"int"}:
        if values[0] < 0 or values[-1] >= len(names):
            raise AdlError(f"label column '{lcol}' holds ids outside 0..{len(names) - 1}: {values[-1]}")
        lookup = {i: i for i in range(len(names))}
    else:
        names = [str(x) for x in values]
        lookup = {x: i for i, x in enumerate(values)}
    encoded = {}
    for s, v in flat.items():
        if s not in labelled:
            encoded[s] = None
            continue
        ids = np.asarray([lookup[x] for x in v], dtype=np.int64)
        if task == "sequence":
            encoded[s] = ids
        else:
            bounds = np.cumsum([0] + [len(r) for r in rows[s]])
            encoded[s] = [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
    return names, encoded


def _flatten(split_name: str, values: list, task: str, ids: np.ndarray, lcol: str) -> list:
    """Sequence: the labels as they are; token: all tags of all rows in order. Missing -> error."""
    def missing(x) -> bool:
        return x is None or x == ""

    if task == "token":
        bad = [i for i, v in enumerate(values)
               if not isinstance(v, (list, tuple)) or any(missing(x) for x in v)]
    else:
        bad = [i for i, x in enumerate(values) if missing(x)]
    if bad:
        shown = ", ".join(str(int(ids[i])) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        what = "a full list of tags" if task == "token" else "a label"
        raise AdlError(f"split '{split_name}' has {len(bad)} row(s) without {what} in column "
                       f"'{lcol}' (row ids {shown}); fill or remove them")
    return [x for v in values for x in v] if task == "token" else values


def _kind(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "int"
    if isinstance(x, (int, np.integer)):
        return "int"
    if isinstance(x, str):
        return "str"
    return "other"


def _all_unlabeled(split_name: str, values: list) -> bool:
    """True when every label is -1; a mix of -1 and real labels is an error, not a guess."""
    hidden = sum(1 for x in values if x == -1)
    if 0 < hidden < len(values):
        raise AdlError(f"split '{split_name}' mixes {hidden} unlabeled rows (label -1) with "
                       "labelled ones; drop the -1 rows or give them labels")
    return hidden > 0 and hidden == len(values)


def _classlabel_names(feature) -> list[str] | None:
    """Names of a ClassLabel feature, or of the ClassLabel inside a Sequence/List feature."""
    for f in (feature, getattr(feature, "feature", None)):
        if type(f).__name__ == "ClassLabel":
            return list(f.names)
    return None


def _check_aligned(split_name: str, words: list, tags, ids: np.ndarray) -> None:
    if tags is None:
        return
    bad = [i for i, (w, t) in enumerate(zip(words, tags)) if len(w) != len(t)]
    if bad:
        raise AdlError(f"split '{split_name}' has {len(bad)} row(s) whose word and tag counts "
                       f"differ (first row id {int(ids[bad[0]])}); give one tag per word")


def check_classes(ds: LoadedDataset) -> None:
    """Refuse a train split with fewer than two classes: a head would learn nothing and
    still report accuracy 1.0. Counts are per class name (words' tags for NER)."""
    labels = ds.splits["train"].labels
    flat = np.asarray(labels if ds.task == "sequence" else [t for row in labels for t in row], np.int64)
    counts = np.bincount(flat[flat >= 0], minlength=len(ds.label_names))
    if np.count_nonzero(counts) < 2:
        shown = ", ".join(f"{name}: {int(c)}" for name, c in zip(ds.label_names, counts))
        raise AdlError(f"the train split has fewer than two classes ({shown or 'no labels'}); a classifier "
                       "needs at least two: check --label-column, or the data (or --limit) for a missing class")


# ---------------------------------------------------------------------------- splits


def _plan(src: RawSource, labels: dict, task: str, seed: int):
    """Decide each final split's source and rows -> (sources, positions, carving record).

    Labelled train is required. A labelled validation without a labelled test serves as
    the test (GLUE convention); missing validation/test are carved from train. Unlabeled
    splits keep their name unless it is train/validation/test: then "unlabeled".
    """
    labelled = [s for s in src.splits if labels[s] is not None]
    if "train" not in labelled:
        raise AdlError(f"no labelled 'train' split (splits: {', '.join(src.splits)}; labelled: "
                       f"{', '.join(labelled) or 'none'}); use a source with a labelled train split")
    sources = {"train": "train"}
    if "validation" in labelled and "test" not in labelled:
        sources["test"] = "validation"
    else:
        sources.update({s: s for s in ("validation", "test") if s in labelled})
    positions = {new: np.arange(len(src.splits[orig].ids)) for new, orig in sources.items()}
    missing = [s for s in ("validation", "test") if s not in sources]
    carving = {"seed": seed, "fraction": CARVE_FRACTION, "stratified": task == "sequence",
               "carved": {}, "renamed": {}}
    if missing:
        n = len(positions["train"])
        size = max(1, int(CARVE_FRACTION * n + 0.5))
        if n - size * len(missing) < 1:
            raise AdlError(f"train has only {n} rows, too few to carve {' and '.join(missing)} "
                           f"({CARVE_FRACTION:.0%} each); supply more rows or separate splits")
        strata = labels["train"] if task == "sequence" else None
        *pieces, rest = carve(n, [size] * len(missing), np.random.default_rng(seed), strata)
        positions["train"] = rest
        for name, piece in zip(missing, pieces):
            sources[name] = "train"
            positions[name] = piece
            carving["carved"][name] = {"from": "train", "fraction": CARVE_FRACTION, "rows": len(piece)}
    for orig in src.splits:
        if orig in sources.values():
            continue
        new = orig
        if orig in CANONICAL or orig in sources:
            new = "unlabeled" if "unlabeled" not in sources else f"{orig}_unlabeled"
        sources[new] = orig
        positions[new] = np.arange(len(src.splits[orig].ids))
    order = [s for s in CANONICAL if s in sources] + [s for s in sources if s not in CANONICAL]
    sources = {s: sources[s] for s in order}
    carving["renamed"] = {new: orig for new, orig in sources.items()
                          if orig != new and new not in carving["carved"]}
    return sources, positions, carving


def carve(n: int, sizes: list[int], rng: np.random.Generator,
          strata: np.ndarray | None = None) -> list[np.ndarray]:
    """Split positions 0..n-1 into pieces of the given sizes plus the rest (last), each sorted.

    Stratified when ``strata`` (n,) is given: piece j takes from class c
    round(sizes[j] * n_c / n) rows (largest-remainder rounding, so piece sizes are exact
    unless a tiny class runs out), drawn in order from a seeded permutation of that class.
    Otherwise the pieces are consecutive slices of one seeded permutation.
    """
    if strata is None:
        groups = [rng.permutation(n)]
        shares = np.asarray(sizes, dtype=np.int64)[:, None]  # (pieces, 1)
    else:
        classes, inverse = np.unique(strata, return_inverse=True)
        groups = [rng.permutation(np.flatnonzero(inverse == k)) for k in range(len(classes))]
        counts = np.asarray([len(g) for g in groups])
        shares = np.stack([_apportion(size, counts) for size in sizes])  # (pieces, classes)
    pieces: list[list[np.ndarray]] = [[] for _ in range(len(sizes) + 1)]
    for k, group in enumerate(groups):
        start = 0
        for j in range(len(sizes)):
            stop = min(start + int(shares[j, k]), len(group))
            pieces[j].append(group[start:stop])
            start = stop
        pieces[-1].append(group[start:])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]


def _apportion(total: int, counts: np.ndarray) -> np.ndarray:
    """Integers proportional to ``counts`` summing to ``total`` (largest remainder, stable ties)."""
    quotas = total * counts / counts.sum()
    base = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - base), kind="stable")
    base[order[: total - int(base.sum())]] += 1
    return base


def _take(name: str, task: str, inputs: list, labels, ids: np.ndarray, pos: np.ndarray) -> Split:
    """Rows ``pos`` of one original split as a Split (ids stay the original row ids)."""
    rows = [inputs[i] for i in pos]
    if labels is None:
        lab = None
    elif task == "sequence":
        lab = labels[pos]
    else:
        lab = [labels[i] for i in pos]
    texts, words = (rows, None) if task == "sequence" else (None, rows)
    return Split(name, texts, words, lab, ids[pos].astype(np.int64))


def fingerprint(task: str, label_names: list[str], splits: dict[str, Split]) -> str:
    """sha256 over a canonical byte encoding (length-prefixed UTF-8 JSON + little-endian ids)."""
    h = hashlib.sha256()

    def put(obj) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put({"task": task, "label_names": label_names, "splits": list(splits)})
    for s in splits.values():
        put(s.texts if task == "sequence" else s.words)
        put(None if s.labels is None else np.asarray(s.labels).tolist() if task == "sequence" else s.labels)
        h.update(s.ids.astype("<i8").tobytes())
    return h.hexdigest()


def reload_dataset(spec: dict) -> LoadedDataset:
    """The data set a cache manifest records (its ``dataset.spec``), read again with the same
    columns, limit and seed, so the splits are carved exactly as at extraction."""
    kind = spec.get("kind")
    if kind == "named":
        text = spec["name"]
    elif kind == "hub":
        text = spec["hub_id"] + (f":{spec['config']}" if spec.get("config") else "")
    else:
        text = f"{kind}:{spec['path']}"
    return load_dataset(text, text_column=spec.get("text_column"), label_column=spec.get("label_column"),
                        limit=spec.get("limit"), seed=spec.get("seed", 42))


def describe_spec(spec: dict) -> str:
    """A data set spec as a person names it: its alias, hub id or file path."""
    return str(spec.get("name") or spec.get("hub_id") or spec.get("path") or spec.get("kind"))


def reread_dataset(manifest: dict, where: str, fix: str = "re-extract the cache") -> LoadedDataset:
    """The data set a cache ``manifest`` was extracted from, read again exactly.

    Same spec, columns, carving, limit and seed (``reload_dataset``), and then the same rows: the
    fingerprint over every split's row ids, texts and labels must equal the one recorded at
    extraction. Otherwise one AdlError names the data set (``where``: the cache or run it belongs
    to) and ``fix``. Every path that re-reads a cache's examples (``adl predict --split``, the
    peers) goes through here.
    """
    spec = manifest["dataset"]["spec"]
    try:
        ds = reload_dataset(spec)
    except AdlError as e:
        raise AdlError(f"cannot re-read the data set of {where} ({describe_spec(spec)}): {e}") from None
    if ds.fingerprint != manifest["dataset"]["fingerprint"]:
        raise AdlError(f"the data set of {where} ({describe_spec(spec)}) changed since extraction (its row ids, "
                       f"texts or labels differ from the recorded fingerprint): {fix}")
    return ds
