"""Two storage backends behind one small interface: a Zarr v3 directory or an HDF5 file.

Arrays are addressed by "split/name" paths. Both backends store uncompressed chunks
(hidden states do not compress, and compression would cost extraction time), so the
bytes on disk stay within a few percent of the raw payload. Every chunk spans whole rows:
chunk shape (rows, *tail), so chunk i holds rows [i * rows, (i + 1) * rows).

Crash safety:
- Zarr (>= 3.1.3) writes every chunk to a temporary file and renames it, so a chunk is
  always either its old or its new version. Chunks are stored even when they hold only
  the fill value (``write_empty_chunks``), so a missing chunk file is always damage,
  never "zeros": ``missing_chunks`` finds them from file names and sizes alone (the chunk
  keys follow the v3 spec's default encoding, ``c/<i>/0/0``).
- HDF5 is flushed and fsynced on every commit, so the data up to the last commit survive
  a kill. It is written in the v1.8 file format: the newer superblock (v1.10+) marks a
  file "open for write" and HDF5 then refuses to reopen it after a kill -9 (until
  `h5clear -s`), which would defeat resuming. The whole file is reserved with
  ``posix_fallocate`` before the first batch: HDF5 must never meet a full disk itself,
  because after a failed write h5py raises RuntimeError and crashes at exit.
- ``sync()`` makes what was written since the last call durable (fsync of the chunk files
  touched and their folders, or of the HDF5 file) before the progress file moves on.

On a URL (``s3://...``, any fsspec protocol) only Zarr serves, through zarr's ``FsspecStore``:
every chunk is one object, written by one whole PUT, so ``sync`` has nothing to do, and
``missing_chunks`` lists an array's objects once instead of a stat per chunk file. HDF5 is a
single file updated in place and is refused on a URL.
"""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import numpy as np

from adl.cache.durable import fsync_dir, fsync_file
from adl.cache.location import Location, is_url
from adl.cache.shards import chunk_count, hdf5_on_url
from adl.errors import AdlError

class ZarrBackend:
    def __init__(self, path, mode: str):
        import zarr

        self.url = is_url(path)
        self.path = str(path).rstrip("/") if self.url else Path(path)
        if self.url:
            parent, _, name = self.path.rpartition("/")
            self.location = Location(parent)
            with self.location.errors():
                store = self.location.zarr_store(name, read_only=mode == "r")
                self.root = zarr.open_group(store, mode=mode, zarr_format=3)
        else:
            self.root = zarr.open_group(str(path), mode=mode, zarr_format=3)
        self._arrays: dict = {}  # opened arrays: each lookup would reread its metadata
        self._touched: set[Path] = set()

    def create(self, name: str, shape: tuple, dtype: str, chunks: tuple) -> None:
        self.root.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, compressors=None, fill_value=0, overwrite=True,
            chunk_key_encoding={"name": "default", "separator": "/"},
        )
        self._arrays.pop(name, None)

    def array(self, name: str):
        if name not in self._arrays:  # the runtime config is not stored: set it on every open
            self._arrays[name] = self.root[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]

    def has(self, name: str) -> bool:
        return name in self.root

    def chunk_rows(self, name: str) -> int:
        return int(self.array(name).chunks[0])

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        if not len(data):
            return
        self.array(name)[start : start + len(data)] = data
        if self.url:
            return
        rows = self.chunk_rows(name)
        for i in range(start // rows, chunk_count(start + len(data), rows)):
            self._touched.add(self._chunk_path(name, i))

    def _chunk_path(self, name: str, i: int) -> Path:
        ndim = len(self.array(name).shape)
        return self.path / name / "c" / str(i) / Path(*(["0"] * (ndim - 1)))

    def missing_chunks(self, name: str, rows: int) -> list[str]:
        """Chunks of the first ``rows`` rows whose file is absent or not of the chunk's size."""
        arr = self.array(name)
        size = int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize
        tail = "/".join(["0"] * (len(arr.shape) - 1))
        if self.url:  # one listing of the array's objects: {chunk index: size}
            listed = Location(f"{self.path}/{name}/c").entries()
            sizes = {int(k.split("/")[0]): v for k, v in listed.items()
                     if k.split("/")[0].isdigit() and k == "/".join(filter(None, [k.split("/")[0], tail]))}
        bad = []
        for i in range(chunk_count(rows, arr.chunks[0])):
            if self.url:
                have = sizes.get(i)
            else:
                p = self._chunk_path(name, i)
                have = p.stat().st_size if p.is_file() else None
            if have is None:
                bad.append(f"chunk {i} missing")
            elif have != size:
                bad.append(f"chunk {i} is {have} bytes, not {size}")
        return bad

    def nbytes(self, name: str) -> int:
        return int(self.array(name).nbytes_stored())

    def reserve(self, nbytes: int) -> None:  # zarr fails cleanly on a full disk
        pass

    def trim(self) -> None:
        pass

    def sync(self, everything: bool = False) -> None:
        if self.url:  # each chunk was one whole PUT: stored once the call returned
            return
        paths = [p for p in self.path.rglob("*") if p.is_file()] if everything else sorted(self._touched)
        dirs = set()
        for p in paths:
            fsync_file(p)
            dirs.update(q for q in p.parents if q.is_relative_to(self.path))
        for d in sorted(dirs, key=lambda q: -len(q.parts)):  # deepest first: new names, then their parents
            fsync_dir(d)
        fsync_dir(self.path.parent)
        self._touched.clear()

    def close(self) -> None:
        pass


class HDF5Backend:
    def __init__(self, path: Path, mode: str):
        import h5py

        self.path = Path(path)
        self._open = lambda m: h5py.File(path, m, libver=("earliest", "v108"))
        self.file = self._open(mode)

    def create(self, name: str, shape: tuple, dtype: str, chunks: tuple) -> None:
        if name in self.file:
            del self.file[name]
        # an empty array (a shard with no rows of a split) cannot be chunked in HDF5
        self.file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks if all(shape) else None)

    def array(self, name: str):
        return self.file[name]

    def has(self, name: str) -> bool:
        return name in self.file

    def chunk_rows(self, name: str) -> int:
        chunks = self.file[name].chunks
        return int(chunks[0]) if chunks else max(1, self.file[name].shape[0])

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self.file[name][start : start + len(data)] = data

    def missing_chunks(self, name: str, rows: int) -> list[str]:
        d = self.file[name]
        if not d.chunks:
            return []
        want, have = chunk_count(rows, d.chunks[0]), d.id.get_num_chunks()
        return [] if have >= want else [f"{want - have} of {want} chunks never written"]

    def nbytes(self, name: str) -> int:
        return int(self.file[name].id.get_storage_size())

    def reserve(self, nbytes: int) -> None:
        """Allocate the file's final size on disk now: a full disk is then a clean OSError here.
        Where the OS or filesystem cannot reserve (macOS, some network filesystems) nothing is
        reserved, and a full disk mid-run is caught from h5py's error text instead."""
        if not hasattr(os, "posix_fallocate"):
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)

    def trim(self) -> None:
        """Give the unused reserve back: HDF5 cuts a file it opened larger than its end of
        allocation to that end when it closes it."""
        self.file.close()
        self._open("a").close()
        self.file = self._open("a")

    def sync(self, everything: bool = False) -> None:
        self.file.flush()
        os.fsync(self.file.id.get_vfd_handle())
        if everything:
            fsync_dir(self.path.parent)

    def close(self) -> None:
        self.file.close()


def open_backend(path, fmt: str, mode: str):
    """Open (mode "r"/"a") or create (mode "w") the store at ``path`` (a path or a URL) in format ``fmt``."""
    if fmt == "hdf5" and is_url(path):
        raise AdlError(hdf5_on_url(path))
    return {"zarr": ZarrBackend, "hdf5": HDF5Backend}[fmt](path, mode)


def digest(store, name: str) -> dict:
    """Row count and the crc32 of every chunk's rows (stored bytes, row-major) of one array.

    Per chunk rather than per array, so that a mismatch names the rows that are damaged;
    crc32 (zlib, about 1 GB/s) because this guards against lost or torn writes, not
    against an attacker, and ``verify_cache`` must stay as fast as one read of the cache.
    """
    arr = store.array(name)
    rows, step = int(arr.shape[0]), store.chunk_rows(name)
    crcs = [zlib.crc32(np.ascontiguousarray(arr[a:a + step])) for a in range(0, rows, step)]
    return {"rows": rows, "chunk_rows": step, "crc32": crcs}
