"""Run folders as the live path sees them: the head, what it was trained on, and the backbone
it needs, read from the run folder alone (never the cache).

A run folder (``adl train --out R``) holds head.json + head.safetensors (the head),
cache_manifest.json (the backbone: model id, revision, config hash, states; the tokenizer and
max_length; the storage dtype; the data set and its carving), metrics.json (the test metrics)
and projection.safetensors when the tokens view was projected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version
from torch import nn

from adl import UPGRADE, __version__
from adl.cache import read_json
from adl.cache.manifest import SCHEMA_VERSION
from adl.errors import AdlError
from adl.extract.projection import FILE as PROJECTION_FILE
from adl.extract.projection import Projection
from adl.train.head_io import load_head

NEEDED = ("head.json", "head.safetensors", "cache_manifest.json", "metrics.json")
# What two heads must share to ride on one forward pass: (label, getter on the manifest).
SHARED = (
    ("model id", lambda m: m["model"]["id"]),
    ("model revision", lambda m: m["model"].get("revision")),
    ("model config hash", lambda m: m["model"]["config_hash"]),
    ("states (encoder/decoder)", lambda m: m["model"]["states"]),
    ("tokenizer", lambda m: (m["tokenizer"]["name"], m["tokenizer"]["class"])),
    ("max_length", lambda m: m["tokenizer"]["max_length"]),
)


@dataclass(frozen=True, eq=False)
class Run:
    """One trained head and what it was trained on."""

    name: str  # the run folder's name
    root: Path
    head: nn.Module  # eval mode, CPU
    info: dict  # head.json: spec, label_names, layers (absolute), task, view, pool, projection
    manifest: dict  # the cache's manifest, copied into the run
    metrics: dict  # metrics.json
    projection: Projection | None

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def label_names(self) -> list[str]:
        return list(self.info["label_names"])

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.info["layers"]]


def _newer(version: str | None) -> bool:
    try:
        return version is not None and Version(str(version)) > Version(__version__)
    except InvalidVersion:
        return True


def load_run(path) -> Run:
    """Read and check one run folder; an incomplete or newer one is one AdlError with the fix."""
    root = Path(path)
    if not root.is_dir():
        raise AdlError(f"no run folder {root}: train one with `adl train --cache C --out {root}`")
    missing = [f for f in NEEDED if not (root / f).is_file()]
    if missing:
        raise AdlError(f"run folder {root} is incomplete (missing {', '.join(missing)}): its training did not "
                       "finish; rerun `adl train ... --overwrite`")
    try:
        info, manifest, metrics = (read_json(root / f) for f in ("head.json", "cache_manifest.json", "metrics.json"))
    except (OSError, ValueError) as e:
        raise AdlError(f"run folder {root} has an unreadable file ({str(e).splitlines()[0]}): retrain it") from None
    for what, version in (("head", info.get("adl_version")), ("cache manifest", manifest.get("adl_version"))):
        if _newer(version):
            raise AdlError(f"the {what} in {root} was written by a newer adl ({version}; this is {__version__}): "
                           f"upgrade adl (`{UPGRADE}`)")
    if int(manifest.get("schema_version", 0)) > SCHEMA_VERSION:
        raise AdlError(f"{root} records a cache of a newer schema: upgrade adl (`{UPGRADE}`)")
    projection = None
    if info.get("projection"):
        if not (root / PROJECTION_FILE).is_file():
            raise AdlError(f"run folder {root} is incomplete (missing {PROJECTION_FILE}, its head reads projected "
                           "states): retrain it with this adl, which copies the projection into the run")
        projection = Projection.load(root / PROJECTION_FILE)
    head, info = load_head(root)
    return Run(root.name, root, head, info, manifest, metrics, projection)


def check_same_backbone(runs: list[Run]) -> None:
    """Heads ride on one pass only if every run names the same backbone, tokenizer and length."""
    first = runs[0]
    for run in runs[1:]:
        for label, get in SHARED:
            a, b = get(first.manifest), get(run.manifest)
            if a != b:
                raise AdlError(f"runs {first.name} and {run.name} differ in {label} ({a} vs {b}): heads in one "
                               "Predictor must share the backbone; use separate predictors")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise AdlError(f"two runs share the folder name {sorted(n for n in names if names.count(n) > 1)[0]!r}, "
                       "which names the head: rename one run folder")
