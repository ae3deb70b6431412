"""The run folder: its files, how adl writes one (aside, then swapped in whole) and reads it back.

A run folder (``adl train --out R``, ``adl finetune``, ``adl train --baselines``) holds:

    config.json                {"adl_run": "train" | "finetune" | "baselines" (the marker), "config":
                               resolved config, "cache_hash", "adl_version", "view"}
    metrics.json               validation (best epoch) and test metrics (``adl.train.run``)
    history.csv                per epoch: loss, val_<metric>..., lr, seconds, w_<layer>...
    head.safetensors           the head's tensors (contiguous, CPU; no pickles)
    head.json                  {"spec": name + constructor kwargs, "label_names", "layers", "task",
                               "view", "pool", "projection", "cache_hash", "epoch", "adl_version"}
    cache_manifest.json        the cache's manifest: the backbone (model id, revision, config hash,
                               states), the tokenizer and max_length, the storage dtype, the data
                               set and its carving
    projection.safetensors     the cache's stored projection, when the tokens view was projected
    layer_weights.png          layer weights over epochs
    layer_weights_final.png    final weight per layer

The spec alone rebuilds the head module, including whether its mix applies GELU
(``activation``: False when the cache stored its tokens after GELU), so ``load_head`` and
``load_run`` need nothing but the folder (never the cache).

A run is written aside, in ``<out>.partial/``, and swapped in whole when it finishes
(``prepare_out``, ``publish``): an existing run is replaced entirely or not at all. adl
replaces or deletes only its own run folders, recognised by their content: a config.json that
carries adl's marker (written into the partial folder the moment it is made), and nothing but
the files above. A user's folder that happens to hold a config.json is never adl's.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version
from safetensors.torch import load_file, save_file
from torch import nn

from adl import UPGRADE, __version__
from adl.cache import read_json, write_csv, write_json
from adl.cache.durable import refuse_unsafe_out
from adl.cache.location import local_folder
from adl.cache.manifest import SCHEMA_VERSION
from adl.cache.projection import FILE as PROJECTION_FILE
from adl.cache.projection import Projection
from adl.errors import AdlError
from adl.train.ensemble import build_from_spec
from adl.train.heads import head_spec

RUN_FILES = frozenset({"config.json", "metrics.json", "history.csv", "head.safetensors", "head.json",
                       "cache_manifest.json", "projection.safetensors", "layer_weights.png",
                       "layer_weights_final.png", "baselines.csv", "baselines.png"})


MARK = "adl_run"  # config.json's field that makes a folder adl's own run; its value: the command's kind


def write_config(folder: Path, kind: str, doc: dict | None = None) -> None:
    """config.json, marked as adl's (``{"adl_run": kind, ...doc}``)."""
    write_json(folder / "config.json", {MARK: kind, **(doc or {})})


def not_adl_written(path: Path) -> list[str]:
    """What in folder ``path`` adl did not write: its entries other than run files (or adl's temp
    files), and config.json when it lacks adl's marker. Empty for an empty folder."""
    entries = list(path.iterdir())
    foreign = [p.name for p in entries
               if not (p.name in RUN_FILES or (p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()))]
    if entries and not foreign:
        try:
            marked = isinstance(read_json(path / "config.json").get(MARK), str)
        except (OSError, ValueError, AttributeError):  # missing, unreadable, or not a JSON object
            marked = False
        foreign += [] if marked else ["config.json without adl's marker" if (path / "config.json").exists()
                                      else "no config.json of adl's"]
    return foreign


def prepare_out(out: str, overwrite: bool, kind: str) -> Path:
    """The partial folder a new run of ``kind`` is written into (``<out>.partial``, fresh and
    marked at once); refuse an ``out`` that exists unless ``overwrite``, and any folder adl did
    not write (``not_adl_written``)."""
    path = local_folder(out)
    refuse_unsafe_out(path, "runs/NAME")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise AdlError(f"run folder {path} already exists; pass --overwrite to replace it or choose another --out")
        foreign = not_adl_written(path)
        if foreign:
            raise AdlError(f"--out {path} holds files adl did not write ({', '.join(foreign[:3])}); adl replaces "
                           "only its own run folders: choose another --out")
    for aside in (path.with_name(path.name + ".partial"), path.with_name(path.name + ".replaced")):
        if aside.is_symlink() or (aside.exists() and not (aside.is_dir() and not not_adl_written(aside))):
            raise AdlError(f"{aside} exists and is not an unfinished adl run; move it away or choose another --out")
        if aside.exists():
            shutil.rmtree(aside)
    partial = path.with_name(path.name + ".partial")
    partial.mkdir(parents=True)
    write_config(partial, kind)
    return partial


def publish(partial: Path, out: Path) -> None:
    """Swap the finished run in: the old run (adl-written, checked by prepare_out) goes whole
    (through ``<out>.replaced``, which prepare_out cleared)."""
    old = out.with_name(out.name + ".replaced")
    if out.is_dir():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(partial, out)
    if old.exists():
        shutil.rmtree(old)


def write_history(path: Path, history: list[dict]) -> None:
    if history:
        write_csv(path, history)


def save_head(out: Path, head: nn.Module, info: dict) -> None:
    """head.safetensors (written aside, then renamed) + head.json (spec and what the tensors mean)."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tmp = out / ".head.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "head.safetensors")
    write_json(out / "head.json", {**info, "spec": head_spec(head), "adl_version": __version__})


def load_head(run_dir) -> tuple[nn.Module, dict]:
    """Rebuild a trained head from a run folder alone: (head in eval mode, head.json contents)."""
    run_dir = Path(run_dir)
    if not (run_dir / "head.json").is_file() or not (run_dir / "head.safetensors").is_file():
        raise AdlError(f"{run_dir} holds no trained head (head.json + head.safetensors); train one with `adl train`")
    info = read_json(run_dir / "head.json")
    head = build_from_spec(info["spec"])
    head.load_state_dict(load_file(str(run_dir / "head.safetensors")))
    return head.eval(), info


# ---- reading a run for the live path ----------------------------------------------------


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
