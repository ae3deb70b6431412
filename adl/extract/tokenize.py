"""Tokenising once, batching by length, and splitting the batches among shards.

A split is tokenised once into a flat id array with offsets (no padding stored). Rows are
then ordered by decreasing length (stable, so ties keep the split's order) and cut into
batches of batch_size rows, fewer for long rows (a padded-token budget): each batch pads
only to its own longest row (dynamic padding), and the longest batch comes first, so
running out of memory happens at once, not at the end.

Shards take contiguous runs of those batches with about equal padded-token cost, so
shard 0's rows, then shard 1's, ... are exactly the one-process extraction order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adl.cache import SplitLayout

IGNORE = -100  # label of tokens that are not the first sub-token of a word
_CHUNK = 1024  # examples tokenised per call: bounds the tokenizer's python-object memory


@dataclass(frozen=True, eq=False)
class TokenizedSplit:
    """One split after tokenisation, rows in the split's order."""

    name: str
    ids: np.ndarray  # (N,) int64 source row ids
    input_ids: np.ndarray  # (total_tokens,) int32, rows concatenated
    offsets: np.ndarray  # (N+1,) int64: row i is input_ids[offsets[i]:offsets[i+1]]
    truncated: int  # rows cut at max_length
    labeled: bool
    labels: np.ndarray | None = None  # (N,) int64 sequence labels, -1 when unlabeled
    word_ids: np.ndarray | None = None  # (total_tokens,) int32 word index, -1 for special tokens
    token_labels: np.ndarray | None = None  # (total_tokens,) int64, -100 off first sub-tokens

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_split(split, task: str, tokenizer, max_length: int, labeled: bool) -> TokenizedSplit:
    """Tokenise a ``adl.extract.datasets.Split`` with truncation at ``max_length``.

    Works in chunks of examples whose python lists are flattened to int32 at once, so
    memory is 4 bytes a token (+12 for NER word ids and labels), not python objects.
    """
    inputs = split.texts if task == "sequence" else split.words
    kw = {"is_split_into_words": True} if task == "token" else {}
    flat, lengths, words, tags, truncated = [], [], [], [], 0
    for start in range(0, len(inputs), _CHUNK):
        chunk = inputs[start : start + _CHUNK]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, **kw)
        ids = enc["input_ids"]
        truncated += len(truncated_rows(tokenizer, chunk, [len(r) for r in ids], max_length, kw))
        lengths.append(np.fromiter((len(r) for r in ids), np.int64, count=len(ids)))
        flat.append(np.fromiter((t for r in ids for t in r), np.int32, count=int(lengths[-1].sum())))
        if task == "token":
            for i in range(len(ids)):
                wids = enc.word_ids(i)
                words.append(np.array([-1 if w is None else w for w in wids], np.int32))
                tags.append(align_labels(wids, split.labels[start + i] if labeled else None))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = {"labeled": labeled}
    if task == "sequence":
        n = len(lengths)
        out["labels"] = np.asarray(split.labels, np.int64) if labeled else np.full(n, -1, np.int64)
    else:
        out["word_ids"] = np.concatenate(words) if words else np.zeros(0, np.int32)
        out["token_labels"] = np.concatenate(tags) if tags else np.zeros(0, np.int64)
    input_ids = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    return TokenizedSplit(split.name, np.asarray(split.ids, np.int64), input_ids, offsets, truncated, **out)


def truncated_rows(tokenizer, inputs, lengths, max_length: int, kw: dict) -> list[int]:
    """Positions of the ``inputs`` that tokenising with truncation at ``max_length`` cut, given the
    tokenised ``lengths``: only rows that came out max_length long can have been, so only those
    are tokenised again, whole."""
    full = [i for i, n in enumerate(lengths) if n >= max_length]
    if not full:
        return []
    again = tokenizer([inputs[i] for i in full], truncation=False, verbose=False, **kw)["input_ids"]
    return [i for i, r in zip(full, again) if len(r) > max_length]


def align_labels(word_ids: list, word_tags: list[int] | None) -> np.ndarray:
    """Per-token labels: a word's tag on its first sub-token, -100 on the rest and on
    special tokens (and everywhere when the split is unlabeled). -> (T,) int64."""
    out = np.full(len(word_ids), IGNORE, np.int64)
    if word_tags is None:
        return out
    previous = None
    for t, w in enumerate(word_ids):
        if w is not None and w != previous:
            out[t] = word_tags[w]
        previous = w
    return out


def make_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Row positions sorted by decreasing length (stable), cut into batches of ``batch_size``
    rows, fewer when rows x the batch's longest row would exceed ``max_tokens``.

    Sorted descending, a batch's first row is its longest, so B x T_max <= max_tokens holds
    exactly (a single row longer than the budget still forms a batch). Long inputs thus run
    in small batches: less padding between rows of unequal length, and memory bounded by
    the token budget rather than by batch_size x max_length.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        rows = batch_size
        if max_tokens is not None:
            rows = max(1, min(batch_size, max_tokens // max(1, int(lengths[order[start]]))))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def partition(batches: list[np.ndarray], lengths: np.ndarray, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous batch ranges [a, b) per shard with about equal padded tokens (B x T_max).

    Boundary k is the first batch where the running cost reaches k/num_shards of the total.
    """
    cost = np.array([len(b) * int(lengths[b].max()) for b in batches], np.float64)
    cum = np.concatenate([[0.0], np.cumsum(cost)])
    cuts = [0] + [int(np.searchsorted(cum, cum[-1] * k / num_shards)) for k in range(1, num_shards)] + [len(batches)]
    cuts = np.maximum.accumulate(np.clip(cuts, 0, len(batches)))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def shard_layout(ts: TokenizedSplit, batches: list[np.ndarray]) -> SplitLayout:
    """What one shard stores for ``ts`` when it runs ``batches`` in order (extraction order)."""
    order = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    lengths = ts.lengths[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if ts.word_ids is None:
        return SplitLayout(ids=ts.ids[order], offsets=offsets, labels=ts.labels[order])
    spans = [np.arange(ts.offsets[i], ts.offsets[i + 1]) for i in order]
    flat = np.concatenate(spans) if spans else np.zeros(0, np.int64)
    return SplitLayout(ids=ts.ids[order], offsets=offsets, word_ids=ts.word_ids[flat],
                       token_labels=ts.token_labels[flat])


def collate(ts: TokenizedSplit, rows: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> input_ids (B, T) int64 right-padded with ``pad`` to the batch's longest row,
    and attention_mask (B, T) int64 (1 = real token)."""
    lengths = ts.lengths[rows]
    ids = np.full((len(rows), int(lengths.max())), pad, np.int64)
    mask = np.zeros(ids.shape, np.int64)
    for j, (i, n) in enumerate(zip(rows, lengths)):
        ids[j, :n] = ts.input_ids[ts.offsets[i] : ts.offsets[i + 1]]
        mask[j, :n] = 1
    return ids, mask


def view_bytes(splits: dict[str, TokenizedSplit], n_layers: int, hidden: int, token_dim: int,
               n_pools: int, itemsize: int) -> dict[str, int]:
    """Bytes each view will take: pooled N x L x H x s per pool; tokens total_tokens x L x D x s
    (+12 bytes a token for word ids and labels in token tasks)."""
    n = sum(len(s) for s in splits.values())
    tokens = sum(s.n_tokens for s in splits.values())
    extra = 12 if any(s.word_ids is not None for s in splits.values()) else 0
    return {"pooled": n * n_layers * hidden * itemsize * n_pools,
            "tokens": tokens * (n_layers * token_dim * itemsize + extra)}
