"""Durable files: what adl commits stays committed after a kill -9 or a power cut.

``write_json`` is the one way adl writes its JSON records (progress, done, manifest, plan,
run configs): a temporary file is written and fsynced, renamed over the target, and the
folder is fsynced so that the rename itself is on disk. A reader sees the old file or the
new one, never half of one, and a committed record is not lost to the page cache.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

from adl.errors import AdlError


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (new names, renames) durable; a no-op where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(obj: dict) -> bytes:
    """The one JSON encoding of adl's records: sorted keys, two-space indent, final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically and durably: temp file + fsync + rename + fsync(folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: dict) -> None:
    """Write sorted JSON atomically and durably (``write_bytes``)."""
    write_bytes(path, json_bytes(obj))


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """A CSV table written as ``write_json`` writes (atomic, durable): a header of ``fields``
    (default: every key of the rows, in first-seen order), None as an empty cell."""
    path = Path(path)
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: "" if r.get(k) is None else r.get(k) for k in fields} for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def refuse_unsafe_out(path: Path, example: str) -> None:
    """The one rule for an --out folder adl fills and may wipe: never a symlink (adl does not
    write through links), a file, ``/``, ``$HOME`` or the current folder. ``example`` is a
    folder name to suggest instead, e.g. ``cache/NAME``."""
    path = Path(path)
    if path.is_symlink():
        raise AdlError(f"--out {path} is a symlink; adl does not write through links: give the real folder "
                       f"({path.resolve()}) or a new one")
    if path.exists() and not path.is_dir():
        raise AdlError(f"--out {path} is a file, not a folder: choose another --out")
    where = path.resolve()
    for name, special in (("the root folder", Path(where.anchor)), ("your home folder", Path.home()),
                          ("the current folder", Path.cwd())):
        if where == special.resolve():
            raise AdlError(f"--out {path} is {name}; adl writes into a folder of its own: give a new folder "
                           f"such as {example}")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when it comes from HDF5 (h5py raises RuntimeError or OSError
    without errno, and names the C library's errno in the message)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, (OSError, RuntimeError)):
        return False
    text = str(e)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded",
                                   f"errno = {errno.ENOSPC},", f"errno = {errno.EDQUOT},"))


def disk_full_error(root: Path) -> AdlError:
    return AdlError(f"disk full while writing {root}: free space (or use --project 64, --views pooled, "
                    "--layers) and rerun the same command; committed batches are kept")
