"""The `adl` command line: thin typer commands mapping flags onto a frozen config, then run_*(cfg).

Defaults live in the config dataclasses, not here. Every user mistake is an AdlError, printed
as one line on stderr with exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from adl.cache.location import mask, user_error
from adl.devices import HELP as DEVICE_HELP
from adl.errors import AdlError
# Only the light config modules load here (the sweep flags are generated from their fields); each
# command imports its own machinery (torch, FastAPI, Optuna, matplotlib, PEFT) when it runs, so
# `adl --help` and `adl info` start without them.
from adl.sweep.config import NOT_SWEPT, SWEEPABLE, SweepConfig, field_type, parse_space
from adl.train.config import TrainConfig

app = typer.Typer(
    help="Side tasks on a frozen transformer: cache hidden states once, train layer-mixing heads from the cache.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
err = Console(stderr=True)


def user_errors(fn):
    """Turn AdlError into one red line + exit 2, and Ctrl-C into a resume hint + exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdlError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished work is saved; rerun the same command to resume")
            raise typer.Exit(130) from None
        except Exception as e:  # an object store the user must fix (credentials, bucket, endpoint)
            if (storage := user_error(e)) is None:
                raise
            err.print(f"[bold red]error:[/] {escape(str(storage))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def split_list(value: str | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c']; None stays None."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


# ---- stage one: extract, info --------------------------------------------------------
# Flags map 1:1 onto ExtractConfig fields; every option defaults to None (booleans to False)
# and only given flags are passed, so the config holds the defaults.

_O = typer.Option


@app.command()
@user_errors
def extract(
    model: Annotated[str, _O("--model", help="hub id, local folder, or alias roberta-large | bart-large | minilm")],
    dataset: Annotated[str, _O("--dataset", help="imdb | cola | sst2 | rotten_tomatoes | conll2003 | wnut16 | tweets, a hub id "
                               "owner/name[:config], or csv:|jsonl:|parquet:|conll:PATH")],
    out: Annotated[Optional[str], _O("--out", help="cache folder or URL (s3://bucket/prefix, gs://..., any fsspec "
                                                    "URL; default cache/<dataset name>)")] = None,
    views: Annotated[Optional[str], _O("--views", help="pooled,tokens (default: pooled, plus tokens when they fit comfortably "
                                       "on disk; NER always gets tokens)")] = None,
    pool: Annotated[Optional[str], _O("--pool", help="mean,cls,last,max (default mean; last for decoder states)")] = None,
    layers: Annotated[Optional[str], _O("--layers", help="hidden states to keep: 0,3,6 or -4: or ::2 (default all L)")] = None,
    project: Annotated[Optional[int], _O("--project", help="store token states projected to D dims")] = None,
    project_method: Annotated[Optional[str], _O("--project-method", help="pca (fitted on train tokens) | random")] = None,
    project_sample_tokens: Annotated[Optional[int], _O("--project-sample-tokens", help="train tokens the PCA sees")] = None,
    dtype: Annotated[Optional[str], _O("--dtype", help="float16 (default) | float32")] = None,
    format: Annotated[Optional[str], _O("--format", help="zarr (default) | hdf5")] = None,
    batch_size: Annotated[Optional[int], _O("--batch-size", help="examples per forward pass, at most (default 32)")] = None,
    batch_tokens: Annotated[Optional[int], _O("--batch-tokens", help="cap on rows x longest row per batch, so long inputs run in smaller "
                                              "batches (default batch size x 128)")] = None,
    max_length: Annotated[Optional[int], _O("--max-length", help="tokens per example (default: the model's limit)")] = None,
    device: Annotated[Optional[str], _O("--device", help=DEVICE_HELP)] = None,
    limit: Annotated[Optional[int], _O("--limit", help="at most N examples per split, for quick tries")] = None,
    seed: Annotated[Optional[int], _O("--seed", help="seed of carving, limit sampling and projection (default 42)")] = None,
    text_column: Annotated[Optional[str], _O("--text-column", help="text column (tokens column for NER)")] = None,
    label_column: Annotated[Optional[str], _O("--label-column", help="label column (tags column for NER)")] = None,
    decoder: Annotated[bool, _O("--decoder", help="encoder-decoder models: store decoder states")] = False,
    trust_remote_code: Annotated[bool, _O("--trust-remote-code", help="allow the model's own code to run")] = False,
    num_shards: Annotated[Optional[int], _O("--num-shards", help="split the work among N processes (default $WORLD_SIZE or 1)")] = None,
    shard_index: Annotated[Optional[int], _O("--shard-index", help="this process's part (default $RANK or 0)")] = None,
    overwrite: Annotated[bool, _O("--overwrite", help="replace a cache made with another configuration")] = False,
) -> None:
    """Run a frozen transformer once over a dataset and cache its per-layer hidden states."""
    given = {k: v for k, v in locals().items() if v is not None and v is not False}
    from adl.extract.config import ExtractConfig
    from adl.extract.run import run_extract

    run_extract(ExtractConfig(**given))


@app.command()
@user_errors
def info(
    path: Annotated[str, typer.Argument(help="cache folder or URL (s3://bucket/prefix, gs://..., any fsspec URL)")],
    json_: Annotated[bool, _O("--json", help="print the manifest as JSON")] = False,
    check: Annotated[bool, _O("--check", help="recompute every checksum and name what is damaged (exit 2)")] = False,
) -> None:
    """Summarise a cache (model, task, splits, views, shapes, sizes) from its records, reading no data.

    --check reads every chunk and verifies its checksum.
    """
    if check:
        from adl.cache import verify_cache

        problems = verify_cache(path)
        if problems:
            err.print(f"[bold red]error:[/] {escape(mask(path))} is damaged ({len(problems)} problem(s)); re-extract it "
                      "(`adl extract ... --overwrite`)", highlight=False, soft_wrap=True)
            for problem in problems:
                err.print(f"  {escape(problem)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        Console().print(f"{escape(mask(path))} verified: the checksums of every shard match", highlight=False)
        return
    from adl.cache.summary import finished, summary

    if json_:
        typer.echo(json.dumps(finished(path)[1], indent=2, sort_keys=True))
    else:
        Console().print(summary(path))


# ---- stage two: train, baselines ----------------------------------------------------
# Flags map 1:1 onto TrainConfig fields (--lambda -> lam); every option defaults to None so
# the config (and its task presets) holds the defaults.
CacheOpt = Annotated[str, _O("--cache", help="cache folder or URL written by `adl extract`")]
HeadOpt = Annotated[Optional[str], _O("--head", help="adalayers | adalayers-pooled | single-layer | last-layer | "
                                      "linear-probe | scalar-mix | head2toe (default: from the cache's views)")]
PresetOpt = Annotated[Optional[str], _O("--preset", help="imdb | cola | conll defaults (default: from the cache)")]
AlphaOpt = Annotated[Optional[float], _O("--alpha", help="softmax sharpness: w = softmax(alpha * p)")]
LamOpt = Annotated[Optional[float], _O("--lambda", help="entropy regularisation coefficient")]
KOpt = Annotated[Optional[int], _O("--k", help="projection width per layer")]
CutoffOpt = Annotated[Optional[float], _O("--cutoff", help="layer weights <= cutoff are dropped")]
DropoutOpt = Annotated[Optional[float], _O("--dropout", help="dropout in the head")]
HeadsOpt = Annotated[Optional[int], _O("--heads", help="attention heads (divide k)")]
PosEmbOpt = Annotated[Optional[bool], _O("--pos-emb/--no-pos-emb", help="positional embeddings after the mix")]
LayersEncOpt = Annotated[Optional[int], _O("--layers-enc", help="encoder layers of the token-task head")]
FfOpt = Annotated[Optional[int], _O("--ff", help="feed-forward width of the token-task encoder")]
NormAffineOpt = Annotated[Optional[bool], _O("--norm-affine/--no-norm-affine", help="affine per-layer norm")]
PostGeluOpt = Annotated[Optional[bool], _O("--post-gelu/--no-post-gelu", help="reference code's GELU after the mix")]
HiddenOpt = Annotated[Optional[int], _O("--hidden", help="MLP width of adalayers-pooled")]
LayerOpt = Annotated[Optional[int], _O("--layer", help="layer index for single-layer / linear-probe")]
LrOpt = Annotated[Optional[float], _O("--lr", help="learning rate")]
WdOpt = Annotated[Optional[float], _O("--weight-decay", help="AdamW weight decay (not on the layer logits)")]
BatchOpt = Annotated[Optional[int], _O("--batch-size", help="examples per step")]
EpochsOpt = Annotated[Optional[int], _O("--max-epochs", help="epoch ceiling")]
PatienceOpt = Annotated[Optional[int], _O("--patience", help="early-stopping patience (epochs)")]
LrPatienceOpt = Annotated[Optional[int], _O("--lr-patience", help="epochs before the LR is halved")]
SeedOpt = Annotated[Optional[int], _O("--seed", help="seed (init, dropout, batch order, --train-limit sample)")]
LassoOpt = Annotated[Optional[float], _O("--lasso", help="head2toe group-lasso coefficient")]
KeepOpt = Annotated[Optional[float], _O("--keep", help="head2toe: fraction of layers kept")]
PoolOpt = Annotated[Optional[str], _O("--pool", help="pooled view for pooled heads (default mean)")]
TrainLimitOpt = Annotated[Optional[int], _O("--train-limit", help="train on a seeded sample of N training examples "
                                            "(learning curves); validation and test stay whole")]
MemoryOpt = Annotated[Optional[float], _O("--memory-gb", help="RAM budget for the tokens view before streaming")]
DeviceOpt = Annotated[Optional[str], _O("--device", help=DEVICE_HELP)]
OutOpt = Annotated[Optional[str], _O("--out", help="run folder (default runs/<cache>-<head>-<time>)")]
OverwriteOpt = Annotated[Optional[bool], _O("--overwrite", help="write into an existing run folder")]


def _train_config(opts: dict) -> TrainConfig:
    return TrainConfig(**{name: value for name, value in opts.items() if value is not None})


@app.command()
@user_errors
def train(cache: CacheOpt, head: HeadOpt = None, preset: PresetOpt = None, alpha: AlphaOpt = None,
          lam: LamOpt = None, k: KOpt = None, cutoff: CutoffOpt = None, dropout: DropoutOpt = None,
          heads: HeadsOpt = None, pos_emb: PosEmbOpt = None, layers_enc: LayersEncOpt = None, ff: FfOpt = None,
          norm_affine: NormAffineOpt = None, post_gelu: PostGeluOpt = None, hidden: HiddenOpt = None,
          layer: LayerOpt = None, lr: LrOpt = None, weight_decay: WdOpt = None, batch_size: BatchOpt = None,
          max_epochs: EpochsOpt = None, patience: PatienceOpt = None, lr_patience: LrPatienceOpt = None,
          seed: SeedOpt = None, train_limit: TrainLimitOpt = None, pool: PoolOpt = None,
          memory_gb: MemoryOpt = None, device: DeviceOpt = None, out: OutOpt = None,
          overwrite: OverwriteOpt = None) -> None:
    """Train a layer-mixing head from a cache; writes config, metrics, history, head and plots."""
    cfg = _train_config(dict(locals()))
    from adl.train.run import run_train

    run_train(cfg)


@app.command()
@user_errors
def baselines(cache: CacheOpt, preset: PresetOpt = None, alpha: AlphaOpt = None, lam: LamOpt = None,
              k: KOpt = None, cutoff: CutoffOpt = None, dropout: DropoutOpt = None, heads: HeadsOpt = None,
              pos_emb: PosEmbOpt = None, layers_enc: LayersEncOpt = None, ff: FfOpt = None,
              norm_affine: NormAffineOpt = None, post_gelu: PostGeluOpt = None, hidden: HiddenOpt = None,
              lr: LrOpt = None, weight_decay: WdOpt = None, batch_size: BatchOpt = None,
              max_epochs: EpochsOpt = None, patience: PatienceOpt = None, lr_patience: LrPatienceOpt = None,
              seed: SeedOpt = None, lasso: LassoOpt = None, keep: KeepOpt = None,
              train_limit: TrainLimitOpt = None, pool: PoolOpt = None, memory_gb: MemoryOpt = None,
              device: DeviceOpt = None, out: OutOpt = None, overwrite: OverwriteOpt = None) -> None:
    """Every single layer, last-layer probe, scalar mix, head2toe, hsv and adalayers, same budget."""
    cfg = _train_config(dict(locals()))
    from adl.train.baselines import run_baselines

    run_baselines(cfg)


# ---- sweeps --------------------------------------------------------------------------
# Every TrainConfig hyperparameter is a flag taking a list ("16,64,128"), a range for
# --search tpe ("8:256:log") or one value (fixed); the flags are generated from the
# dataclass fields, so a new TrainConfig field is sweepable without touching this file.


def _sweep_flag(name: str) -> str:
    return "--lambda" if name == "lam" else "--" + name.replace("_", "-")


def _sweep_params() -> list[inspect.Parameter]:
    def opt(name, kind, flag, help_, default=None):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=Annotated[kind, typer.Option(flag, help=help_)])

    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(SweepConfig)}
    params = [opt("cache", Optional[str], "--cache", "cache folder or URL written by `adl extract`"),
              opt("report", Optional[str], "--report", "redraw the table and plots of sweep folder DIR and exit"),
              opt("search", Optional[str], "--search", helps["search"]),
              opt("trials", Optional[int], "--trials", helps["trials"]),
              opt("seeds", Optional[int], "--seeds", helps["seeds"]),
              opt("out", Optional[str], "--out", helps["out"]),
              opt("storage", Optional[str], "--storage", "Optuna storage URL: sqlite:///F, journal:PATH, "
                  "postgresql://... (default $ADL_STORAGE, else sqlite in --out; a URL with a password "
                  "belongs in $ADL_STORAGE, out of ps and shell history)"),
              opt("study", Optional[str], "--study", helps["study"]),
              opt("group_size", Optional[int], "--group-size", helps["group_size"]),
              opt("checkpoint_every_s", Optional[float], "--checkpoint-every-s", helps["checkpoint_every_s"]),
              opt("checkpoints", Optional[str], "--checkpoints", helps["checkpoints"]),
              opt("vectorise", Optional[bool], "--vectorise/--no-vectorise", helps["vectorise"]),
              opt("baselines", Optional[str], "--baselines", helps["baselines"]),
              opt("top", Optional[int], "--top", helps["top"]),
              opt("device", Optional[str], "--device", DEVICE_HELP),
              opt("memory_gb", Optional[float], "--memory-gb", "RAM budget for the tokens view before streaming")]
    for f in dataclasses.fields(TrainConfig):
        if f.name not in NOT_SWEPT:
            how = " [list a,b,c or range lo:hi[:log]]" if field_type(f.name) in (int, float) else " [list a,b]"
            params.append(opt(f.name, Optional[str], _sweep_flag(f.name), f.metadata.get("help", "") + how))
    return params


def _sweep(**opts) -> None:
    """Sweep hyperparameters over a cache (grid or Optuna TPE), resumable, several workers per study.

    Example: adl sweep --cache cache/tweets --alpha 16,64,128 --lambda 0,1e-3 --k 32,64 --cutoff 0,0.01
    """
    opts["storage"] = opts["storage"] or os.environ.get("ADL_STORAGE") or None
    if opts["report"] is not None:
        from adl.sweep.report import report_sweep

        report_sweep(opts["report"], storage=opts["storage"])
        return
    if opts["cache"] is None:
        raise AdlError("no cache given: pass --cache DIR (or --report DIR to redraw a finished sweep)")
    machine = {k: opts[k] for k in ("cache", "device", "memory_gb") if opts[k] is not None}
    space = parse_space({name: opts[name] for name in SWEEPABLE})
    sweep = {k: opts[k] for k in ("search", "trials", "seeds", "out", "storage", "study", "group_size",
                                  "checkpoint_every_s", "checkpoints", "vectorise", "baselines", "top") if opts[k] is not None}
    cfg = SweepConfig(base=TrainConfig(**machine), space=space, **sweep)
    if "train_limit" in cfg.dims:  # the workers load each view once, so every point gets the same sample
        raise AdlError("--train-limit takes one value in a sweep; run one sweep per training size")
    from adl.sweep.worker import run_sweep

    run_sweep(cfg)


_sweep.__signature__ = inspect.Signature(_sweep_params())
app.command("sweep")(user_errors(_sweep))


# ---- the heads on the backbone: predict -----------------------------------------------


@app.command()
@user_errors
def predict(
    run: Annotated[list[str], _O("--run", help="run folder written by `adl train` (repeat for several heads)")],
    text: Annotated[Optional[list[str]], _O("--text", help="a text to predict (repeatable)")] = None,
    file: Annotated[Optional[str], _O("--file", help=".txt (one text per line), .csv, .jsonl or .parquet")] = None,
    text_column: Annotated[Optional[str], _O("--text-column", help="text column of --file (default: detected)")] = None,
    label_column: Annotated[Optional[str], _O("--label-column", help="labels of --file, scored per head (default: a 'label' column)")] = None,
    split: Annotated[Optional[str], _O("--split", help="a split of the run's data set (or of --dataset)")] = None,
    dataset: Annotated[Optional[str], _O("--dataset", help="data set spec for --split (default: the run's)")] = None,
    out: Annotated[Optional[str], _O("--out", help="write the predictions as JSONL to this file; - for stdout (default: a table of few inputs, no file)")] = None,
    batch_size: Annotated[Optional[int], _O("--batch-size", help="examples per forward pass (default: the extraction's)")] = None,
    device: Annotated[Optional[str], _O("--device", help=DEVICE_HELP)] = None,
) -> None:
    """Apply trained heads to texts, a file or a split, in one forward pass of their backbone."""
    given = {k: v for k, v in dict(runs=run, texts=text, file=file, text_column=text_column,
                                   label_column=label_column, split=split,
                                   dataset=dataset, out=out, batch_size=batch_size, device=device).items()
             if v is not None}
    from adl.serve.predict_cmd import PredictConfig, run_predict

    run_predict(PredictConfig(**given))


# ---- serving ------------------------------------------------------------------------
# Flags map 1:1 onto ServeConfig fields (--run, repeated, -> runs); the config holds the defaults.


@app.command()
@user_errors
def serve(
    run: Annotated[list[str], _O("--run", help="run folder written by `adl train`; repeat for more heads (each head "
                                  "is named after its folder)")],
    host: Annotated[Optional[str], _O("--host", help="address to bind (default 127.0.0.1: this machine only)")] = None,
    port: Annotated[Optional[int], _O("--port", help="TCP port (default 8000)")] = None,
    max_batch_size: Annotated[Optional[int], _O("--max-batch-size", help="texts per backbone call, at most "
                                                "(default 64)")] = None,
    max_wait_ms: Annotated[Optional[float], _O("--max-wait-ms", help="how long a batch waits for more requests "
                                               "when the server is busy (default 10)")] = None,
    device: Annotated[Optional[str], _O("--device", help=DEVICE_HELP)] = None,
    max_body_kb: Annotated[Optional[int], _O("--max-body-kb", help="request body limit in KiB (default 1024)")] = None,
    max_texts: Annotated[Optional[int], _O("--max-texts", help="texts per request, at most (default 64)")] = None,
    max_chars: Annotated[Optional[int], _O("--max-chars", help="characters per text, at most (default 10000)")] = None,
    max_concurrent_requests: Annotated[Optional[int], _O("--max-concurrent-requests", help="requests in flight, at "
                                                         "most; above it 429 with Retry-After (default 512)")] = None,
    max_batch_tokens: Annotated[Optional[int], _O("--max-batch-tokens", help="padded tokens per backbone batch "
                                                  "(default 512 on a CPU, the extraction's budget on a GPU)")] = None,
    request_timeout_s: Annotated[Optional[float], _O("--request-timeout-s", help="seconds a request may wait to "
                                                     "start, then 503 (default 30)")] = None,
    graceful_timeout_s: Annotated[Optional[float], _O("--graceful-timeout-s", help="seconds SIGTERM lets requests "
                                                      "in flight finish (default 20)")] = None,
    runs_dir: Annotated[Optional[str], _O("--runs-dir", help="folder heads may be loaded from while running "
                                          "(POST /v1/heads {\"name\": FOLDER}); off by default")] = None,
) -> None:
    """Serve the backbone and the heads of one or more runs over HTTP: JSON API, /metrics, a page at /.

    Set $ADL_SERVE_TOKEN to require 'Authorization: Bearer <token>'. SIGTERM drains for at most
    --graceful-timeout-s and exits 0. /healthz is liveness, /readyz readiness, /info the limits.
    """
    given = {k: v for k, v in locals().items() if v is not None and k != "run"}
    from adl.serve.server import ServeConfig, run_serve

    run_serve(ServeConfig(runs=tuple(run), **given))


# ---- peers: finetune, compare ----------------------------------------------------------
# Flags map 1:1 onto FinetuneConfig fields; unset options come from the method's published defaults.


@app.command()
@user_errors
def finetune(
    cache: Annotated[str, _O("--cache", help="cache folder or URL: fixes the backbone, data set, splits, max_length, task")],
    method: Annotated[str, _O("--method", help="full | bitfit | lora | prompt | ptuning-bias | setfit")],
    out: Annotated[Optional[str], _O("--out", help="run folder (default runs/<cache>-<method>-<time>)")] = None,
    lr: Annotated[Optional[float], _O("--lr", help="learning rate (default: the method's published one)")] = None,
    weight_decay: Annotated[Optional[float], _O("--weight-decay", help="AdamW weight decay")] = None,
    batch_size: Annotated[Optional[int], _O("--batch-size", help="examples per step (default 32; setfit 16)")] = None,
    max_epochs: Annotated[Optional[int], _O("--max-epochs", help="epochs at most (setfit: its epochs)")] = None,
    patience: Annotated[Optional[int], _O("--patience", help="epochs without a better validation score before "
                                          "stopping")] = None,
    max_steps: Annotated[Optional[int], _O("--max-steps", help="optimiser steps per epoch at most (setfit: in "
                                           "total)")] = None,
    seed: Annotated[Optional[int], _O("--seed", help="seed of the head, shuffling, dropout and the --train-limit "
                                      "sample (default 0)")] = None,
    train_limit: TrainLimitOpt = None,
    dropout: Annotated[Optional[float], _O("--dropout", help="dropout before the task head (default 0.1)")] = None,
    lora_r: Annotated[Optional[int], _O("--lora-r", help="lora: rank (default 8)")] = None,
    lora_alpha: Annotated[Optional[float], _O("--lora-alpha", help="lora: scaling alpha (default 8)")] = None,
    lora_dropout: Annotated[Optional[float], _O("--lora-dropout", help="lora: dropout (default 0.1)")] = None,
    virtual_tokens: Annotated[Optional[int], _O("--virtual-tokens", help="prompt, ptuning-bias: prompt tokens "
                                                "(default 20)")] = None,
    encoder_hidden: Annotated[Optional[int], _O("--encoder-hidden", help="ptuning-bias: prompt encoder width "
                                                "(default 128)")] = None,
    setfit_iterations: Annotated[Optional[int], _O("--setfit-iterations", help="setfit: pairs per example "
                                                   "(default 20)")] = None,
    device: Annotated[Optional[str], _O("--device", help=DEVICE_HELP)] = None,
    overwrite: Annotated[bool, _O("--overwrite", help="replace an existing run folder")] = False,
) -> None:
    """Train a peer (full fine-tuning, BitFit, LoRA, prompt tuning, P-tuning + bias, SetFit) on a cache's examples."""
    given = {k: v for k, v in locals().items() if v is not None and v is not False}
    from adl.peers.config import FinetuneConfig
    from adl.peers.run import run_finetune

    run_finetune(FinetuneConfig(**given))


@app.command()
@user_errors
def compare(
    paths: Annotated[list[str], typer.Argument(help="run folders (adl train, adl finetune) and sweep folders")],
    out: Annotated[Optional[str], _O("--out", help="folder for compare.md/.csv and the plots (default compare)")] = None,
) -> None:
    """Compare adl runs, adl sweeps and peer runs on one data set: table, quality vs parameters and vs time."""
    from adl.peers.compare import CompareConfig, run_compare

    run_compare(CompareConfig(paths=tuple(paths), **({"out": out} if out else {})))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
