"""Is a cache whole? ``verify_cache(path)`` -> a list of named problems (empty: all is well).

Every shard's ``done.json`` records, per array, its row count and the crc32 of each chunk's
rows (``backends.digest``). Two levels of checking use it:

- ``shard_problems(..., checksums=False)``, run by ``open_cache`` on every open: each
  shard's store and done.json exist (``shards.shard_record``, which ``adl info`` stops at),
  every recorded array has its rows, and every chunk is
  on disk at its full size (zarr: one stat per chunk file; HDF5: the allocated chunk count).
  This is what stops a missing chunk from reading back as zeros. It reads no data.
- ``verify_cache``: the same, plus every chunk's checksum recomputed (one sequential read
  of the whole cache, bounded by one chunk in memory) and the manifest's split sizes
  compared with what the shards hold.

A problem reads "<shard> <split>/<array>: what is wrong", e.g.
"shard-00000-of-00001 train/tokens: rows 4096-8191 (chunk 1) fail their checksum".
"""

from __future__ import annotations

import zlib

import numpy as np

from adl.cache.backends import open_backend
from adl.cache.location import Location, StorageError
from adl.cache.shards import FORMATS, chunk_count, shard_name, shard_record
from adl.errors import AdlError


def shard_problems(root, manifest: dict, index: int, checksums: bool = False):
    """-> (opened store or None, problems) for shard ``index`` of the cache at ``root`` (a folder or a URL)."""
    root = Location(root)
    done, problems = shard_record(root, manifest, index)
    if done is None:
        return None, problems
    name = shard_name(index, manifest["num_shards"])
    store_name = f"{name}{FORMATS[manifest['format']]}"
    try:
        store = open_backend(root / store_name, manifest["format"], "r")
    except AdlError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable store is one named problem
        return None, [f"{name}: store {store_name} cannot be opened ({str(e).splitlines()[0]})"]
    for key, rec in sorted(done["arrays"].items()):
        problems += [f"{name} {key}: {p}" for p in _array_problems(store, key, rec, checksums)]
    return store, problems


def _array_problems(store, key: str, rec: dict, checksums: bool) -> list[str]:
    if not store.has(key):
        return ["array missing"]
    rows = int(store.array(key).shape[0])
    if rows != rec["rows"]:
        return [f"{rows} rows, done.json records {rec['rows']}"]
    missing = store.missing_chunks(key, rows)
    if missing or not checksums:
        return missing
    step, arr, bad = rec["chunk_rows"], store.array(key), []
    if chunk_count(rows, step) != len(rec["crc32"]):
        return [f"{len(rec['crc32'])} checksums recorded for {chunk_count(rows, step)} chunks"]
    for i, want in enumerate(rec["crc32"]):
        a, b = i * step, min(rows, (i + 1) * step)
        try:
            ok = zlib.crc32(np.ascontiguousarray(arr[a:b])) == want
        except Exception as e:  # noqa: BLE001 - a torn chunk fails to decode: damage, not data
            bad.append(f"rows {a}-{b - 1} (chunk {i}) unreadable ({str(e).splitlines()[0]})")
            continue
        if not ok:
            bad.append(f"rows {a}-{b - 1} (chunk {i}) fail their checksum")
    return bad


def verify_cache(path) -> list[str]:
    """Recompute every shard's checksums and compare with the manifest; -> named problems."""
    from adl.cache.manifest import read_manifest

    root = Location(path)
    try:
        manifest = read_manifest(root)
    except StorageError:
        raise
    except AdlError as e:
        return [f"manifest: {e}"]
    problems, held = [], {}
    for i in range(manifest["num_shards"]):
        store, found = shard_problems(root, manifest, i, checksums=True)
        problems += found
        if store is not None:
            for split in manifest["splits"]:
                if store.has(f"{split}/ids"):
                    held[split] = held.get(split, 0) + int(store.array(f"{split}/ids").shape[0])
            store.close()
    if problems:
        return problems
    for split, info in sorted(manifest["splits"].items()):
        if held.get(split, 0) != info.get("n"):
            problems.append(f"manifest: split {split} has n={info.get('n')} but the shards hold "
                            f"{held.get(split, 0)} rows")
    if manifest.get("projection") and not root.exists("projection.safetensors"):
        problems.append("projection.safetensors is missing")
    return problems
