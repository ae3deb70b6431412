"""``run_extract(cfg)``: stage one as a linear recipe, top to bottom.

    data -> folder check (resume / complete / refuse) -> tokenise once -> size estimates ->
    model -> projection (if any) -> batches of this shard -> forward loop -> manifest

Peak memory is bounded by the batch, not the data set. A batch holds B rows padded to T
tokens with B*T <= the token budget (--batch-tokens, default batch_size*128; a single
longer row runs alone). With L hidden states of width H, L' stored layers, token width D,
P pools and s storage bytes:

    device ~ weights + one forward's activations + L*B*T*H*4 (the states; 2 bytes under
             autocast) + B*T*L'*(H + D)*4 (gathered tokens, outputs)
    host   ~ QUEUED_BATCHES + 1 = 3 batches of outputs: 3*(B*T*L'*D + P*B*L'*H)*s
             + the token ids and labels of the data set (4 bytes a token, 16 for NER)
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.markup import escape
from rich.text import Text

from adl.cache import BackgroundWriter, ShardWriter, read_manifest
from adl.cache.durable import disk_full_error, is_disk_full
from adl.cache.projection import FILE as PROJECTION_FILE
from adl.cache.projection import Projection
from adl.cache.location import Location
from adl.cache.manifest import ITEMSIZE
from adl.cache.shards import hdf5_on_url
from adl.cache.writer import publish
from adl.cache.summary import human
from adl.errors import AdlError
from adl.extract import models, plan, projection, tokenize
from adl.extract.config import ExtractConfig, layer_indices
from adl.extract.datasets import check_classes, load_dataset
from adl.extract.loop import Outputs, run_split, to_device

QUEUED_BATCHES = 2  # batches waiting for the writer: double buffering, bounded host memory


def shard_of(cfg: ExtractConfig) -> tuple[int, int]:
    """(shard_index, num_shards): the flags, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    num = cfg.num_shards if cfg.num_shards is not None else int(os.environ.get("WORLD_SIZE", "1"))
    index = cfg.shard_index if cfg.shard_index is not None else int(os.environ.get("RANK", "0"))
    if not 0 <= index < num:
        raise AdlError(f"shard index {index} is not below the shard count {num}: check --shard-index/--num-shards")
    return index, num


@contextmanager
def disk_errors(root: Path):
    """A full disk anywhere in the run (zarr, HDF5, JSON) is the user's to fix, not a traceback."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(root) from None
        raise


def run_extract(cfg: ExtractConfig) -> dict | None:
    """Extract (or resume) one shard of the cache; -> the manifest once the cache is complete,
    None while other shards are still running. The folder lock is held shared from the
    folder check to the manifest (see plan.py), so --overwrite cannot wipe a running shard."""
    start = time.perf_counter()
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    shard, num_shards = shard_of(cfg)
    ds = load_dataset(cfg.dataset, text_column=cfg.text_column, label_column=cfg.label_column,
                      limit=cfg.limit, seed=cfg.seed)
    check_classes(ds)
    root = Location(cfg.out if cfg.out else Path("cache") / ds.name)
    if root.url and cfg.format == "hdf5":
        raise AdlError(hdf5_on_url(root))
    model_id = models.resolve_model_id(cfg.model)
    hf_config = models.load_config(model_id, cfg.trust_remote_code)
    info = models.describe(model_id, hf_config, cfg.decoder)
    device = models.select_device(cfg.device)
    tok = models.load_tokenizer(model_id, ds.task, cfg.trust_remote_code, info.revision)
    ident = plan.identity(cfg, ds, info, device, num_shards, {"class": type(tok).__name__,
                                                               "sha256": models.tokenizer_hash(tok)})
    with plan.FolderLock(root) as folder:
        with disk_errors(root):
            state = plan.prepare_folder(root, ident, cfg.overwrite, num_shards, folder)
        if state == "complete":
            console.print(f"{escape(str(root))} is already complete; nothing to do (pass --overwrite to extract again)")
            return read_manifest(root)
        return _run(cfg, root, state, shard, num_shards, ds, info, device, tok, ident["tokenizer"], hf_config,
                    console, start)


def _run(cfg, root, state, shard, num_shards, ds, info, device, tok, tok_ident, hf_config, console,
         start) -> dict | None:
    max_length, warning = models.resolve_max_length(cfg.max_length, models.model_limit(tok, hf_config))
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    layers = layer_indices(cfg.layers, info.num_hidden_states)
    if cfg.project is not None:
        projection.check_dim(cfg.project, info.hidden_size)
    splits = {name: tokenize.tokenize_split(s, ds.task, tok, max_length, labeled=name not in ds.unlabeled)
              for name, s in ds.splits.items()}
    resolved = _settle(cfg, root, ds.task, info, splits, layers, max_length, console)
    console.print(escape(f"{'resuming' if state == 'resume' else 'extracting'} {root} (shard {shard + 1} of "
                         f"{num_shards}): {info.id}, {len(layers)} layers, views {', '.join(resolved['views'])}, "
                         f"{device.device}"))

    backbone = models.Backbone(info, device, cfg.trust_remote_code)
    pad = models.pad_id(tok)
    proj = None
    if cfg.project is not None and "tokens" in resolved["views"]:
        with disk_errors(root):
            proj = _projection(cfg, root, backbone, splits, layers, pad).to(device.device)
    outputs = Outputs(layers, resolved["pools"] if "pooled" in resolved["views"] else [],
                      "tokens" in resolved["views"], proj, getattr(torch, cfg.dtype))
    loop_seconds = _extract_shard(cfg, root, shard, num_shards, backbone, splits, outputs, pad, console)
    fields = _manifest_fields(cfg, ds, info, device, tok, tok_ident, splits, resolved, proj,
                              time.perf_counter() - start)
    fields["loop_seconds"] = round(loop_seconds, 2)
    with disk_errors(root):
        manifest, wrote = publish(root, num_shards, fields)
    if manifest is None:
        console.print(f"shard {shard + 1} of {num_shards} done; the last shard to finish writes the manifest")
    elif not wrote:
        console.print(f"{escape(str(root))}: another writer published the manifest first (at "
                      f"{escape(str(manifest.get('created')))}); it describes the same cache, so this run uses it")
    else:
        console.print(f"[green]cache complete[/]: {escape(str(root))} ({time.perf_counter() - start:.1f} s); "
                      f"see `adl info {escape(str(root))}`")
    return manifest


def _settle(cfg, root, task, info, splits, layers, max_length, console) -> dict:
    """Print the size of each view, then fix views/pools once for every shard and resume."""
    token_dim = cfg.project or info.hidden_size
    pools = list(cfg.pool or (["last"] if info.states == "decoder" else ["mean"]))
    sizes = tokenize.view_bytes(splits, len(layers), info.hidden_size, token_dim, len(pools),
                                ITEMSIZE[cfg.dtype])
    free = plan.free_bytes(root)
    console.print(f"size estimate: pooled ({', '.join(pools)}) {human(sizes['pooled'])}, tokens "
                  f"{human(sizes['tokens'])} ({len(layers)} x {token_dim} per token); "
                  + ("an object store" if free is None else f"{human(free)} free"))

    def decide() -> dict:
        views, note = plan.choose_views(cfg.views, task, sizes, free)
        if note:
            console.print(f"[yellow]note:[/] {note}")
        return {"views": views, "pools": pools, "layers": layers, "max_length": max_length, "token_dim": token_dim,
                "estimates": sizes}

    with disk_errors(root):
        return plan.settle(root, decide)


def _projection(cfg, root, backbone, splits, layers, pad) -> Projection:
    """Load the cache's projection, or fit it (first shard to get the lock) and save it, so
    every shard and every resume applies exactly the same matrices."""
    with root.lock(".projection.lock"):
        if root.exists(PROJECTION_FILE):
            return _load_projection(root)
        hidden = backbone.info.hidden_size
        if cfg.project_method == "random":
            proj = projection.random_projection(hidden, cfg.project, layers, cfg.seed)
        else:
            train = splits.get("train") or next(iter(splits.values()))
            rows = projection.sample_rows(train.lengths, cfg.project_sample_tokens, cfg.seed)
            batches = [rows[b] for b in tokenize.make_batches(train.lengths[rows], cfg.batch_size, cfg.token_budget)]
            plan_ = backbone.plan
            feed = ((to_device(i, plan_), to_device(m, plan_)) for i, m in
                    (tokenize.collate(train, b, pad) for b in batches))
            proj = projection.fit_pca(backbone.hidden_states, feed, layers, hidden, cfg.project, cfg.seed,
                                      plan_.device)
        if not root.url:
            proj.save(root / PROJECTION_FILE)
            return proj
        # several machines may fit at once (bits can differ across CPUs): the first PUT wins and
        # every shard applies that one
        with tempfile.TemporaryDirectory() as tmp:
            proj.save(Path(tmp) / PROJECTION_FILE)
            won = root.create_bytes(PROJECTION_FILE, (Path(tmp) / PROJECTION_FILE).read_bytes())
        return proj if won else _load_projection(root)


def _load_projection(root: Location) -> Projection:
    with root.local_copy(PROJECTION_FILE) as path:
        return Projection.load(path)


def _extract_shard(cfg, root, shard, num_shards, backbone, splits, outputs, pad, console) -> float:
    """Create or reopen this shard's store and run its batches of every split; -> seconds of
    the forward loop (writes included)."""
    mine, layouts, n_batches = {}, {}, 0
    for name, ts in splits.items():
        batches = tokenize.make_batches(ts.lengths, cfg.batch_size, cfg.token_budget)
        a, b = tokenize.partition(batches, ts.lengths, num_shards)[shard] if batches else (0, 0)
        mine[name] = batches[a:b]
        layouts[name] = tokenize.shard_layout(ts, mine[name])
        n_batches += len(batches)
    n_layers, width = len(outputs.layers), backbone.info.hidden_size
    tokens_per_batch = -(-sum(ts.n_tokens for ts in splits.values()) // max(1, n_batches))
    pooled_rows, token_rows = chunk_rows(cfg.batch_size, tokens_per_batch, list(layouts.values()))
    arrays = {f"pooled_{p}": ((n_layers, width), pooled_rows) for p in outputs.pools}
    if outputs.tokens:
        token_dim = outputs.projection.dim if outputs.projection is not None else width
        arrays["tokens"] = ((n_layers, token_dim), token_rows)
    writer = ShardWriter(root, cfg.format, shard, num_shards)
    try:
        with disk_errors(root):
            writer.create(layouts, arrays, cfg.dtype, 1 << 16)
        start = time.perf_counter()
        _run_splits(cfg, backbone, splits, mine, outputs, writer, pad, console)
        seconds = time.perf_counter() - start
        with disk_errors(root):
            writer.finish({name: lay.n for name, lay in layouts.items()})
    finally:
        writer.close()
    return seconds


def chunk_rows(batch_size: int, tokens_per_batch: int, layouts: list) -> tuple[int, int]:
    """Rows per chunk for pooled and token arrays.

    Pooled: a divisor of the batch size, so every full batch write covers whole chunks.
    Both: about one batch, but at most 1/50 of this shard's smallest split (above a floor
    of 8 rows / 256 tokens), because a split's last chunk is stored full size (zero
    padded): the waste stays under 2% of the payload unless a split is tiny.
    """
    sizes = [lay.n for lay in layouts if lay.n] or [batch_size]
    tokens = [lay.n_tokens for lay in layouts if lay.n] or [1]
    cap = max(8, min(sizes) // 50)
    pooled = max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= cap)
    return pooled, max(1, min(tokens_per_batch, max(256, min(tokens) // 50)))


def _run_splits(cfg, backbone, splits, mine, outputs, writer, pad, console) -> None:
    calls_per_batch = len(outputs.pools) + int(outputs.tokens) + 1  # writes + commit
    bg = BackgroundWriter(writer, max_pending=QUEUED_BATCHES * calls_per_batch)
    ok = False
    try:
        with _progress(console, cfg.progress) as bar:
            for name, ts in splits.items():
                first = writer.done_batches(name)
                done = sum(len(b) for b in mine[name][:first])
                total = sum(len(b) for b in mine[name])
                task = bar.add_task(escape(name), total=total, completed=done, tokens=0, resumed_at=done)
                run_split(backbone, ts, mine[name], first, outputs, bg, pad, _advancer(bar, task))
                bar.stop_task(task)  # freezes its elapsed time, so its rate stays right
        ok = True
    finally:
        try:
            bg.join()  # the queued writes and commits land even on Ctrl-C
        except BaseException:
            if ok:
                raise


def _advancer(bar: Progress, task):
    tokens = [0]

    def advance(examples: int, n_tokens: int) -> None:
        tokens[0] += n_tokens
        bar.update(task, advance=examples, tokens=tokens[0])

    return advance


class _Rate(ProgressColumn):
    """examples/s and tokens/s since this run started the split."""

    def render(self, task) -> Text:
        seconds = task.elapsed or 0.0
        if seconds <= 0:
            return Text("")
        done = task.completed - task.fields["resumed_at"]
        return Text(f"{done / seconds:,.0f} ex/s {task.fields['tokens'] / seconds:,.0f} tok/s", style="cyan")


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)


def _manifest_fields(cfg, ds, info, device, tok, tok_ident, splits, resolved, proj, seconds) -> dict:
    import transformers

    views = [f"pooled:{p}" for p in resolved["pools"]] if "pooled" in resolved["views"] else []
    views += ["tokens"] if "tokens" in resolved["views"] else []
    return {
        "model": {"id": info.id, "name": cfg.model, "revision": info.revision, "config_hash": info.config_hash,
                  "family": info.family, "states": info.states, "type": info.model_type,
                  "num_hidden_states": info.num_hidden_states, "trust_remote_code": cfg.trust_remote_code},
        "tokenizer": {"name": str(getattr(tok, "name_or_path", info.id)), "class": type(tok).__name__,
                      "sha256": tok_ident["sha256"],  # hashed once, for the identity; checked where the heads run again (check_tokenizer)
                      "max_length": resolved["max_length"], "max_length_requested": cfg.max_length,
                      "truncated": {n: ts.truncated for n, ts in splits.items()}},
        "dataset": {"name": ds.name, "spec": ds.spec, "fingerprint": ds.fingerprint, "carving": ds.carving,
                    "unlabeled": list(ds.unlabeled)},
        "task": ds.task,
        "label_names": list(ds.label_names),
        "splits": {n: {"n": len(ts), "tokens": ts.n_tokens, "labeled": ts.labeled} for n, ts in splits.items()},
        "layers": list(resolved["layers"]),
        "views": views,
        "hidden_size": info.hidden_size,
        "token_dim": resolved["token_dim"],
        "dtype": cfg.dtype,
        "format": cfg.format,
        "projection": proj.entry() if proj is not None else None,
        "batch_size": cfg.batch_size,
        "batch_tokens": cfg.token_budget,
        "seed": cfg.seed,
        "compute": device.identity(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "extraction_seconds": round(seconds, 2),
    }
