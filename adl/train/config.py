"""TrainConfig: every knob of `adl train` / `adl baselines`, validated, with task presets.

Hyperparameters left ``None`` are filled by ``resolve(cfg, cache)`` from the thesis' published
values (RoBERTa-large thesis table), chosen by what the cache holds:

    preset  chosen when                 k   alpha lam   cutoff drop heads pos lr   wd   lr_pat pat epochs batch
    imdb    sequence task (default)     64  70    0     0.005  0.3  16    no  1e-4 1e-3 5      10  50     32
    cola    sequence, dataset "cola"    64  64    0     0.01   0.3  8     yes 1e-4 0    25     35  100    32
    conll   token task                  128 128   1e-3  0.01   0.2  8     yes 1e-4 1e-3 16     24  100    32

(layers_enc 1 and ff 2048 everywhere.) The thesis gives neither batch size, epoch budget nor
early-stopping patience; ours are: batch 32; patience = lr_patience + 5 (IMDB) or + ~50 %
(CoLA, CoNLL) so the learning rate is halved at least once before early stopping can fire;
max_epochs a ceiling that early stopping normally undercuts. The dropout is 0.3, not the
thesis table's 0.03 (see docs/method.md).

The dataclass is frozen and every field has a default, so a sweep point is
``dataclasses.replace(base, **point)`` and is validated again on construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from adl.devices import HELP as DEVICE_HELP
from adl.checks import INT_GE0, INT_GE1, NON_NEGATIVE, Num, check, choice, flag_of
from adl.devices import check_device, parse_device
from adl.errors import AdlError

TRAIN_HEADS = ("adalayers", "adalayers-pooled", "single-layer", "last-layer", "linear-probe", "concat-probe", "scalar-mix",
               "head2toe")
_LAYER_HEADS = ("single-layer", "linear-probe")  # heads that need --layer

PRESETS: dict[str, dict] = {
    "imdb": dict(k=64, alpha=70.0, lam=0.0, cutoff=0.005, dropout=0.3, heads=16, pos_emb=False, layers_enc=1,
                 ff=2048, lr=1e-4, weight_decay=1e-3, lr_patience=5, patience=10, max_epochs=50, batch_size=32),
    "cola": dict(k=64, alpha=64.0, lam=0.0, cutoff=0.01, dropout=0.3, heads=8, pos_emb=True, layers_enc=1,
                 ff=2048, lr=1e-4, weight_decay=0.0, lr_patience=25, patience=35, max_epochs=100, batch_size=32),
    "conll": dict(k=128, alpha=128.0, lam=1e-3, cutoff=0.01, dropout=0.2, heads=8, pos_emb=True, layers_enc=1,
                  ff=2048, lr=1e-4, weight_decay=1e-3, lr_patience=16, patience=24, max_epochs=100, batch_size=32),
}
PRESET_FIELDS = tuple(PRESETS["imdb"])


def _opt(help_: str, default=None):
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True)
class TrainConfig:
    cache: str = _opt("cache folder written by `adl extract`", "")
    out: str | None = _opt("run folder (default runs/<cache>-<head>-<YYYYmmdd-HHMMSS>)")
    head: str | None = _opt(f"one of {', '.join(TRAIN_HEADS)}; None = adalayers on a tokens view, "
                            "else adalayers-pooled")
    preset: str | None = _opt("imdb | cola | conll; None = chosen from the cache's task and dataset")
    # the method (docs/method.md)
    alpha: float | None = _opt("softmax sharpness: w = softmax(alpha * p)")
    lam: float | None = _opt("entropy coefficient lambda (flag --lambda); entropy summed over layers")
    k: int | None = _opt("projection width of each layer")
    cutoff: float | None = _opt("layer weights <= cutoff are set to 0 and the rest renormalised")
    dropout: float | None = _opt("dropout in the head")
    heads: int | None = _opt("attention heads (k must be a multiple)")
    pos_emb: bool | None = _opt("add sinusoidal positional embeddings after the mix")
    layers_enc: int | None = _opt("encoder layers of the token-task head")
    ff: int | None = _opt("feed-forward width of the token-task encoder")
    norm_affine: bool = _opt("affine gamma/beta in the per-layer norm (the reference has none)", False)
    post_gelu: bool = _opt("the reference code's extra GELU after the mix (not in the thesis formula)", False)
    hidden: int = _opt("MLP width of adalayers-pooled", 256)
    layer: int | None = _opt("the layer of single-layer / linear-probe (index into the cache's layers)")
    # optimisation
    lr: float | None = _opt("AdamW learning rate")
    weight_decay: float | None = _opt("AdamW weight decay (never on the layer logits p)")
    batch_size: int | None = _opt("examples per step")
    max_epochs: int | None = _opt("epoch ceiling")
    patience: int | None = _opt("early stopping: epochs without a better validation metric")
    lr_patience: int | None = _opt("epochs without improvement before the LR is halved")
    seed: int = _opt("seeds the head's initialisation, dropout, the batch order and the --train-limit sample", 0)
    # head2toe baseline
    lasso: float = _opt("head2toe group-lasso coefficient", 1e-2)
    keep: float = _opt("head2toe: fraction of layers (groups) kept by weight norm", 0.25)
    # data and machine
    train_limit: int | None = _opt("train on a seeded sample of N training examples (validation and test stay "
                                   "whole); None = all")
    pool: str | None = _opt("pooled view for pooled heads (None = mean if present)")
    memory_gb: float = _opt("RAM budget for the tokens view: loaded whole below it, streamed above", 8.0)
    device: str = _opt(DEVICE_HELP, "auto")
    overwrite: bool = _opt("write into an existing run folder", False)

    def __post_init__(self):
        _check(self)


def _check(c: TrainConfig) -> None:
    """One clear line per out-of-range value (run on construction and on every replace)."""
    if not c.cache:
        raise AdlError("no cache given: pass --cache DIR (a folder written by `adl extract`)")
    choice("--head", c.head, TRAIN_HEADS)
    choice("--preset", c.preset, PRESETS)
    check(c, RULES, flag)
    check_device(c.device)
    if c.layer is not None and c.head is not None and c.head not in _LAYER_HEADS:
        raise AdlError(f"--layer applies to --head single-layer or linear-probe, not {c.head}; drop --layer")


RULES = {**dict.fromkeys(("k", "heads", "layers_enc", "ff", "batch_size", "max_epochs", "patience", "hidden",
                          "train_limit"), INT_GE1),
         "lr_patience": INT_GE0, "seed": INT_GE0, "layer": Num(integer=True),
         "alpha": Num(0, low_open=True, example="70"), "lam": NON_NEGATIVE,
         "cutoff": Num(0, 1, high_open=True, example="0.005"), "dropout": Num(0, 1, high_open=True),
         "lr": Num(0, low_open=True, example="1e-4"), "weight_decay": NON_NEGATIVE, "lasso": NON_NEGATIVE,
         "keep": Num(0, 1, low_open=True), "memory_gb": Num(0, low_open=True, example="8 (GB)")}


def flag(name: str) -> str:
    return "--lambda" if name == "lam" else flag_of(name)


# ---- resolution against a cache -----------------------------------------------------------

def preset_for(cache) -> str:
    """token task -> conll; sequence task on dataset "cola" -> cola; other sequence tasks -> imdb."""
    if cache.task == "token":
        return "conll"
    name = str((cache.manifest.get("dataset") or {}).get("name", "")).lower()
    return "cola" if name in ("cola", "glue:cola", "nyu-mll/glue:cola") else "imdb"


def pooled_view(cache, pool: str | None) -> str | None:
    """The pooled view a pooled head reads: ``pooled:<pool>``, else mean, else the first; None if none."""
    pooled = [v for v in cache.views if v.startswith("pooled:")]
    if pool is not None:
        if f"pooled:{pool}" not in pooled:
            raise AdlError(f"{cache.root} has no 'pooled:{pool}' view (it has {', '.join(cache.views)}): "
                           f"re-extract with `adl extract ... --views pooled --pool {pool}` or drop --pool")
        return f"pooled:{pool}"
    return "pooled:mean" if "pooled:mean" in pooled else (pooled[0] if pooled else None)


def view_for(head: str, cache, pool: str | None = None) -> str:
    """The cache view head ``head`` trains on, or an AdlError naming the extract flag that makes it.

    Token tasks read ``tokens`` for every head. Sequence tasks: adalayers needs ``tokens``;
    single-layer prefers ``tokens`` (same head as adalayers, one-hot mix) and falls back to a
    pooled view; the other heads read a pooled view when there is one (cheaper), else ``tokens``
    (they mean-pool it over real tokens).
    """
    has_tokens, pooled = "tokens" in cache.views, pooled_view(cache, pool)
    if cache.task == "token":
        if head == "adalayers-pooled":
            raise AdlError("adalayers-pooled is a sequence-task head and this cache is a token task (NER); "
                           "use --head adalayers")
        if not has_tokens:
            raise AdlError(f"{cache.root} has no 'tokens' view, which token tasks need: re-extract with "
                           "`adl extract ... --views tokens`")
        return "tokens"
    if head == "adalayers" and not has_tokens:
        raise AdlError(f"{cache.root} has no 'tokens' view, which head adalayers needs: re-extract with "
                       "`adl extract ... --views tokens`, or use --head adalayers-pooled")
    if head in ("adalayers", "single-layer") and has_tokens:
        return "tokens"
    if pooled is None and not has_tokens:
        raise AdlError(f"{cache.root} has neither a tokens nor a pooled view: re-extract with "
                       "`adl extract ... --views pooled`")
    return pooled or "tokens"


def auto_head(cache) -> str:
    """adalayers on a tokens view (always for token tasks), adalayers-pooled on a pooled-only cache."""
    return "adalayers" if "tokens" in cache.views or cache.task == "token" else "adalayers-pooled"


def resolve(cfg: TrainConfig, cache, *, kind: str | None = None) -> TrainConfig:
    """Fill every None from the cache: preset hyperparameters, head, device and run folder.

    ``kind`` names the run folder (default: the head); ``adl baselines`` passes "baselines".
    Raises AdlError when the head does not fit the cache (view, task, layer index).
    """
    preset = cfg.preset or preset_for(cache)
    filled = {k: v for k, v in PRESETS[preset].items() if getattr(cfg, k) is None}
    head = cfg.head or auto_head(cache)
    view_for(head, cache, cfg.pool)  # refuses a head that cannot run on this cache
    n_layers = len(cache.layers)
    if head in _LAYER_HEADS:
        if cfg.layer is None:
            raise AdlError(f"--head {head} needs --layer i (an index in 0..{n_layers - 1} of the cache's layers)")
        if not -n_layers <= cfg.layer < n_layers:
            raise AdlError(f"--layer {cfg.layer} is out of range: the cache has {n_layers} layers (0..{n_layers - 1})")
    elif cfg.layer is not None and kind is None:
        raise AdlError(f"--layer applies to --head single-layer or linear-probe, not {head}; drop --layer")
    out = cfg.out or str(Path("runs") / f"{cache.root.name}-{kind or head}-{datetime.now():%Y%m%d-%H%M%S}")
    return dataclasses.replace(cfg, **filled, preset=preset, head=head, out=out, device=parse_device(cfg.device))
