"""A cache's shards by name, and what their records say, without opening a store.

Each shard ``shard-00000-of-00002`` is a store (``.zarr`` folder or ``.h5`` file) beside its
``.done.json`` record: rows per split, and per array its rows, chunk rows and chunk crc32s
(``backends.digest``). ``shard_record`` checks what needs no store library (the store and its
record exist, the record reads); ``verify.shard_problems`` opens the store on top of it.
Nothing here imports numpy or a store library, so ``adl info`` starts without them.
"""

from __future__ import annotations

from adl.cache.location import Location
from adl.errors import AdlError

FORMATS = {"zarr": ".zarr", "hdf5": ".h5"}


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def chunk_count(rows: int, chunk_rows: int) -> int:
    return -(-rows // chunk_rows) if rows else 0


def hdf5_on_url(where) -> str:
    return (f"{Location(where)}: HDF5 cannot live on an object store (it rewrites one file in place); "
            "use --format zarr")


def shard_record(root: Location, manifest: dict, index: int) -> tuple[dict | None, list[str]]:
    """-> (shard ``index``'s done.json, []) when its store and record are there, else (None, problems)."""
    fmt, count = manifest["format"], manifest["num_shards"]
    if fmt not in FORMATS:
        return None, [f"manifest: unknown format {fmt!r} (this adl reads {', '.join(FORMATS)})"]
    if fmt == "hdf5" and root.url:
        return None, [hdf5_on_url(root)]
    name = shard_name(index, count)
    store_name, done_name = f"{name}{FORMATS[fmt]}", f"{name}.done.json"
    if not (root.exists(f"{store_name}/zarr.json") if root.url else (root / store_name).exists()):
        return None, [f"{name}: store {store_name} is missing"]
    try:
        done = root.read_json(done_name)
        if not isinstance(done["arrays"], dict):
            raise TypeError("arrays")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, [f"{name}: {done_name} is missing or unreadable ({type(e).__name__})"]
    return done, []


def damaged(root: Location, problems: list[str]) -> AdlError:
    """The one line for a cache whose shards have ``problems`` (the first named, the rest counted)."""
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return AdlError(f"{root} is damaged: {problems[0]}{more}; see `adl info {root} --check`, "
                    "then re-extract with `adl extract ... --overwrite`")


def shard_records(root: Location, manifest: dict) -> list[dict]:
    """Every shard's done.json, in shard order; a missing store or record raises ``damaged``."""
    records, problems = [], []
    for i in range(manifest["num_shards"]):
        done, found = shard_record(root, manifest, i)
        records.append(done)
        problems += found
    if problems:
        raise damaged(root, problems)
    return records
