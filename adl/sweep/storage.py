"""The Optuna storage of a sweep's study: URLs, opening them, and keeping their passwords out of sight.

    default                  sqlite:///<out>/study.db (one machine; several local workers are fine)
    journal:PATH             optuna JournalStorage(JournalFileBackend(PATH)): an append-only file,
                             the robust choice for several local processes
    postgresql://... etc.    any SQLAlchemy URL Optuna's RDBStorage takes (several machines)
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna

from adl.errors import AdlError

def default_storage(out: Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def secrets_of(url: str) -> list[str]:
    """The secrets a storage URL carries: the password of ``scheme://[user]:password@host`` and
    the values of ``password=`` / ``passwd=`` / ``token=``-like query parameters."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        found += [v for k, v in parse_qsl(parts.query) if re.search(r"pass|secret|token|key", k, re.I) and v]
    except ValueError:
        found = []
    found += re.findall(r"://[^/@]*?:([^@/]+)@", url)
    found += [unquote(f) for f in found]  # as a driver's error text may print it
    return sorted({f for f in found if f}, key=len, reverse=True)


def mask(text: str, url: str | None = None) -> str:
    """``text`` with every secret of ``url`` (and any ``:password@`` or ``password=value``) as ***."""
    for secret in secrets_of(url or "") + secrets_of(text):
        text = text.replace(secret, "***")
    return re.sub(r"((?:pass|passwd|password|secret|token)\s*=\s*)[^\s&;,'\"]+", r"\1***", text, flags=re.I)


def safe_url(url: str) -> str:
    """The URL with its password and secret query parameters replaced by ***."""
    return mask(url, url)


def open_storage(url: str, heartbeat: dict | None = None):
    """An Optuna storage for ``url``; a URL that cannot be opened or reached is an AdlError.
    ``heartbeat``: RDBStorage's heartbeat_interval, grace_period and stale-trial callback (a
    sweep's workers pass theirs; a reader of the study needs none)."""
    heartbeat = heartbeat or {}
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise AdlError(f"cannot open journal storage {path}: {e.strerror or e}; check the path") from None
    url = _with_driver(url)
    if url.startswith("sqlite:///"):
        return _sqlite(url, heartbeat)
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **heartbeat)
        except Exception as e:  # SQLAlchemy/driver errors differ by backend; all mean "cannot use this URL"
            error = e
            if type(e).__name__ != "IntegrityError" and "already exists" not in str(e):
                break
            time.sleep(0.5 + attempt)  # two workers created the tables of a new database at once
    raise _unusable(url, error)


def _unusable(url: str, error: Exception) -> AdlError:
    msg = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return AdlError(f"cannot open study storage {safe_url(url)}: {mask(msg, url)[:300]}; check the URL, "
                    "that the database server is running and reachable, and its driver is installed")


def _sqlite(url: str, heartbeat: dict):
    """RDBStorage on a SQLite file, safe for several local workers.

    pysqlite starts a transaction only at the first write, so Optuna's read-check-write steps
    (popping a queued trial, failing a stale one) could interleave between processes. Every
    transaction here begins with BEGIN IMMEDIATE (SQLAlchemy's documented recipe), which takes
    the write lock up front and serialises them; a file lock serialises creating the tables.

    The file is in WAL mode (write-ahead log, ``study.db-wal`` beside it while it is open): a
    commit appends to the log and syncs it once, where the default rollback journal syncs
    several files per commit, and a worker claims a trial in a dozen commits. Synchronous stays
    FULL, so a commit is as durable as before; readers do not block the writer. WAL needs the
    processes on one machine (as SQLite's locking always did): workers on several machines
    use a database server.
    """
    import sqlalchemy
    from filelock import FileLock

    path = Path(url[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}},
                                                 **heartbeat)
    except Exception as e:  # noqa: BLE001
        raise _unusable(url, e) from None
    engine = storage.engine

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")  # persistent: a no-op once the file is in WAL mode

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections predate the listeners
    return storage


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg 3; use psycopg2 when only that one is installed."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and sep and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url
