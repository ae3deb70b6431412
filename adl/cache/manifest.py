"""The cache manifest: what a cache holds and how it was made, as sorted JSON.

``manifest.json`` is written last, atomically, once every shard has finished. A folder
without it is an unfinished extraction and is never read as a cache.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from adl import UPGRADE, __version__
from adl.cache.durable import read_json, write_json
from adl.cache.location import Location
from adl.errors import AdlError

# 2: done.json records rows and chunk checksums per array; zarr stores every chunk
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ITEMSIZE = {"float16": 2, "float32": 4}  # the dtypes a cache stores its states in, and their bytes per value

# Keys the writer must provide; the reader relies on them.
REQUIRED = (
    "model",
    "tokenizer",
    "dataset",
    "task",
    "label_names",
    "splits",
    "layers",
    "views",
    "hidden_size",
    "token_dim",
    "dtype",
    "format",
    "projection",
    "num_shards",
)


__all__ = ["ITEMSIZE", "MANIFEST", "REQUIRED", "SCHEMA_VERSION", "manifest_hash", "ordered_splits", "read_json",
           "read_manifest", "write_json", "build_manifest"]
# Types of the fields the reader relies on: a manifest that breaks them is refused.
TYPES = {"splits": dict, "layers": list, "views": list, "label_names": list, "num_shards": int, "format": str,
         "task": str, "hidden_size": int, "token_dim": int}


def build_manifest(fields: dict) -> dict:
    """Complete ``fields`` with schema/adl versions and creation time (written by writer.publish)."""
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise ValueError(f"manifest lacks {missing}")  # a bug in adl, not a user mistake
    manifest = {
        **fields,
        "schema_version": SCHEMA_VERSION,
        "adl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return manifest


def read_manifest(root) -> dict:
    """Read and check a cache's manifest (a folder or a URL); a missing, partial or newer one is a
    clear error."""
    root = Location(root)
    path = root.show(MANIFEST)
    if not root.exists(MANIFEST):
        if not root.is_there():
            raise AdlError(f"no cache at {root}: create one with `adl extract --model M --dataset D --out {root}`")
        raise AdlError(
            f"{root} is not a complete adl cache (no {MANIFEST}): its extraction did not finish; "
            "rerun the same `adl extract` command to resume it"
        )
    redo = "re-extract with `adl extract ... --overwrite`"
    try:
        manifest = root.read_json(MANIFEST)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdlError(f"{path} is unreadable or truncated ({str(e).splitlines()[0]}): {redo}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdlError(f"{path} has no schema_version: not an adl cache manifest; {redo}")
    if version > SCHEMA_VERSION:
        raise AdlError(
            f"{root} was written by a newer adl (cache schema {version}, this adl reads up to "
            f"{SCHEMA_VERSION}): upgrade adl (`{UPGRADE}`)"
        )
    if version < SCHEMA_VERSION:
        raise AdlError(f"{root} was written by an older adl (cache schema {version}, this adl reads schema "
                       f"{SCHEMA_VERSION}, which adds checksums): {redo}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise AdlError(f"{path} is incomplete (missing {', '.join(missing)}): {redo}")
    wrong = [k for k, t in TYPES.items() if not isinstance(manifest[k], t) or isinstance(manifest[k], bool)]
    if wrong or manifest["num_shards"] < 1:
        raise AdlError(f"{path} is malformed (bad {', '.join(wrong) or 'num_shards'}): {redo}")
    return manifest


def ordered_splits(manifest: dict) -> list[str]:
    """Split names, train / validation / test first, then the rest by name (the JSON keys are sorted)."""
    first = {"train": 0, "validation": 1, "test": 2}
    return sorted(manifest["splits"], key=lambda s: (first.get(s, len(first)), s))


def manifest_hash(manifest: dict) -> str:
    """sha256 of the canonical manifest JSON: identifies a cache's exact content."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
