"""Writing a cache: one store per shard, committed batch by batch, resumable after a kill.

Layout of a cache folder::

    manifest.json                       written last, once every shard is done
    shard-00000-of-00002.zarr|.h5       one store per shard, arrays "<split>/<name>"
    shard-00000-of-00002.progress.json  {split: batches committed}, rewritten atomically
    shard-00000-of-00002.done.json      rows per split, and per array its rows and chunk crc32s,
                                        once the shard has finished (see backends.digest)
    projection.safetensors              per-layer projection, when --project is used

Arrays of a split (rows in extraction order; ``ids`` maps them back to source rows):

    ids (N,) int64        offsets (N+1,) int64        labels (N,) int64 (sequence tasks)
    pooled_<pool> (N, L, H)      tokens (total_tokens, L, D)
    word_ids (total_tokens,) int32 (-1: special token)
    token_labels (total_tokens,) int64 (-100: not the first sub-token of a word)

A batch is committed (its chunks fsynced, then the progress file replaced durably) only
after all its rows are written, so a kill loses at most the batches in flight, and a rerun
rewrites exactly those: the finished cache is bit-identical to an uninterrupted run. A
resume first checks that the stored ids, offsets and labels are the rows it would write.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from adl.cache.backends import FORMATS, digest, open_backend
from adl.cache.durable import disk_full_error, is_disk_full, read_json, write_json
from adl.cache.manifest import MANIFEST, SCHEMA_VERSION, write_manifest
from adl.errors import AdlError


MANIFEST_LOCK = ".manifest.lock"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


@dataclass(frozen=True)
class SplitLayout:
    """What one shard stores for one split, known before the backbone runs."""

    ids: np.ndarray  # (N,) int64 source row ids
    offsets: np.ndarray  # (N+1,) int64 token offsets (lengths after truncation)
    labels: np.ndarray | None = None  # (N,) int64, sequence tasks (-1: unlabeled)
    word_ids: np.ndarray | None = None  # (total_tokens,) int32, token tasks
    token_labels: np.ndarray | None = None  # (total_tokens,) int64, token tasks

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


class ShardWriter:
    """Create or resume one shard's store. Holds an exclusive lock until ``close``."""

    def __init__(self, root: Path, fmt: str, shard_index: int = 0, num_shards: int = 1):
        if fmt not in FORMATS:
            raise AdlError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        name = shard_name(shard_index, num_shards)
        self.lock = FileLock(str(self.root / f".{name}.lock"))
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise AdlError(
                f"another adl extract is writing {self.root} (lock {self.lock.lock_file}); "
                "wait for it to finish or choose another --out"
            ) from None
        self.store_path = self.root / f"{name}{FORMATS[fmt]}"
        self.progress_path = self.root / f"{name}.progress.json"
        self.done_path = self.root / f"{name}.done.json"
        self.store = None
        self.progress: dict[str, int] = {}

    def create(self, layouts: dict[str, SplitLayout], arrays: dict[str, tuple], dtype: str, chunk_rows: int) -> None:
        """Create the store, or reopen it to resume when a progress file says it was started.

        ``arrays`` maps a per-split array name to (shape after the first axis, chunk rows),
        e.g. {"pooled_mean": ((L, H), 32), "tokens": ((L, D), 1024)}; the first axis is
        N for pooled arrays and total_tokens for "tokens". A resumed store must hold exactly
        the rows this run would write (ids, offsets, labels) and arrays of the same shapes.
        """
        self.names = [f"{split}/{name}" for split, lay in layouts.items() for name in _fixed(lay)]
        self.names += [f"{split}/{name}" for split in layouts for name in arrays]
        if self.progress_path.is_file() and self.store_path.exists():
            self.progress = read_json(self.progress_path)
            try:
                self.store = open_backend(self.store_path, self.fmt, "a")
            except Exception as e:  # noqa: BLE001 - any unreadable store is the same advice
                raise AdlError(f"cannot resume {self.store_path} ({str(e).splitlines()[0]}): "
                               "rerun with --overwrite to start this extraction again") from None
            self._check_resume(layouts, arrays, dtype)
        else:
            self.store = open_backend(self.store_path, self.fmt, "w")
            for split, lay in layouts.items():
                for name, value in _fixed(lay).items():
                    self._put(f"{split}/{name}", value, chunk_rows if name in ("ids", "offsets") else 1 << 16)
                for name, (tail, rows) in arrays.items():
                    shape = (lay.n_tokens if name == "tokens" else lay.n, *tail)
                    self.store.create(f"{split}/{name}", shape, dtype, _chunks(shape, rows))
            self.store.sync(everything=True)
            self.progress = {split: 0 for split in layouts}
            write_json(self.progress_path, self.progress)
        self.store.reserve(self._stored_bytes())

    def _check_resume(self, layouts: dict[str, SplitLayout], arrays: dict[str, tuple], dtype: str) -> None:
        """The stored ids/offsets/labels and array shapes must be the ones this run computed."""
        redo = "rerun with --overwrite to start this extraction again"
        if set(self.progress) != set(layouts):
            raise AdlError(f"{self.progress_path} lists splits {sorted(self.progress)}, this run has "
                           f"{sorted(layouts)}: {redo}")
        for split, lay in layouts.items():
            for name, value in _fixed(lay).items():
                key = f"{split}/{name}"
                stored = np.asarray(self.store.array(key)[:]) if self.store.has(key) else None
                if stored is None or stored.shape != value.shape or not np.array_equal(stored, value):
                    raise AdlError(f"{self.store_path}: the stored {key} differ from the rows this run "
                                   f"computed (data or tokenizer changed?): {redo}")
            for name, (tail, _) in arrays.items():
                key = f"{split}/{name}"
                shape = (lay.n_tokens if name == "tokens" else lay.n, *tail)
                arr = self.store.array(key) if self.store.has(key) else None
                if arr is None or tuple(arr.shape) != shape or np.dtype(arr.dtype) != np.dtype(dtype):
                    raise AdlError(f"{self.store_path}: {key} is not a {dtype} array of shape {shape}: {redo}")

    def _stored_bytes(self) -> int:
        """The store's final size: every chunk in full (the last one padded), plus metadata slack."""
        total = 0
        for name in self.names:
            arr = self.store.array(name)
            rows = self.store.chunk_rows(name)
            row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * np.dtype(arr.dtype).itemsize
            total += -(-int(arr.shape[0]) // rows) * rows * row_bytes
        return int(total * 1.01) + (4 << 20)

    def _put(self, name: str, value: np.ndarray, rows: int) -> None:
        self.store.create(name, value.shape, value.dtype.str, _chunks(value.shape, rows))
        if len(value):
            self.store.write(name, 0, value)

    def done_batches(self, split: str) -> int:
        return int(self.progress.get(split, 0))

    def write(self, split: str, name: str, start: int, data: np.ndarray) -> None:
        self.store.write(f"{split}/{name}", start, data)

    def commit(self, split: str, batches_done: int) -> None:
        """The batch's rows are durable before the progress file says so."""
        self.store.sync()
        self.progress[split] = batches_done
        write_json(self.progress_path, self.progress)

    def finish(self, rows: dict[str, int]) -> None:
        """Check every chunk is on disk, then record per array its rows and chunk checksums."""
        self.store.sync()
        self.store.trim()
        lost = [f"{name}: {p}" for name in self.names
                for p in self.store.missing_chunks(name, int(self.store.array(name).shape[0]))]
        if lost:
            raise AdlError(f"{self.store_path} lost committed data ({'; '.join(lost[:3])}): "
                           "rerun with --overwrite to extract again")
        arrays = {name: digest(self.store, name) for name in self.names}
        write_json(self.done_path, {"rows": rows, "arrays": arrays, "schema_version": SCHEMA_VERSION})

    def close(self) -> None:
        """Close the store and release the shard lock, also after a failed write."""
        try:
            if self.store is not None:
                self.store.close()
        except Exception:  # noqa: BLE001 - the first error (a full disk) is the one to report
            pass
        finally:
            self.store = None
            self.lock.release()


def _fixed(lay: SplitLayout) -> dict[str, np.ndarray]:
    """The arrays known before the backbone runs, as stored."""
    out = {"ids": lay.ids.astype(np.int64), "offsets": lay.offsets.astype(np.int64)}
    for name in ("labels", "word_ids", "token_labels"):
        value = getattr(lay, name)
        if value is not None:
            out[name] = np.asarray(value)
    return out


def _chunks(shape: tuple, rows: int) -> tuple:
    """Chunk whole rows: ``rows`` along the first axis (what one batch writes), full tail."""
    return (max(1, min(rows, shape[0])), *(max(1, s) for s in shape[1:]))


class BackgroundWriter:
    """Runs a ShardWriter's write/commit calls on a thread so disk I/O overlaps compute.

    The queue is bounded (``max_pending`` calls), which bounds memory to a few batches.
    An error on the thread (a full disk) is raised in the caller at its next call.
    """

    def __init__(self, writer: ShardWriter, max_pending: int = 8):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    getattr(self.writer, item[0])(*item[1:])
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise _as_user_error(self.error, self.writer.root)

    def write(self, split: str, name: str, start: int, data: np.ndarray) -> None:
        self._check()
        self.queue.put(("write", split, name, start, data))

    def commit(self, split: str, batches_done: int) -> None:
        self._check()
        self.queue.put(("commit", split, batches_done))

    def join(self) -> None:
        """Wait for every queued call; raise the first error."""
        self.queue.put(None)
        self.thread.join()
        self._check()


def _as_user_error(e: BaseException, root: Path) -> BaseException:
    return disk_full_error(root) if is_disk_full(e) else e


def finalize(root: Path, num_shards: int, fields: dict) -> dict | None:
    """Write the manifest once every shard is done; return it, or None while shards remain.

    Exactly once: under the manifest lock, the first finisher writes it and every later
    caller (a peer shard finishing at the same moment, a rerun) gets that same manifest,
    so the cache's hash never changes after it is complete.
    """
    root = Path(root)
    dones = [root / f"{shard_name(i, num_shards)}.done.json" for i in range(num_shards)]
    if not all(p.is_file() for p in dones):
        return None
    with FileLock(str(root / MANIFEST_LOCK)):
        if (root / MANIFEST).is_file():
            return read_json(root / MANIFEST)
        return write_manifest(root, {**fields, "num_shards": num_shards})
