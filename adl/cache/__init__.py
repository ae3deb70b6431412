"""The feature cache: the only meeting point of stage one (extract/) and stage two (train/).

Read with ``open_cache(path)``; written by ``ShardWriter`` + ``finalize``. See reader.py for
the reading API and writer.py for the on-disk layout.

The names below load with the module that defines them, on first use (PEP 562): importing a
light part of the package (``adl.cache.location``, for the CLI's error lines) does not load
numpy, zarr or the writer, so ``adl --help`` starts without them.
"""

from importlib import import_module

_HOMES = {
    "write_csv": "durable",
    "SCHEMA_VERSION": "manifest", "manifest_hash": "manifest", "read_json": "manifest", "read_manifest": "manifest",
    "write_json": "manifest",
    "Cache": "reader", "LazyRows": "reader", "open_cache": "reader",
    "verify_cache": "verify",
    "BackgroundWriter": "writer", "ShardWriter": "writer", "SplitLayout": "writer", "finalize": "writer",
    "shard_name": "shards",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'adl.cache' has no attribute {name!r}")
    value = getattr(import_module(f"adl.cache.{_HOMES[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
