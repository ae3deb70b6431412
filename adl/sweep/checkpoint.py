"""Group checkpoints: a running group's whole training state in one file next to the study.

    <sweep folder>/checkpoints/<group id>.ckpt   =   MAGIC (8 bytes) | sha256(payload) (32) | payload

The payload is ``torch.save`` of {"version", "digest" (the sweep's), "jobs" (each row's point
and seed), "trials" (each row's trial number when the group started), "epoch", "state"}, where
``state`` is ``adl.train.trainer.LoopState.state``: stacked parameters and AdamW moments per
configuration, learning rates, ReduceLROnPlateau state, best scores and best states, histories,
the RNG streams and the epoch. It holds plain values and tensors only and is read with
``torch.load(weights_only=True)``, after the checksum, so a truncated or changed file is named
and never read as a state.

A write goes to a temporary file in the same folder, is fsynced, then renamed over the old one
(atomic on POSIX): a reader sees the previous checkpoint or the new one, whole. One file per
running group, rewritten in place; ``delete`` once every configuration of the group is told.

Locations are strings (today a path; an object-storage URL fits the same four calls).
"""

from __future__ import annotations

import hashlib
import io
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adl.cache.durable import write_bytes

MAGIC = b"ADLCKPT1"
VERSION = 1


class CheckpointDamaged(Exception):
    """A checkpoint whose checksum or contents do not hold; the message names the file."""


def new_location(sweep_dir: Path) -> str:
    """Where a new group's checkpoint goes: a fresh name in ``<sweep_dir>/checkpoints``."""
    return str((Path(sweep_dir) / "checkpoints" / f"{secrets.token_hex(6)}.ckpt").resolve())


def write(location: str, payload: dict) -> int:
    """Atomically replace ``location`` with ``payload``; returns the bytes written."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    data = MAGIC + hashlib.sha256(body).digest() + body
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, data)  # temp file, fsync, rename, fsync of the folder
    return len(data)


def read(location: str) -> dict | None:
    """The payload at ``location``; None when there is none; CheckpointDamaged when it does not check."""
    try:
        data = Path(location).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise CheckpointDamaged(f"checkpoint {location} is damaged (truncated to {len(data)} bytes or not a "
                                "checkpoint)")
    digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointDamaged(f"checkpoint {location} is damaged (checksum mismatch: truncated or changed)")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as e:  # noqa: BLE001  (a file another torch wrote, or a bug: never trained from)
        raise CheckpointDamaged(f"checkpoint {location} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("version") != VERSION:
        raise CheckpointDamaged(f"checkpoint {location} has another format version")
    return payload


def delete(location: str) -> None:
    Path(location).unlink(missing_ok=True)


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
