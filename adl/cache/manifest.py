"""The cache manifest: what a cache holds and how it was made, as sorted JSON.

``manifest.json`` is written last, atomically, once every shard has finished. A folder
without it is an unfinished extraction and is never read as a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from adl import __version__
from adl.errors import AdlError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

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


def write_json(path: Path, obj: dict) -> None:
    """Write sorted JSON atomically (temp file + rename), so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_manifest(root: Path, fields: dict) -> dict:
    """Complete ``fields`` with schema/adl versions and creation time and write manifest.json."""
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise ValueError(f"manifest lacks {missing}")  # a bug in adl, not a user mistake
    manifest = {
        **fields,
        "schema_version": SCHEMA_VERSION,
        "adl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(Path(root) / MANIFEST, manifest)
    return manifest


def read_manifest(root: Path) -> dict:
    """Read and check a cache's manifest; a missing, partial or newer one is a clear error."""
    root = Path(root)
    if not root.is_dir():
        raise AdlError(f"no cache at {root}: create one with `adl extract --model M --dataset D --out {root}`")
    path = root / MANIFEST
    if not path.is_file():
        raise AdlError(
            f"{root} is not a complete adl cache (no {MANIFEST}): its extraction did not finish; "
            "rerun the same `adl extract` command to resume it"
        )
    try:
        manifest = read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        raise AdlError(f"{path} is unreadable ({e}); re-extract with `adl extract ... --overwrite`") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise AdlError(f"{path} has no schema_version: not an adl cache manifest")
    if version > SCHEMA_VERSION:
        raise AdlError(
            f"{root} was written by a newer adl (cache schema {version}, this adl reads up to "
            f"{SCHEMA_VERSION}): upgrade adl (`pip install -U adl`)"
        )
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise AdlError(f"{path} is incomplete (missing {', '.join(missing)}); re-extract with --overwrite")
    return manifest


def manifest_hash(manifest: dict) -> str:
    """sha256 of the canonical manifest JSON: identifies a cache's exact content."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
