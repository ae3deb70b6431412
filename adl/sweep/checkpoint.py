"""Group checkpoints: a running group's whole training state in one file or object.

    <checkpoints>/<group id>.ckpt   =   MAGIC (8 bytes) | sha256(payload) (32) | payload

``<checkpoints>`` is ``--checkpoints``: a folder (default ``<sweep folder>/checkpoints``) or an
object-store URL (``s3://bucket/prefix``, any fsspec protocol), reached through
``adl.cache.location.Location`` like a cache on a store. A URL (or a folder every machine
mounts) lets a worker on another machine resume a dead worker's group.

The payload is {"version", "digest" (the sweep's), "jobs" (each row's point and seed),
"trials" (each row's trial number when the group started), "epoch", "state"}, where ``state`` is ``adl.train.trainer.LoopState.state``: stacked parameters and
AdamW moments per configuration, learning rates, ReduceLROnPlateau state, best scores and best
states, histories, the RNG streams and the epoch. Its hundreds of small tensors are packed into
one flat tensor per dtype (``pack``, ``flatten``), and ``torch.save`` writes the rest: it pays
per tensor, far more than per byte. It holds
plain values and tensors only and is read with ``torch.load(weights_only=True)``, after the
checksum, so a truncated or changed checkpoint is named and never read as a state.

A write replaces the whole checkpoint atomically: on disk a temporary file, fsynced, renamed
over the old one; on a store one whole-object PUT. A reader sees the previous checkpoint or the
new one, whole. One per running group, rewritten in place; ``delete`` once every configuration
of the group is told.
"""

from __future__ import annotations

import hashlib
import io
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adl.cache.location import Location, is_url, mask

MAGIC = b"ADLCKPT1"
VERSION = 2
TENSOR = "adl_tensor"  # a packed tensor's marker: {TENSOR: index into the table of "tensors"}


class CheckpointDamaged(Exception):
    """A checkpoint whose checksum or contents do not hold; the message names it."""


def new_location(root) -> str:
    """Where a new group's checkpoint goes: a fresh name in the folder or under the URL ``root``."""
    name = f"{secrets.token_hex(6)}.ckpt"
    return f"{str(root).rstrip('/')}/{name}" if is_url(root) else str((Path(root) / name).resolve())


def _split(location: str) -> tuple[Location, str]:
    parent, _, name = location.rpartition("/")
    return Location(parent), name


def pack(obj, table: list):
    """``obj`` with each tensor replaced by {TENSOR: i}; the tensors go to ``table``."""
    if isinstance(obj, torch.Tensor):
        table.append(obj)
        return {TENSOR: len(table) - 1}
    if isinstance(obj, dict):
        return {k: pack(v, table) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack(v, table) for v in obj)
    return obj


def unpack(obj, tensors: list):
    if isinstance(obj, dict):
        return tensors[obj[TENSOR]] if obj.keys() == {TENSOR} else {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack(v, tensors) for v in obj)
    return obj


def flatten(tensors: list) -> dict:
    """{"flat": {dtype name: one 1-D tensor}, "index": [(dtype name, offset, shape)]}: a few
    tensors to serialise instead of many."""
    by_dtype: dict[str, list] = {}
    ends: dict[str, int] = {}
    index = []
    for t in tensors:
        key = str(t.dtype).removeprefix("torch.")
        index.append((key, ends.get(key, 0), list(t.shape)))
        ends[key] = ends.get(key, 0) + t.numel()
        by_dtype.setdefault(key, []).append(t.detach().reshape(-1).cpu())
    return {"flat": {k: torch.cat(v) for k, v in by_dtype.items()}, "index": index}


def unflatten(packed: dict) -> list:
    """The tensors of ``flatten``, each a copy of its own (not a view of the flat buffer)."""
    out = []
    for key, offset, shape in packed["index"]:
        n = math.prod(shape)
        out.append(packed["flat"][key][offset:offset + n].reshape(shape).clone())
    return out


def encode(payload: dict) -> bytes:
    """MAGIC | sha256 | torch.save of ``payload`` with its tensors packed."""
    table: list = []
    skeleton = pack(payload, table)
    buf = io.BytesIO()
    torch.save({"skeleton": skeleton, "tensors": flatten(table)}, buf)
    body = buf.getvalue()
    return MAGIC + hashlib.sha256(body).digest() + body


def decode(data: bytes, location: str) -> dict:
    """The payload of ``encode``; CheckpointDamaged (naming ``location``) when it does not check."""
    where = mask(location)  # a URL's credentials never reach a message
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise CheckpointDamaged(f"checkpoint {where} is damaged (truncated to {len(data)} bytes or not a "
                                "checkpoint)")
    digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointDamaged(f"checkpoint {where} is damaged (checksum mismatch: truncated or changed)")
    try:
        raw = torch.load(io.BytesIO(body), weights_only=True)
        payload = unpack(raw["skeleton"], unflatten(raw["tensors"]))
    except Exception as e:  # noqa: BLE001  (a file another torch wrote, or a bug: never trained from)
        raise CheckpointDamaged(f"checkpoint {where} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("version") != VERSION:
        raise CheckpointDamaged(f"checkpoint {where} has another format version")
    return payload


def write(location: str, payload: dict) -> int:
    """Atomically replace ``location`` with ``payload``; returns the bytes written."""
    data = encode(payload)
    root, name = _split(location)
    if not root.url:
        Path(root.where).mkdir(parents=True, exist_ok=True)
    root.write_bytes(name, data)  # disk: temp file, fsync, rename, fsync of the folder; store: one PUT
    return len(data)


def read(location: str) -> dict | None:
    """The payload at ``location``; None when there is none; CheckpointDamaged when it does not check."""
    root, name = _split(location)
    try:
        if root.url and not root.exists(name):
            return None
        data = root.read_bytes(name)
    except FileNotFoundError:
        return None
    return decode(data, location)


def delete(location: str) -> None:
    root, name = _split(location)
    if root.url:
        root.remove([name])
    else:
        Path(root.where, name).unlink(missing_ok=True)


@dataclass
class Saver:
    """``fit_all``'s ``checkpoint`` hook for one group: at the end of an epoch, when at least
    ``every_s`` seconds passed since the last write (or the group's start), write the state."""

    location: str
    meta: dict  # digest, jobs, trials: what identifies the group
    every_s: float
    stats: dict = field(default_factory=lambda: {"writes": 0, "bytes": 0, "seconds": 0.0})
    last: float = field(default_factory=time.perf_counter)

    def __call__(self, epoch: int, state) -> None:
        if time.perf_counter() - self.last < self.every_s:
            return
        t0 = time.perf_counter()
        size = write(self.location, {"version": VERSION, **self.meta, "epoch": epoch, "state": state()})
        self.last = time.perf_counter()
        self.stats["writes"] += 1
        self.stats["bytes"] += size
        self.stats["seconds"] += self.last - t0
