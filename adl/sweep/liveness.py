"""Is a worker on this machine alive? An OS lock each worker holds while it runs.

Heartbeats tell a dead worker only after the grace period. The usual restart of a killed job
happens on the same machine, where the kernel knows better: every worker holds an exclusive
``flock`` on its own file ``<tmp>/adl-workers-<uid>/<host>-<pid>-<token>.lock`` for as long as
it runs, and the kernel drops the lock when the process dies, however it dies (kill -9
included). A trial records its worker's file name (user attribute ``adl_lock``); another
worker that finds that file here and can lock it knows the owner is dead, at once.

A file from another machine is not here (or, on a shared temp folder, is locked by a live
process over the network lock manager), so workers on other machines still go by heartbeats.
The random token keeps a reused pid from passing for a dead worker's. POSIX only (``fcntl``).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path

NAME = re.compile(r"[\w.-]+-\d+-[0-9a-f]{12}\.lock")  # the files this module writes, recognised by name


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"adl-workers-{os.getuid()}"


class WorkerLock:
    """This worker's lock, held from construction to ``release()`` (or the process's death)."""

    def __init__(self):
        host = re.sub(r"[^\w.-]", "_", socket.gethostname())
        self.name = f"{host}-{os.getpid()}-{secrets.token_hex(6)}.lock"
        lock_dir().mkdir(mode=0o700, exist_ok=True)
        self.path = lock_dir() / self.name
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: nobody else holds it

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def dead(name: str | None) -> bool:
    """True when ``name`` (a trial's ``adl_lock``) is a worker of this machine that is no longer
    running: its file is here and nobody holds its lock. False when alive, or unknown here."""
    if not name or not NAME.fullmatch(name):
        return False
    path = lock_dir() / name
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False  # not a worker of this machine (or already cleaned up: its trials were released)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: the worker runs
    finally:
        os.close(fd)  # closing drops a lock we took
    return True


def forget(name: str) -> None:
    """Remove a dead worker's lock file once its trials are handed back (ours, by its name)."""
    if NAME.fullmatch(name or ""):
        (lock_dir() / name).unlink(missing_ok=True)
