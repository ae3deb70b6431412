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

On a URL (an object store) the same files are objects, and nothing is renamed or locked:

- Every chunk object is written once, whole. A batch's rows rarely end on a chunk boundary,
  so the writer holds the rows of the chunk being filled and writes a chunk only when all its
  rows are in (the last chunk of an array when the array is full). A batch is committed once
  every chunk holding its rows is stored; a rerun starts at the first uncommitted batch and
  drops the rows that fall in the chunk already stored before it (the commit rule guarantees
  that chunk was written whole), so no object is ever read, modified and written back.
- Progress and done records are whole-object PUTs; the manifest is a conditional PUT
  (``Location.create_json``), so of two writers racing to publish exactly one succeeds.
- There is no shard lock on a store: one process per shard index is the launcher's job
  (torchrun ranks, --shard-index).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from adl.cache.backends import digest, open_backend
from adl.cache.durable import disk_full_error, is_disk_full
from adl.cache.location import Location, retry
from adl.cache.manifest import MANIFEST, SCHEMA_VERSION, build_manifest
from adl.cache.shards import FORMATS, hdf5_on_url, shard_name
from adl.errors import AdlError


MANIFEST_LOCK = ".manifest.lock"


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

    def __init__(self, root, fmt: str, shard_index: int = 0, num_shards: int = 1):
        if fmt not in FORMATS:
            raise AdlError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
        self.root = Location(root)
        if self.root.url and fmt == "hdf5":
            raise AdlError(hdf5_on_url(self.root))
        self.fmt = fmt
        name = shard_name(shard_index, num_shards)
        self.lock = None
        if not self.root.url:
            self.root.where.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(self.root / f".{name}.lock"))
            try:
                self.lock.acquire(timeout=0)
            except Timeout:
                raise AdlError(
                    f"another adl extract is writing {self.root} (lock {self.lock.lock_file}); "
                    "wait for it to finish or choose another --out"
                ) from None
        self.store_name = f"{name}{FORMATS[fmt]}"
        self.progress_name, self.done_name = f"{name}.progress.json", f"{name}.done.json"
        self.store_path = self.root / self.store_name
        self.progress_path, self.done_path = self.root / self.progress_name, self.root / self.done_name
        self.shown = self.root.show(self.store_name)  # for messages: credentials masked
        self.store = None
        self.progress: dict[str, int] = {}
        # whole-object writes (a URL): per array the rows received, the rows stored and the
        # received rows not stored yet; commits waiting for their chunks
        self.whole = self.root.url
        self._have: dict[str, int] = {}
        self._stored: dict[str, int] = {}
        self._held: dict[str, list] = {}
        self._waiting: list[tuple[str, int, dict[str, int]]] = []

    def create(self, layouts: dict[str, SplitLayout], arrays: dict[str, tuple], dtype: str, chunk_rows: int) -> None:
        """Create the store, or reopen it to resume when a progress file says it was started.

        ``arrays`` maps a per-split array name to (shape after the first axis, chunk rows),
        e.g. {"pooled_mean": ((L, H), 32), "tokens": ((L, D), 1024)}; the first axis is
        N for pooled arrays and total_tokens for "tokens". A resumed store must hold exactly
        the rows this run would write (ids, offsets, labels) and arrays of the same shapes.
        """
        self.names = [f"{split}/{name}" for split, lay in layouts.items() for name in _fixed(lay)]
        self.names += [f"{split}/{name}" for split in layouts for name in arrays]
        started = self.root.exists(self.progress_name)
        if started and self._store_exists():
            self.progress = self.root.read_json(self.progress_name)
            try:
                self.store = self._retry(lambda: open_backend(self.store_path, self.fmt, "a"), self.shown)
            except Exception as e:  # noqa: BLE001 - any unreadable store is the same advice
                raise AdlError(f"cannot resume {self.shown} ({str(e).splitlines()[0]}): "
                               "rerun with --overwrite to start this extraction again") from None
            self._check_resume(layouts, arrays, dtype)
            return self.store.reserve(self._stored_bytes())
        self.progress = {split: 0 for split in layouts}
        # a store has no lock: the shard is claimed by creating its progress object (a progress
        # object without a store is a creation that was killed, taken over by this rerun)
        if self.root.url and not started and not self.root.create_json(self.progress_name, self.progress):
            raise AdlError(f"another process has just started writing {self.shown}: one process per shard "
                           "(see --shard-index); rerun this command once it has finished, or stopped")
        self._create_store(layouts, arrays, dtype, chunk_rows)
        self.root.write_json(self.progress_name, self.progress)
        self.store.reserve(self._stored_bytes())

    def _create_store(self, layouts: dict[str, SplitLayout], arrays: dict[str, tuple], dtype: str,
                      chunk_rows: int) -> None:
        """A new, empty store with every array, the fixed ones (ids, offsets, labels) filled;
        on a store each step is retried on its own (each is idempotent)."""
        self.store = self._retry(lambda: open_backend(self.store_path, self.fmt, "w"), self.shown)
        for split, lay in layouts.items():
            for name, value in _fixed(lay).items():
                rows = chunk_rows if name in ("ids", "offsets") else 1 << 16
                self._retry(lambda k=f"{split}/{name}", v=value, r=rows: self._put(k, v, r), f"{self.shown}/{split}")
            for name, (tail, rows) in arrays.items():
                shape = (lay.n_tokens if name == "tokens" else lay.n, *tail)
                self._retry(lambda k=f"{split}/{name}", c=_chunks(shape, rows), shape=shape:
                            self.store.create(k, shape, dtype, c), f"{self.shown}/{split}")
        self.store.sync(everything=True)

    def _retry(self, fn, what: str):
        """On a store, ``fn()`` with retries (``location.retry``); on a disk just ``fn()``: a full
        disk is not worth another attempt."""
        return retry(fn, what) if self.root.url else fn()

    def _store_exists(self) -> bool:
        if self.root.url:
            return self.root.exists(f"{self.store_name}/zarr.json")
        return Path(self.store_path).exists()

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
                    raise AdlError(f"{self.shown}: the stored {key} differ from the rows this run "
                                   f"computed (data or tokenizer changed?): {redo}")
            for name, (tail, _) in arrays.items():
                key = f"{split}/{name}"
                shape = (lay.n_tokens if name == "tokens" else lay.n, *tail)
                arr = self.store.array(key) if self.store.has(key) else None
                if arr is None or tuple(arr.shape) != shape or np.dtype(arr.dtype) != np.dtype(dtype):
                    raise AdlError(f"{self.shown}: {key} is not a {dtype} array of shape {shape}: {redo}")

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
        key = f"{split}/{name}"
        if not self.whole:
            self.store.write(key, start, data)
            return
        if key not in self._have:  # the first write of this run: a fresh start, or a resume
            step, total = self.store.chunk_rows(key), int(self.store.array(key).shape[0])
            first = min(-(-start // step) * step, total)  # rows before it sit in a chunk stored whole
            self._have[key] = self._stored[key] = first
            self._held[key] = []
        if start > self._have[key]:
            raise RuntimeError(f"{key}: rows {self._have[key]}-{start} were never given")  # a bug in adl
        data = data[self._have[key] - start:] if start < self._have[key] else data
        if len(data):
            self._held[key].append(data)
            self._have[key] += len(data)
        self._store_whole_chunks(key)

    def _store_whole_chunks(self, key: str) -> None:
        """Write the held rows that fill whole chunks (and the array's last chunk when it is full)."""
        step, total = self.store.chunk_rows(key), int(self.store.array(key).shape[0])
        have, stored = self._have[key], self._stored[key]
        upto = total if have >= total else have // step * step
        if upto <= stored:
            return
        held = np.concatenate(self._held[key]) if len(self._held[key]) > 1 else self._held[key][0]
        block = held[:upto - stored]
        retry(lambda: self.store.write(key, stored, block), f"{self.shown}/{key}")
        self._held[key] = [held[upto - stored:]] if have > upto else []
        self._stored[key] = upto

    def commit(self, split: str, batches_done: int) -> None:
        """The batch's rows are durable before the progress file says so (on a store: once
        every chunk holding them has been written whole)."""
        if self.whole:
            ends = {k: v for k, v in self._have.items() if k.startswith(split + "/")}
            self._waiting.append((split, batches_done, ends))
            ready = {}  # rows only grow, so the commits that are ready come first
            while self._waiting and all(self._stored[k] >= end for k, end in self._waiting[0][2].items()):
                done_split, done, _ = self._waiting.pop(0)
                ready[done_split] = done
            if not ready:
                return
        else:
            ready = {split: batches_done}
        self.store.sync()
        self.progress.update(ready)
        self.root.write_json(self.progress_name, self.progress)

    def finish(self, rows: dict[str, int]) -> None:
        """Check every chunk is on disk, then record per array its rows and chunk checksums."""
        if any(self._held.values()) or self._waiting:
            raise RuntimeError(f"{self.store_path}: rows held back at finish")  # a bug in adl
        self.store.sync()
        self.store.trim()
        lost = [f"{name}: {p}" for name in self.names
                for p in self.store.missing_chunks(name, int(self.store.array(name).shape[0]))]
        if lost:
            raise AdlError(f"{self.shown} lost committed data ({'; '.join(lost[:3])}): "
                           "rerun with --overwrite to extract again")
        arrays = {name: self._retry(lambda n=name: digest(self.store, n), f"{self.shown}/{name}")
                  for name in self.names}
        self.root.write_json(self.done_name, {"rows": rows, "arrays": arrays, "schema_version": SCHEMA_VERSION})

    def close(self) -> None:
        """Close the store and release the shard lock, also after a failed write."""
        try:
            if self.store is not None:
                self.store.close()
        except Exception:  # noqa: BLE001 - the first error (a full disk) is the one to report
            pass
        finally:
            self.store = None
            if self.lock is not None:
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


# what may differ between two writers of the same cache (the rest must be equal)
VOLATILE = ("created", "extraction_seconds", "loop_seconds", "adl_version")


def finalize(root, num_shards: int, fields: dict) -> dict | None:
    """Write the manifest once every shard is done; return it, or None while shards remain."""
    return publish(root, num_shards, fields)[0]


def publish(root, num_shards: int, fields: dict) -> tuple[dict | None, bool]:
    """-> (the manifest or None while shards remain, whether this call wrote it).

    Exactly once: the first finisher writes it (on disk under the manifest lock, on a store by
    a conditional PUT) and every later caller (a peer shard finishing at the same moment, a
    rerun, a second machine) gets that same manifest, so the cache's hash never changes after
    it is complete. A published manifest that differs from this writer's (other than in
    timings) is an error: two different extractions raced into one place.
    """
    root = Location(root)
    dones = [f"{shard_name(i, num_shards)}.done.json" for i in range(num_shards)]
    if not all(root.exists(d) for d in dones):
        return None, False
    ours = build_manifest({**fields, "num_shards": num_shards})
    if root.create_json(MANIFEST, ours, MANIFEST_LOCK):
        return ours, True
    theirs = root.read_json(MANIFEST)
    differ = sorted(k for k in set(ours) | set(theirs) if k not in VOLATILE and ours.get(k) != theirs.get(k))
    if differ:
        raise AdlError(f"{root} was published by another extraction first, and it differs from this one in "
                       f"{', '.join(differ[:4])}: use another --out, or --overwrite once no writer is running")
    return theirs, False
