"""Batches from the cache for the trainer: in memory when it fits, streamed in blocks when not.

A batch is ``Batch(z, mask, y, index)``:

    pooled view   z (B, L, D) float32, mask None,       y (B,)
    tokens view   z (B, T, L, D) float32 zero-padded,   mask (B, T) bool (True = real token),
                  y (B,) for sequence tasks, (B, T) for token tasks with -100 on padding and on
                  positions that carry no word label (continuations, special tokens)

Unlabeled sequence examples (label -1 in the cache) get y = -100, ignored by the loss.

Memory. The pooled view (N, L, H) is loaded whole, onto the GPU when training on CUDA and it
takes under half the free GPU memory. The tokens view of all splits is loaded whole when its
float32 size sum_splits(total_tokens * L * D * 4) fits ``memory_gb``; otherwise every split is
streamed in blocks of contiguous examples holding at most
``block_tokens = max(memory_gb / 3 / (L * D * 4), longest example)`` tokens. The next block is
read on a background thread while the current one trains (on a local disk or an object store
alike: zarr fetches the block's chunks concurrently), so the resident data is bounded by

    peak bytes ~= 2 * memory_gb / 3 (the block training and the block being read, float32)
                  + memory_gb / 6 (the float16 read, transient) + B * T_max * L * D * 4 (one batch)

i.e. under the budget plus one batch, whatever the cache size. Each epoch visits the blocks in
a shuffled order and each block's examples in shuffled, length-bucketed batches (examples are
pooled ``BUCKET`` batches at a time and sorted by length inside a pool, so padding stays small;
the cache stores rows sorted by length, so contiguous blocks already group similar lengths).
The order depends only on (seed, epoch): the same command gives the same batches. Evaluation
(``epoch=None``) visits examples in cache order, so flattened token predictions line up with
``cache.labels(split)``.

On CUDA every batch is built in pinned host memory and copied with ``non_blocking=True``.

A training sample (``train_limit`` N, for learning curves): N training examples drawn with the
run's seed and kept in cache order; validation and test stay whole. The sample's tokens are
gathered from the cache in bounded contiguous reads and loaded whole, so they count toward
``memory_gb`` (the other splits stream when they do not fit beside them).

Checks: NaN or inf in any split (train, validation, test) is one AdlError naming the split and
layers, raised when the split is loaded (a streamed split: when each block is read, so
before any of its values reach a head); a train split (or sample) with fewer than two
classes is refused with the count of every class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from adl.errors import AdlError

BUCKET = 32  # batches per length-sorting pool
READ_BYTES = 1 << 28  # float32 bytes per cache read when gathering a sample's tokens


@dataclass
class Batch:
    z: Tensor
    mask: Tensor | None
    y: Tensor
    index: np.ndarray  # (B,) example rows within the split


class SplitData:
    """One split of one cache view, ready to batch. ``labels`` are the cache's labels (numpy).

    ``rows`` (sorted example indices) keeps only those examples, renumbered 0..n-1 and loaded
    whole; ``self.rows`` maps them back to the cache (None = every example).
    """

    def __init__(self, cache, split: str, view: str, *, device: str, seed: int, block_tokens: int | None,
                 rows: np.ndarray | None = None):
        self.split, self.view, self.task, self.seed, self.rows = split, view, cache.task, seed, rows
        self.layers = cache.layers
        self.device = torch.device(device)
        self.labels = cache.labels(split)  # (N,) or flat (total_tokens,)
        if view == "tokens":
            self._values, self.offsets = cache.read(split, "tokens")
            if rows is not None:
                self._values, self.offsets, tokens = _gather(self._values, self.offsets, rows)
                self.labels = self.labels[tokens if self.task == "token" else rows]
                block_tokens = None
            self.n = len(self.offsets) - 1
            self.lengths = np.diff(self.offsets)
            self.n_layers, self.dim = self._values.shape[1:]
            self.blocks = _blocks(self.lengths, block_tokens or int(self.offsets[-1]))
            self._resident = None  # the whole split as one float32 tensor, when loaded whole
            if block_tokens is None:
                self._resident = self._finite(torch.from_numpy(np.asarray(self._values[:], np.float32)))
        else:
            x = cache.read(split, view)  # (N, L, H)
            if rows is not None:
                x, self.labels = x[rows], self.labels[rows]
            x = self._finite(torch.from_numpy(np.ascontiguousarray(x)))
            self.n, self.n_layers, self.dim = x.shape
            self.x = _place(x, self.device)
            y = np.where(self.labels < 0, -100, self.labels)
            self.y = torch.from_numpy(y).to(self.x.device)
            self.offsets, self.lengths = None, None
        if self.n == 0:
            raise AdlError(f"split {split!r} of the cache is empty; re-extract with examples in it")

    def _finite(self, x: Tensor) -> Tensor:
        """x (rows, L, D) as read from the cache; NaN/inf anywhere is one error naming the split
        and layers. One float32 sum clears a finite array in a vectorised pass (NaN and inf carry
        into it); a sum that is not finite is checked value by value per layer, so finite values
        whose sum overflows float32 pass. (A float64 sum casts every value on the way, the slow
        part of loading a large view before; bench/train_load.py measures both.)"""
        if bool(torch.isfinite(x.sum(dtype=torch.float32))):
            return x
        bad = [str(self.layers[j]) for j in range(x.shape[1]) if not bool(torch.isfinite(x[:, j]).all())]
        if not bad:
            return x
        raise AdlError(f"split {self.split!r} of the cache holds NaN or inf in layer{'s' if len(bad) > 1 else ''} "
                       f"{', '.join(bad)} of the {self.view} view: re-extract it with `adl extract ... --overwrite` "
                       "(adl extract refuses such states, so this cache was damaged or made elsewhere)")

    @property
    def max_len(self) -> int:
        return int(self.lengths.max()) if self.lengths is not None else 1

    def batches(self, batch_size: int, epoch: int | None = None) -> Iterator[Batch]:
        """All examples once: shuffled by (seed, epoch), or in cache order when ``epoch`` is None."""
        rng = None if epoch is None else np.random.default_rng([self.seed, epoch])
        if self.offsets is None:
            yield from self._pooled_batches(batch_size, rng)
            return
        order = list(range(len(self.blocks)) if rng is None else rng.permutation(len(self.blocks)))
        if self._resident is not None:
            for b in order:
                yield from self._block_batches(b, self._resident, 0, batch_size, rng)
            return
        # streamed: block i trains while block i + 1 is read on a thread (zarr fetches its chunks
        # concurrently, from a disk or an object store); at most these two are resident
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="adl-prefetch") as pool:
            ahead = pool.submit(self._read_block, order[0]) if order else None
            for i, b in enumerate(order):
                src, base = ahead.result()
                ahead = pool.submit(self._read_block, order[i + 1]) if i + 1 < len(order) else None
                yield from self._block_batches(b, src, base, batch_size, rng)
                del src

    def _block_batches(self, b: int, src: Tensor, base: int, batch_size: int, rng) -> Iterator[Batch]:
        a, e = self.blocks[b]
        for idx in _batch_indices(np.arange(a, e), self.lengths, batch_size, rng):
            yield self._collate(src, base, idx)

    def _read_block(self, b: int) -> tuple[Tensor, int]:
        """Block ``b``'s tokens as float32 (rows, L, D), checked finite, and its first row."""
        a, e = self.blocks[b]
        base = int(self.offsets[a])
        return self._finite(torch.from_numpy(self._values[base:int(self.offsets[e])])), base

    def _pooled_batches(self, batch_size: int, rng) -> Iterator[Batch]:
        order = np.arange(self.n) if rng is None else rng.permutation(self.n)
        for s in range(0, self.n, batch_size):
            idx = order[s:s + batch_size]
            if rng is None:
                sl = slice(int(idx[0]), int(idx[-1]) + 1)
                z, y = self.x[sl], self.y[sl]
            else:
                t = torch.from_numpy(idx).to(self.x.device)
                z, y = self.x[t], self.y[t]
            yield Batch(_to(z, self.device), None, _to(y, self.device), idx)

    def _collate(self, src: Tensor, base: int, idx: np.ndarray) -> Batch:
        """Pad examples ``idx`` to z (B, T, L, D), mask (B, T), y; ``src`` holds rows from ``base``."""
        lens = self.lengths[idx]
        B, T = len(idx), int(lens.max())
        pin = self.device.type == "cuda"
        # one contiguous copy per example and zeros on its padding only: a gather into a zeroed
        # (B, T, L, D) tensor writes that tensor twice, and it is the largest one of the step
        z = torch.empty((B, T, self.n_layers, self.dim), dtype=torch.float32, pin_memory=pin)
        token_task = self.task == "token"
        if token_task:
            y = torch.full((B, T), -100, dtype=torch.int64, pin_memory=pin)
        for i, (a, n) in enumerate(zip(self.offsets[idx].tolist(), lens.tolist())):
            z[i, :n] = src[a - base:a - base + n]
            z[i, n:] = 0.0
            if token_task:
                y[i, :n] = torch.from_numpy(self.labels[a:a + n])
        mask = torch.from_numpy(np.arange(T) < lens[:, None])
        mask = mask.pin_memory() if pin else mask
        if not token_task:
            y = torch.from_numpy(np.where(self.labels[idx] < 0, -100, self.labels[idx]))
        return Batch(_to(z, self.device), _to(mask, self.device), _to(y, self.device), idx)


def _to(t: Tensor, device: torch.device) -> Tensor:
    if t.device == device:
        return t
    return t.to(device, non_blocking=device.type == "cuda")


def _place(x: Tensor, device: torch.device) -> Tensor:
    """The pooled view on the GPU when it takes under half the free memory, else pinned on the host."""
    if device.type != "cuda":
        return x.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    return x.to(device) if x.numel() * 4 < free // 2 else x.pin_memory()


def _gather(values, offsets: np.ndarray, rows: np.ndarray,
            read_bytes: int = READ_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Examples ``rows`` (sorted) of a tokens view: their tokens as one float32 array, their new
    offsets, and the cache index of every kept token (to gather per-token labels).

    The cache is read in contiguous runs of at most ``read_bytes`` (as float32), each starting
    at the next kept token, and the kept tokens are picked from a run by fancy indexing: the
    memory stays bounded and nothing is read twice, where reading example by example would
    decode a zarr chunk per example.
    """
    lengths = np.diff(offsets)[rows]
    new = np.concatenate([[0], np.cumsum(lengths)])
    src = np.arange(new[-1]) + np.repeat(offsets[rows] - new[:-1], lengths)  # cache row of each kept token
    out = np.empty((len(src), *values.shape[1:]), np.float32)
    run = max(1, read_bytes // (4 * int(np.prod(values.shape[1:]))))
    i = 0
    while i < len(src):
        a = int(src[i])
        j = int(np.searchsorted(src, a + run))
        out[i:j] = values[a:int(src[j - 1]) + 1][src[i:j] - a]
        i = j
    return out, new, src


def train_sample(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of ``limit`` of ``n`` examples drawn with ``seed``; None (all) when there
    is no limit or it covers the split. Sorted, so the sample keeps the cache's row order
    (by length, as the other splits) and the same seed gives the same batches. ``adl finetune
    --train-limit`` draws its sample here too, so peers train on the heads' examples."""
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _blocks(lengths: np.ndarray, block_tokens: int) -> list[tuple[int, int]]:
    """Contiguous example ranges [a, e) holding <= max(block_tokens, longest example) tokens each."""
    cap = max(int(block_tokens), int(lengths.max()) if len(lengths) else 1)
    blocks, a, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > cap and i > a:
            blocks.append((a, i))
            a, used = i, 0
        used += int(n)
    if a < len(lengths) or not blocks:
        blocks.append((a, len(lengths)))
    return blocks


def _batch_indices(idx: np.ndarray, lengths: np.ndarray, batch_size: int, rng) -> list[np.ndarray]:
    """Split ``idx`` into batches: in order when ``rng`` is None, else shuffled and length-bucketed."""
    if rng is None:
        return [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    idx = rng.permutation(idx)
    out = []
    pool = batch_size * BUCKET
    for s in range(0, len(idx), pool):
        chunk = idx[s:s + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def _check_classes(cache, train: SplitData) -> None:
    """A train split (or sample) with fewer than two classes would train a head to loss 0 and
    report accuracy 1.0: refuse it, with the count of every class."""
    y = train.labels
    counts = np.bincount(y[y >= 0], minlength=len(cache.label_names))
    if np.count_nonzero(counts) < 2:
        shown = ", ".join(f"{name}: {int(c)}" for name, c in zip(cache.label_names, counts))
        what, fix = (("split", "re-extract with data holding every class") if train.rows is None else
                     (f"sample of {train.n} examples", "raise --train-limit or change --seed"))
        raise AdlError(f"the train {what} of {cache.root} has fewer than two classes ({shown or 'no labels'}); "
                       f"a head needs at least two: {fix}")


@dataclass
class TrainData:
    """The splits a run uses, on one view. ``test`` is None when the cache has no labelled test split."""

    train: SplitData
    validation: SplitData
    test: SplitData | None
    view: str
    task: str
    label_names: list[str]
    layers: list[int]

    @property
    def n_layers(self) -> int:
        return self.train.n_layers

    @property
    def in_dim(self) -> int:
        return self.train.dim

    @property
    def max_len(self) -> int:
        return max(s.max_len for s in (self.train, self.validation, self.test) if s is not None)


def load_data(cache, view: str, *, device: str, seed: int, memory_gb: float,
              train_limit: int | None = None) -> TrainData:
    """Open train / validation / (test) of ``view``; the tokens view streams beyond ``memory_gb``.
    ``train_limit`` keeps a sample of that many training examples drawn with ``seed``."""
    for split in ("train", "validation"):
        if split not in cache.splits:
            raise AdlError(f"{cache.root} has no {split!r} split (it has {', '.join(cache.splits)}); "
                           "re-extract with a validation split (adl extract carves one from train by default)")
        if not cache.labeled(split):
            raise AdlError(f"split {split!r} of {cache.root} is unlabeled; training needs labels there")
    splits = ["train", "validation"] + (["test"] if "test" in cache.splits and cache.labeled("test") else [])
    rows = train_sample(int(cache.manifest["splits"]["train"]["n"]), train_limit, seed)
    block_tokens = None
    if view == "tokens":
        row_bytes = len(cache.layers) * int(cache.manifest["token_dim"]) * 4
        tokens = {s: int(cache.offsets(s)[-1]) for s in splits}
        if rows is not None:
            tokens["train"] = int(np.diff(cache.offsets("train"))[rows].sum())
        budget, sample = memory_gb * 1e9, (tokens["train"] * row_bytes if rows is not None else 0)
        if sample > budget:
            raise AdlError(f"--train-limit {train_limit}: the sample's tokens take {sample / 1e9:.1f} GB as float32, "
                           f"more than --memory-gb {memory_gb:g} (a sample is loaded whole); raise --memory-gb or "
                           "lower --train-limit")
        total = sum(tokens.values()) * row_bytes
        block_tokens = None if total <= budget else max(1, int((budget - sample) / 3 / row_bytes))
    train = SplitData(cache, "train", view, device=device, seed=seed, block_tokens=block_tokens, rows=rows)
    _check_classes(cache, train)
    parts = [train] + [SplitData(cache, s, view, device=device, seed=seed, block_tokens=block_tokens)
                       for s in splits[1:]]
    if parts[0].n_layers != len(cache.layers):
        raise AdlError(f"{cache.root}: the {view} view holds {parts[0].n_layers} layers but the manifest lists "
                       f"{len(cache.layers)}; the cache is inconsistent, re-extract it with --overwrite")
    return TrainData(parts[0], parts[1], parts[2] if len(parts) > 2 else None, view, cache.task,
                     cache.label_names, cache.layers)
