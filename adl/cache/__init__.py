"""The feature cache: the only meeting point of stage one (extract/) and stage two (train/).

Read with ``open_cache(path)``; written by ``ShardWriter`` + ``finalize``. See reader.py for
the reading API and writer.py for the on-disk layout.
"""

from adl.cache.durable import write_csv
from adl.cache.manifest import (
    SCHEMA_VERSION,
    manifest_hash,
    read_json,
    read_manifest,
    write_json,
)
from adl.cache.reader import Cache, LazyRows, open_cache
from adl.cache.verify import verify_cache
from adl.cache.writer import (
    BackgroundWriter,
    ShardWriter,
    SplitLayout,
    finalize,
    shard_name,
)

__all__ = [
    "SCHEMA_VERSION",
    "BackgroundWriter",
    "Cache",
    "LazyRows",
    "ShardWriter",
    "SplitLayout",
    "finalize",
    "manifest_hash",
    "open_cache",
    "read_json",
    "read_manifest",
    "shard_name",
    "verify_cache",
    "write_csv",
    "write_json",
]
