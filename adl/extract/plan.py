"""The plan file ``extract.json``: what a cache folder is being filled with, and by what.

``identity`` pins everything that changes the stored bytes (model revision and config hash,
dataset spec and fingerprint, the requested views/pools/layers/dtype/format/projection,
max_length, batch size, shard count, device kind and autocast dtype). A rerun with the same
identity resumes (or reports a finished cache); a different identity is refused unless
``--overwrite``. ``resolved`` holds what was decided once from the model and the disk
(views, pools, layers, max_length) so that every shard and every resume uses the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from filelock import FileLock, Timeout

from adl.cache import read_json, write_json
from adl.cache.summary import human
from adl.errors import AdlError

PLAN = "extract.json"
LOCK = ".plan.lock"
REQUEST_FIELDS = ("views", "pool", "layers", "project", "project_method", "project_sample_tokens", "dtype",
                  "format", "batch_size", "token_budget", "max_length", "decoder")


def identity(cfg, dataset, model, device, num_shards: int) -> dict:
    """JSON-normal identity of an extraction (tuples become lists, as read back from disk)."""
    ident = {
        "model": model.identity(),
        "dataset": {"spec": dataset.spec, "fingerprint": dataset.fingerprint},
        "request": {k: getattr(cfg, k) for k in REQUEST_FIELDS},
        "num_shards": num_shards,
        "compute": device.identity(),
    }
    return json.loads(json.dumps(ident, sort_keys=True))


def _is_cache_entry(p: Path) -> bool:
    return p.name in (PLAN, "manifest.json", "projection.safetensors") or p.name.startswith(("shard-", ".shard-"))


def prepare_folder(root: Path, ident: dict, overwrite: bool, num_shards: int) -> str:
    """-> "new", "resume" or "complete", after refusing or wiping a folder as needed.

    ``--overwrite`` wipes a folder holding another configuration. With one shard it also
    restarts the same configuration from scratch; with several it cannot (a peer shard of
    this very run may be writing already), so there it only replaces other configurations.
    """
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / LOCK)):
        entries = [p for p in root.iterdir() if p.name != LOCK and not p.name.startswith(".")]
        foreign = [p.name for p in entries if not _is_cache_entry(p)]
        if foreign:
            raise AdlError(f"{root} holds files that are not an adl cache ({', '.join(sorted(foreign)[:3])}); "
                           "choose another --out")
        plan = read_json(root / PLAN) if (root / PLAN).is_file() else None
        same = plan is not None and plan.get("identity") == ident
        if same and not (overwrite and num_shards == 1):
            return "complete" if (root / "manifest.json").is_file() else "resume"
        if entries and not same and not overwrite:
            what = f"differs in {', '.join(_diff(plan['identity'], ident))}" if plan else "has no extract.json"
            raise AdlError(f"{root} already holds another extraction ({what}): rerun with --overwrite to "
                           "replace it, or choose another --out")
        _wipe(root)
        write_json(root / PLAN, {"identity": ident, "resolved": None})
        return "new"


def settle(root: Path, decide) -> dict:
    """The plan's resolved choices; the first caller computes them with ``decide()``."""
    with FileLock(str(root / LOCK)):
        plan = read_json(root / PLAN)
        if plan.get("resolved") is None:
            plan["resolved"] = json.loads(json.dumps(decide(), sort_keys=True))
            write_json(root / PLAN, plan)
        return plan["resolved"]


def _wipe(root: Path) -> None:
    """Remove everything but the plan lock, unless a writer still holds a shard lock."""
    for lock_file in root.glob(".shard-*.lock"):
        lock = FileLock(str(lock_file))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise AdlError(f"another adl extract is writing {root} (lock {lock_file}); wait for it to "
                           "finish or choose another --out") from None
        lock.release()
    for p in root.iterdir():
        if p.name == LOCK:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _diff(old, new, prefix: str = "") -> list[str]:
    """Dotted paths where two identities differ (at most a few, for the error line)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out[:4]
    return [] if old == new else [prefix.rstrip(".")]


def choose_views(requested, task: str, sizes: dict[str, int], free: int) -> tuple[list[str], str | None]:
    """-> (views, note). Default: pooled, plus tokens when everything fits in half the free
    disk (NER always needs tokens). Whatever must be written has to fit in the free disk."""
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


def free_bytes(root: Path) -> int:
    path = root
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
