"""The cache's exact examples as raw text again, tokenised as at extraction.

    manifest -> data set re-read (same spec, carving, limit, seed) -> rows in the cache's
    order (the cache's ``ids``) -> tokenised with the cache's tokenizer and max_length

A peer needs raw text and the backbone's own states: a cache with a projection is refused
(it is meant for heads only). The data set is re-read by ``reread_dataset`` (the fingerprint
check), and every cached row must be found in it, or the comparison would not be on the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adl.errors import AdlError
from adl.extract import models
from adl.extract.datasets import Split, reread_dataset
from adl.extract.recorded import RecordedBackbone, check_tokenizer, recorded_backbone
from adl.extract.tokenize import TokenizedSplit, collate, tokenize_split
from adl.train.data import train_sample

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True, eq=False)
class PeerSplit:
    """One split in the cache's row order: raw inputs, tokens, labels.

    ``task``, ``labels`` and ``offsets`` are what ``adl.train.trainer.score`` reads: labels
    (N,) for sequence tasks; for token tasks flat (total_tokens,) tags on each word's first
    sub-token (-100 elsewhere) with offsets (N+1,).
    """

    name: str
    task: str
    raw: Split
    tokens: TokenizedSplit

    @property
    def labels(self) -> np.ndarray:
        return self.tokens.labels if self.task == "sequence" else self.tokens.token_labels

    @property
    def offsets(self) -> np.ndarray:
        return self.tokens.offsets

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, rows: np.ndarray, pad: int):
        """rows -> input_ids, attention_mask (B, T) int64 numpy, labels (B,) or (B, T) int64 (-100 = none)."""
        ids, mask = collate(self.tokens, rows, pad)
        if self.task == "sequence":
            return ids, mask, np.where(self.labels[rows] < 0, -100, self.labels[rows])
        y = np.full(ids.shape, -100, np.int64)
        for j, i in enumerate(rows):
            a, b = self.offsets[i], self.offsets[i + 1]
            y[j, : b - a] = self.labels[a:b]
        return ids, mask, y


@dataclass(frozen=True, eq=False)
class PeerData:
    task: str
    label_names: list[str]
    splits: dict[str, PeerSplit]
    tokenizer: object
    pad: int
    max_length: int
    layers: tuple = ()  # a peer mixes no layers (what ``trainer.fit_all`` logs per layer)

    @property
    def train(self) -> PeerSplit:
        return self.splits["train"]

    @property
    def validation(self) -> PeerSplit:
        return self.splits["validation"]

    @property
    def test(self) -> PeerSplit:
        return self.splits["test"]


def refuse_projection(manifest: dict, root) -> None:
    if manifest.get("projection"):
        raise AdlError(f"{root} stores projected states ({manifest['projection'].get('dim', '?')} dims): a peer "
                       "trains the backbone on raw text, and a projected cache is meant for heads only; extract a "
                       "cache without --project for the comparison")


def load_peer_data(cache, *, reserve: int = 0, backbone: RecordedBackbone | None = None,
                   train_limit: int | None = None, seed: int = 0) -> PeerData:
    """Re-read the data set of ``cache`` (an open Cache) and keep exactly its train/validation/test rows.

    ``train_limit`` keeps the sample of training rows ``adl train --train-limit N --seed S`` trains
    on (``adl.train.data.train_sample``), so a learning curve's peers see the heads' examples.

    ``reserve`` positions are kept free for prompt tokens: the cache's max_length shrinks when
    max_length + reserve would exceed the model's limit (its config gives the position table).
    ``backbone``: the cache's recorded backbone, when the caller has found it already.
    """
    man = cache.manifest
    refuse_projection(man, cache.root)
    ds = reread_dataset(man, str(cache.root), "re-extract the cache so heads and peers see the same examples")
    backbone = backbone or recorded_backbone(man, f"cache {cache.root}")
    tok = backbone.tokenizer(man["task"])
    check_tokenizer(man, models.tokenizer_hash(tok), f"cache {cache.root}")
    length = int(man["tokenizer"]["max_length"])
    limit = models.model_limit(tok, backbone.config)
    if reserve and limit is not None and length + reserve > limit:
        length = limit - reserve
    splits = {}
    for name in SPLITS:
        if name not in man["splits"]:
            raise AdlError(f"{cache.root} has no {name} split; a peer needs train, validation and test")
        keep = train_sample(len(cache.ids(name)), train_limit, seed) if name == "train" else None
        keep = slice(None) if keep is None else keep
        raw = _rows(ds.splits[name], cache.ids(name)[keep], name)
        ts = tokenize_split(raw, man["task"], tok, length, labeled=True)
        if man["task"] == "sequence" and not np.array_equal(ts.labels, cache.labels(name)[keep]):
            raise AdlError(f"split {name} of {cache.root} has other labels than its re-read data set: re-extract")
        splits[name] = PeerSplit(name, man["task"], raw, ts)
    return PeerData(man["task"], list(man["label_names"]), splits, tok, models.pad_id(tok), length)


def _rows(split: Split, ids: np.ndarray, name: str) -> Split:
    """The rows of ``split`` whose source ids are ``ids``, in that order."""
    where = {int(r): i for i, r in enumerate(split.ids)}
    missing = [int(r) for r in ids if int(r) not in where]
    if missing or split.labels is None:
        raise AdlError(f"split {name} of the re-read data set lacks {len(missing)} of the cache's rows "
                       f"(e.g. row id {missing[0] if missing else '?'}): re-extract the cache")
    pos = [where[int(r)] for r in ids]
    if split.texts is not None:
        return Split(name, [split.texts[i] for i in pos], None, np.asarray(split.labels)[pos], np.asarray(ids))
    return Split(name, None, [split.words[i] for i in pos], [split.labels[i] for i in pos], np.asarray(ids))
