"""The plan file ``extract.json`` and the cache folder: what it is being filled with, by whom.

``identity`` pins everything that changes the stored bytes (model revision and config hash,
tokenizer files, transformers version, dataset spec and fingerprint, the requested
views/pools/layers/dtype/format/projection, max_length, batch size, shard count, device
kind and autocast dtype). A rerun with the same identity resumes (or reports a finished
cache); a different identity is refused unless ``--overwrite``. ``resolved`` holds what
was decided once from the model and the disk (views, pools, layers, max_length) so that
every shard and every resume uses the same.

What adl deletes. Only entries it writes itself, each recognised by its exact name
(``OWN``: extract.json, manifest.json, projection.safetensors, shard stores and their
progress/done files, its lock files and its temp files), and never through a symlink.
A folder holding anything else (a hidden file, ``.git``) is refused before adl writes a
byte into it, and so are ``$HOME``, ``/``, the current folder and a symlinked ``--out``.

Locks (all advisory, released by the kernel when a process dies, so a kill -9 leaves none):

- ``.plan.lock`` (exclusive, held for moments): serialises decisions about the folder
  (prepare, settle, wipe) and every change of the folder lock below.
- ``.adl.lock`` (flock, shared/exclusive): every process extracting into the folder holds
  it *shared* from ``prepare_folder`` until its shard has finished and the manifest is
  written, so the shard processes of one run work side by side. Wiping (``--overwrite``
  or a new extraction) needs it *exclusive*, taken without waiting: if any writer is
  still running, the wipe is refused with one line instead of deleting under it.
- ``.shard-XXXXX-of-YYYYY.lock`` (exclusive, in ShardWriter): one writer per shard.
- ``.manifest.lock``: the first shard to finish writes the manifest; later ones read it.

On a URL (an object store) the same rules hold with objects for files: only objects whose
name adl writes are deleted (a shard store's objects by their ``shard-...zarr/`` prefix), a
prefix holding any other object is refused, and nothing is deleted by prefix. Objects cannot
be locked, so the locks above do not exist there: the manifest's conditional PUT keeps two
writers from both publishing, one process per shard is the launcher's job, and ``--overwrite``
must not run while another machine is still writing the same URL (docs/cache.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path


from adl.cache.durable import refuse_unsafe_out
from adl.cache.location import Location
from adl.cache.summary import human
from adl.errors import AdlError

PLAN = "extract.json"
LOCK = ".plan.lock"
FOLDER_LOCK = ".adl.lock"
REQUEST_FIELDS = ("views", "pool", "layers", "project", "project_method", "project_sample_tokens", "dtype",
                  "format", "batch_size", "token_budget", "max_length", "decoder")
_SHARD = r"shard-\d{5}-of-\d{5}"
_JSON = rf"(?:extract|manifest|{_SHARD}\.progress|{_SHARD}\.done)\.json"
# Every name adl writes into a cache folder, and what it must be (a store folder or a file).
OWN = {
    "file": re.compile(rf"{_JSON}|projection\.safetensors|{_SHARD}\.h5|\.{_JSON}\.\d+\.tmp"
                       rf"|\.projection\.safetensors\.\d+\.tmp"),
    "lock": re.compile(rf"\.(?:plan|adl|projection|manifest|{_SHARD})\.lock"),
    "dir": re.compile(rf"{_SHARD}\.zarr"),
}


def identity(cfg, dataset, model, device, num_shards: int, tokenizer: dict) -> dict:
    """JSON-normal identity of an extraction (tuples become lists, as read back from disk)."""
    import transformers

    ident = {
        "model": model.identity(),
        "tokenizer": tokenizer,
        "dataset": {"spec": dataset.spec, "fingerprint": dataset.fingerprint},
        "request": {k: getattr(cfg, k) for k in REQUEST_FIELDS},
        "num_shards": num_shards,
        "compute": device.identity(),
        "transformers": transformers.__version__,
    }
    return json.loads(json.dumps(ident, sort_keys=True))


def _kind(p: Path) -> str | None:
    """"lock", "file" or "dir" for an entry adl wrote itself; None for anything else."""
    if p.is_symlink():
        return None
    for kind, pattern in OWN.items():
        if pattern.fullmatch(p.name):
            wanted = p.is_dir() if kind == "dir" else p.is_file()
            return kind if wanted else None
    return None


def _object_kind(name: str) -> str | None:
    """The same rule for an object below a URL: "file" for a top-level record adl writes,
    "dir" for an object inside a shard store's prefix, None for anything else."""
    top, _, rest = name.partition("/")
    if rest:
        return "dir" if OWN["dir"].fullmatch(top) else None
    return "file" if OWN["file"].fullmatch(name) else None


def check_out(root) -> list[str]:
    """Refuse an --out adl must never fill or wipe: a symlink, /, $HOME, the current folder,
    or a folder (a URL prefix) holding entries adl did not write (hidden ones included).
    -> the names of adl's own entries there (lock files aside)."""
    root = Location(root)
    if root.url:
        names = sorted(root.entries())
        foreign = [n for n in names if _object_kind(n) is None]
    else:
        refuse_unsafe_out(root.where, "cache/NAME")
        paths = sorted(root.where.iterdir()) if root.where.is_dir() else []
        foreign = [p.name for p in paths if _kind(p) is None]
        names = [p.name for p in paths if _kind(p) not in (None, "lock")]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise AdlError(f"{root} holds entries that are not an adl cache ({shown}); adl never deletes what it "
                       "did not write: choose another --out")
    return names


class FolderLock:
    """``.adl.lock`` held shared (a writer at work) or exclusive (a wipe); see the module docstring.

    ``flock`` on an open descriptor: converting shared <-> exclusive is not atomic, so every
    change happens while ``.plan.lock`` is held.
    """

    def __init__(self, root):
        self.root, self.fd = Location(root), None

    def take(self, exclusive: bool) -> None:
        import fcntl

        if self.root.url:  # objects cannot be locked
            return
        if self.fd is None:
            self.fd = os.open(self.root / FOLDER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AdlError(f"another adl extract is writing {self.root}; wait for it to finish, or choose "
                           "another --out") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def prepare_folder(root, ident: dict, overwrite: bool, num_shards: int, folder: FolderLock | None = None) -> str:
    """-> "new", "resume" or "complete", after refusing or wiping a folder as needed.

    On return (but "complete") ``folder`` is held shared, until the caller releases it
    (without ``folder``, the lock guards the wipe only and is released on return).
    ``--overwrite`` wipes a folder holding another configuration. With one shard it also
    restarts the same configuration from scratch; with several it cannot (a peer shard of
    this very run may be writing already), so there it only replaces other configurations.
    """
    root = Location(root)
    if folder is None:
        with FolderLock(root) as own:
            return prepare_folder(root, ident, overwrite, num_shards, own)
    check_out(root)
    if not root.url:
        root.where.mkdir(parents=True, exist_ok=True)
    with root.lock(LOCK):
        entries = check_out(root)  # again under the lock: something may have appeared meanwhile
        plan = root.read_json(PLAN) if PLAN in entries else None
        same = plan is not None and plan.get("identity") == ident
        if same and not (overwrite and num_shards == 1):
            if "manifest.json" in entries:
                return "complete"
            folder.take(exclusive=False)
            return "resume"
        if entries and not same and not overwrite:
            what = f"differs in {', '.join(_diff(plan['identity'], ident))}" if plan else "has no extract.json"
            raise AdlError(f"{root} already holds another extraction ({what}): rerun with --overwrite to "
                           "replace it, or choose another --out")
        folder.take(exclusive=True)
        _wipe(root)
        root.write_json(PLAN, {"identity": ident, "resolved": None})
        folder.take(exclusive=False)
        return "new"


def settle(root, decide) -> dict:
    """The plan's resolved choices; the first caller computes them with ``decide()``."""
    root = Location(root)
    with root.lock(LOCK):
        plan = root.read_json(PLAN)
        if plan.get("resolved") is None:
            plan["resolved"] = json.loads(json.dumps(decide(), sort_keys=True))
            root.write_json(PLAN, plan)
        return plan["resolved"]


def _wipe(root: Location) -> None:
    """Remove the entries adl wrote (never a lock file, never anything else). The caller holds
    the folder lock exclusive, so no writer is at work (on a URL: see the module docstring)."""
    if root.url:  # listed again and named one by one: an object that appeared meanwhile stays
        root.remove([n for n in root.entries() if _object_kind(n) is not None])
        return
    for p in root.where.iterdir():
        kind = _kind(p)
        if kind == "dir":
            shutil.rmtree(p)
        elif kind == "file":
            p.unlink()


def _diff(old, new, prefix: str = "") -> list[str]:
    """Dotted paths where two identities differ (at most a few, for the error line)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out[:4]
    return [] if old == new else [prefix.rstrip(".")]


def choose_views(requested, task: str, sizes: dict[str, int], free: int | None) -> tuple[list[str], str | None]:
    """-> (views, note). Default: pooled, plus tokens when everything fits in half the free
    disk (NER always needs tokens). Whatever must be written has to fit in the free disk.
    ``free`` None (an object store): no limit."""
    free = float("inf") if free is None else free
    ways_out = "use --project 64, --views pooled or fewer --layers (e.g. --layers -4:)"
    if requested is None:
        if task == "token" or sizes["pooled"] + sizes["tokens"] < free / 2:
            views, note = ["pooled", "tokens"], None
        else:
            views = ["pooled"]
            note = (f"tokens view skipped: its estimate {human(sizes['tokens'])} does not fit comfortably in "
                    f"{human(free)} free; add it with --views pooled,tokens --project 64")
    elif task == "token" and "tokens" not in requested:
        raise AdlError("token classification (NER) needs the tokens view: use --views tokens or pooled,tokens")
    else:
        views, note = [v for v in ("pooled", "tokens") if v in requested], None
    total = sum(sizes[v] for v in views)
    if total > free:
        raise AdlError(f"the cache needs about {human(total)} ({', '.join(f'{v} {human(sizes[v])}' for v in views)}) "
                       f"but only {human(free)} is free: {ways_out}")
    return views, note


def free_bytes(root) -> int | None:
    """Free bytes on the disk that will hold ``root``; None on an object store (no such limit)."""
    root = Location(root)
    if root.url:
        return None
    path = root.where
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
