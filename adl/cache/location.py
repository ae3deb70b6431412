"""Where a cache lives: a local folder, or a URL on an object store (``s3://``, ``gs://``, any
fsspec protocol).

``Location(where)`` names the cache's top level and gives the few operations the cache needs
on its top-level entries, with one meaning on disk and on a store:

- ``read_json`` / ``write_json``: on disk the durable temp-file + rename of ``durable.py``; on a
  store one whole-object PUT (an object is never seen half written, so no rename is needed).
- ``create_json``: write only if absent; -> False when something is already there. On disk under
  a file lock; on a store one conditional PUT (``If-None-Match: *`` on S3, through fsspec's
  ``mode="create"``), so that two writers on two machines can never both publish a manifest.
- ``entries``: every object below the location with its size (one recursive listing).
- ``zarr_store``: what ``zarr.open_group`` takes for a shard: a path, or an ``FsspecStore``.

Credentials come from the protocol's standard chain (for S3: the AWS environment, ~/.aws files,
instance roles, and ``AWS_ENDPOINT_URL`` for S3-compatible stores; for GCS: application default
credentials). adl never reads, prints or records them: ``str(location)`` and every error line
pass through ``mask``. A missing bucket, denied access or an unreachable endpoint becomes one
``AdlError`` naming the URL (``user_error``). Transient failures of a store (a dropped connection,
a 5xx) are retried with exponential backoff (``retry``), then reported on one line.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from adl.errors import AdlError

# S3 and GCS need a package of their own; fsspec names others when they are missing.
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_OAUTH_ACCESS_TOKEN",
              "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")


def is_url(where) -> bool:
    """A URL with a protocol other than file:// (a Windows drive letter is not a protocol)."""
    text = str(where)
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", text)) and not text.startswith("file://")


def local_folder(out, what: str = "run folders") -> Path:
    """``out`` as a local Path; a URL is refused with one line (only caches live on object stores)."""
    if is_url(out):
        raise AdlError(f"--out {mask(out)}: {what} are written to a local disk, where you open them; only the "
                       "cache (--cache) may be a URL: give a folder such as runs/NAME")
    return Path(out)


def mask(text: str) -> str:
    """``text`` with credentials removed: URL user info, query strings, and the values of the
    credential environment variables wherever they appear."""
    text = re.sub(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@", r"\1***@", str(text))
    text = re.sub(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?]*)\?\S*", r"\1?***", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class Location:
    """The top level of a cache: ``Path`` semantics on disk, an fsspec filesystem for a URL."""

    def __init__(self, where):
        if isinstance(where, Location):
            where = where.where
        self.where = str(where).rstrip("/") if is_url(where) else Path(where)
        self.url = is_url(where)
        self._fs = None

    # -- naming ----------------------------------------------------------------------
    def __str__(self) -> str:
        return mask(self.where) if self.url else str(self.where)

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __fspath__(self) -> str:
        if self.url:
            raise TypeError(f"{self} is a URL, not a local path")
        return str(self.where)

    def __truediv__(self, name: str):
        """The child ``name``: a Path on disk, a URL string on a store."""
        return f"{self.where}/{name}" if self.url else self.where / name

    def show(self, name: str) -> str:
        """The child ``name`` for a message (credentials masked)."""
        return mask(self / name)

    @property
    def name(self) -> str:
        return self.where.rsplit("/", 1)[-1] if self.url else self.where.name

    @property
    def protocol(self) -> str:
        return self.where.split("://", 1)[0].lower() if self.url else "file"

    @property
    def fs(self):
        """The fsspec filesystem of a URL (credentials from the protocol's standard chain)."""
        if self._fs is None:
            import fsspec

            try:
                self._fs, self._root = fsspec.core.url_to_fs(self.where)
            except (ImportError, ValueError) as e:
                package = PACKAGES.get(self.protocol)
                fix = f"pip install {package}" if package else "install the fsspec package for it"
                raise AdlError(f"{self}: the {self.protocol}:// protocol is not available ({mask(e)}): {fix}") \
                    from None
        return self._fs

    def key(self, name: str = "") -> str:
        """The filesystem path of ``name`` below a URL location (no protocol)."""
        self.fs  # noqa: B018 - sets _root
        return f"{self._root}/{name}".rstrip("/") if name else self._root

    # -- top-level entries -------------------------------------------------------------
    def exists(self, name: str) -> bool:
        if not self.url:
            return (self.where / name).is_file()
        with self.errors():  # never from a cached listing: another machine may have written it
            self.fs.invalidate_cache(self.key(name))
            return retry(lambda: self.fs.isfile(self.key(name)), self.show(name))

    def is_there(self) -> bool:
        """Does the location hold anything (a folder on disk, any object below a URL)?"""
        return self.where.is_dir() if not self.url else bool(self.entries())

    def read_bytes(self, name: str) -> bytes:
        if not self.url:
            return (self.where / name).read_bytes()
        with self.errors():
            return retry(lambda: self.fs.cat_file(self.key(name)), self.show(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """One whole object (a store) or a durable temp-file + rename (a disk)."""
        if not self.url:
            from adl.cache.durable import write_bytes

            write_bytes(self.where / name, data)
            return
        with self.errors():
            retry(lambda: self.fs.pipe_file(self.key(name), data), self.show(name))

    def read_json(self, name: str) -> dict:
        import json

        return json.loads(self.read_bytes(name))

    def write_json(self, name: str, obj: dict) -> None:
        from adl.cache.durable import json_bytes

        self.write_bytes(name, json_bytes(obj))

    def create_json(self, name: str, obj: dict, lock: str | None = None) -> bool:
        from adl.cache.durable import json_bytes

        return self.create_bytes(name, json_bytes(obj), lock)

    def create_bytes(self, name: str, data: bytes, lock: str | None = None) -> bool:
        """Write ``name`` only if it does not exist yet; -> whether this call wrote it.

        On disk: under the file lock ``lock`` (default ``.<name>.lock``). On a store: one
        conditional PUT, so exactly one of any number of concurrent callers on any number of
        machines wins.
        """
        if not self.url:
            with self.lock(lock or f".{name}.lock"):
                if self.exists(name):
                    return False
                self.write_bytes(name, data)
                return True
        with self.errors():
            try:
                retry(lambda: self.fs.pipe_file(self.key(name), data, mode="create"), self.show(name))
            except FileExistsError:
                return False
            except OSError as e:  # s3fs names S3's 412 PreconditionFailed in the message
                if "precondition" in str(e).lower():
                    return False
                raise
        return True

    def entries(self) -> dict[str, int]:
        """Every object below a URL location: {relative name: size} (one recursive listing)."""
        with self.errors():
            self.fs.invalidate_cache()  # a fresh listing, never a cached one
            found = retry(lambda: self.fs.find(self.key(), detail=True), str(self))
        base = self.key() + "/"
        return {p[len(base):]: int(info.get("size") or 0) for p, info in found.items() if p.startswith(base)}

    def remove(self, names: list[str]) -> None:
        """Delete these objects below a URL location (each named exactly, never a prefix)."""
        if names:
            with self.errors():
                retry(lambda: self.fs.rm([self.key(n) for n in names]), str(self))

    @contextmanager
    def local_copy(self, name: str):
        """A local path holding ``name``: the file itself on disk, a temporary copy for a URL."""
        if not self.url:
            yield self.where / name
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(self.read_bytes(name))
            yield path

    def zarr_store(self, name: str, read_only: bool):
        """What ``zarr.open_group`` opens for the store ``name``: a path, or an FsspecStore."""
        if not self.url:
            return str(self.where / name)
        from zarr.storage import FsspecStore

        self.fs  # noqa: B018 - a missing protocol package is one line here
        with self.errors():
            return FsspecStore.from_url(self / name, read_only=read_only)

    def lock(self, name: str):
        """A file lock on disk; on a store nothing (objects cannot be locked: see docs/cache.md)."""
        if self.url:
            return nullcontext()
        from filelock import FileLock

        return FileLock(str(self.where / name))

    @contextmanager
    def errors(self):
        """Storage failures as one line naming this location (see ``user_error``)."""
        try:
            yield
        except AdlError:
            raise
        except Exception as e:
            err = user_error(e, str(self))
            if err is None:
                raise
            raise err from None


# -- errors and retries ---------------------------------------------------------------------
def _names(e: BaseException) -> str:
    return " ".join(c.__name__ for c in type(e).__mro__)


def kind(e: BaseException) -> str | None:
    """"denied", "no-bucket", "unreachable", or None (not a storage failure the user fixes)."""
    text, names = str(e), _names(e)
    if isinstance(e, PermissionError) or any(s in text for s in ("AccessDenied", "InvalidAccessKeyId",
                                                                  "SignatureDoesNotMatch", "Forbidden")):
        return "denied"
    if "NoSuchBucket" in text or (isinstance(e, FileNotFoundError) and "bucket" in text.lower()):
        return "no-bucket"
    if any(s in names for s in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                                "ConnectionRefusedError")) or "Could not connect to the endpoint" in text:
        return "unreachable"
    return None


class StorageError(AdlError):
    """A store the user must fix (credentials, bucket, endpoint), or one that kept failing."""


def user_error(e: BaseException, where: str | None = None) -> AdlError | None:
    """One line for a storage failure the user must fix, naming the URL (masked); None otherwise."""
    what = kind(e)
    if what is None:
        return None
    at = mask(where) if where else "the object store"
    if what == "denied":
        return StorageError(f"access denied to {at}: check the credentials (for s3://: AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, ~/.aws or the instance role; for gs://: application default "
                        "credentials) and that they may read and write this bucket")
    if what == "no-bucket":
        return StorageError(f"the bucket of {at} does not exist: create it, or fix the URL")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    via = f" at {mask(endpoint)}" if endpoint else ""
    return StorageError(f"cannot reach the object store of {at}{via}: check the network and AWS_ENDPOINT_URL, "
                    "then rerun the same command")


def transient(e: BaseException) -> bool:
    """Worth another attempt: I/O and connection failures that are not the user's to fix."""
    if isinstance(e, (AdlError, FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                      PermissionError, ImportError, ValueError, TypeError, KeyError)):
        return False
    if kind(e) is not None or "precondition" in str(e).lower():
        return False
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or "botocore" in type(e).__module__


def retry(fn, what: str, attempts: int | None = None):
    """``fn()``, retried on transient failures with exponential backoff and jitter.

    Delays: base * 2**i for i = 0 .. attempts-2 (base ``ADL_STORAGE_BACKOFF_S``, default 0.5 s;
    attempts ``ADL_STORAGE_ATTEMPTS``, default 6: about 16 s in all). After the last attempt the
    failure is one AdlError; the caller's committed work is kept and a rerun resumes.
    """
    attempts = attempts or int(os.environ.get("ADL_STORAGE_ATTEMPTS", "6"))
    base = float(os.environ.get("ADL_STORAGE_BACKOFF_S", "0.5"))
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not transient(e):
                raise
            if i == attempts - 1:
                raise StorageError(f"the object store kept failing on {mask(what)} ({attempts} attempts; last: "
                               f"{mask(str(e).splitlines()[0] if str(e) else type(e).__name__)}): rerun the "
                               "same command to resume; committed batches are kept") from None
            time.sleep(base * 2**i * (0.5 + random.random()))
