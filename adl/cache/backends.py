"""Two storage backends behind one small interface: a Zarr v3 directory or an HDF5 file.

Arrays are addressed by "split/name" paths. Both backends store uncompressed chunks
(hidden states do not compress, and compression would cost extraction time), so the
bytes on disk stay within a few percent of the raw payload.

Crash safety: Zarr's local store writes every chunk to a temporary file and renames it,
so a chunk is always either its old or its new version. The HDF5 file is flushed on every
commit, so the data up to the last commit survive a kill. It is written in the v1.8 file
format: the newer superblock (v1.10+) marks a file "open for write" and HDF5 then refuses
to reopen it after a kill -9 (until `h5clear -s`), which would defeat resuming.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}


class ZarrBackend:
    def __init__(self, path: Path, mode: str):
        import zarr

        self._zarr = zarr
        self.root = zarr.open_group(str(path), mode=mode, zarr_format=3)

    def create(self, name: str, shape: tuple, dtype: str, chunks: tuple) -> None:
        self.root.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, compressors=None, fill_value=0, overwrite=True
        )

    def array(self, name: str):
        return self.root[name]

    def has(self, name: str) -> bool:
        return name in self.root

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self.root[name][start : start + len(data)] = data

    def nbytes(self, name: str) -> int:
        return int(self.root[name].nbytes_stored())

    def flush(self) -> None:  # every zarr write is already on disk when it returns
        pass

    def close(self) -> None:
        pass


class HDF5Backend:
    def __init__(self, path: Path, mode: str):
        import h5py

        h5_mode = {"w": "w", "a": "a", "r": "r"}[mode]
        self.file = h5py.File(path, h5_mode, libver=("earliest", "v108"))

    def create(self, name: str, shape: tuple, dtype: str, chunks: tuple) -> None:
        if name in self.file:
            del self.file[name]
        # an empty array (a shard with no rows of a split) cannot be chunked in HDF5
        self.file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks if all(shape) else None)

    def array(self, name: str):
        return self.file[name]

    def has(self, name: str) -> bool:
        return name in self.file

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self.file[name][start : start + len(data)] = data

    def nbytes(self, name: str) -> int:
        return int(self.file[name].id.get_storage_size())

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def open_backend(path: Path, fmt: str, mode: str):
    """Open (mode "r"/"a") or create (mode "w") the store at ``path`` in format ``fmt``."""
    return {"zarr": ZarrBackend, "hdf5": HDF5Backend}[fmt](path, mode)
