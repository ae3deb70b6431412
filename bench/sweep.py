"""Sweeps, measured (not a test): the real all-MiniLM-L6-v2 cache of the tweet corpus.

    .venv/bin/python bench/sweep.py [--cache cache/tweets] [--limit 2000] [--epochs 2]

The cache is built first if missing (`adl extract --model minilm --dataset tweets --limit N
--views pooled,tokens`).

(1) 16 configurations of one shape (alpha 16/64 x cutoff 0/0.01 x lambda 0/1e-3 x lr
    1e-4/3e-4, k 64) trained vectorised (group.fit_group, one pass of the data per epoch for
    all 16) vs the same 16 run one after another with trainer.fit, the same epochs for both
    (patience = max_epochs, so nothing stops early). Wall-time ratio for the pooled head
    (adalayers-pooled on pooled:mean) and the tokens head (adalayers on tokens).
(2) one configuration per epoch: trained from the cache vs the same head trained with MiniLM
    in the loop, recomputing the hidden states of every batch in every epoch (as the reference
    code does; here at least with length-bucketed batches and no gradient through the
    backbone). Speedup per epoch, both heads.
(3) the same as (2) with a backbone of RoBERTa-large's shape (24 layers, 1024 wide, 4096 feed-
    forward, 25 hidden states), the thesis' backbone: a BERT built from that config with random
    weights and MiniLM's tokenizer (the hub is out of reach; the cost of a forward pass does not
    depend on the weights), on --large-limit tweets per split. A third row trains the tokens
    head on a cache extracted with --project 64 (the per-layer PCA map 1024 -> 64, GELU first,
    what a per-token cache of a model this size needs); its backbone-in-the-loop epoch applies
    the same stored map to every batch.

Timings are wall time on whatever cores torch uses, best of --repeats alternated runs (the
machine may be shared: the numbers are indicative; the load average is recorded). Part 1 also
records the process's CPU time, which other processes' load barely moves (use --threads 1 for
it: idle OpenMP threads spin and count as CPU time). Results
go to bench/results/sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from adl.cache import open_cache  # noqa: E402
from adl.sweep.group import fit_group  # noqa: E402
from adl.train.config import TrainConfig, resolve  # noqa: E402
from adl.train.data import load_data  # noqa: E402
from adl.train.head_io import make_head  # noqa: E402
from adl.train.heads import masked_mean  # noqa: E402
from adl.train.trainer import fit, param_groups  # noqa: E402

GRID = [dict(alpha=a, cutoff=c, lam=l, lr=r) for a in (16.0, 64.0) for c in (0.0, 0.01) for l in (0.0, 1e-3)
        for r in (1e-4, 3e-4)]
HEADS = {"pooled": ("adalayers-pooled", "pooled:mean"), "tokens": ("adalayers", "tokens")}


def ensure_cache(path: Path, limit: int, model: str = "minilm", project: int | None = None) -> None:
    if (path / "manifest.json").is_file():
        return
    from adl.extract.config import ExtractConfig
    from adl.extract.run import run_extract

    print(f"building {path} ({model} over {limit} tweets per split)...", flush=True)
    run_extract(ExtractConfig(model=model, dataset="tweets", limit=limit, views="pooled,tokens", out=str(path),
                              overwrite=True, project=project))


def large_backbone(folder: Path) -> str:
    """A BERT of RoBERTa-large's shape with random weights, saved with MiniLM's tokenizer."""
    if not (folder / "config.json").is_file():
        import shutil

        from transformers import BertConfig, BertModel

        from adl.extract import models

        minilm = Path(models.resolve_model_id("minilm"))
        folder.mkdir(parents=True, exist_ok=True)
        for f in minilm.iterdir():
            if f.is_file() and "token" in f.name or f.name == "vocab.txt":
                shutil.copy(f, folder / f.name)
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                             intermediate_size=4096), add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def configs(cache, head: str, epochs: int) -> list[TrainConfig]:
    base = TrainConfig(cache=str(cache.root), head=head, k=64, dropout=0.0, max_epochs=epochs, patience=epochs,
                       lr_patience=epochs, device="cpu")
    return [resolve(dataclasses.replace(base, **p), cache) for p in GRID]


def build(cfg, data, cache):
    torch.manual_seed(cfg.seed)
    return make_head(cfg, data, cache.manifest)


def vectorised_vs_sequential(cache, kind: str, epochs: int, repeats: int) -> dict:
    head, view = HEADS[kind]
    cfgs = configs(cache, head, epochs)
    data = load_data(cache, view, device="cpu", seed=0, memory_gb=8)
    fit(build(cfgs[0], data, cache), data, dataclasses.replace(cfgs[0], max_epochs=1))  # warm-up
    fit_group([build(c, data, cache) for c in cfgs[:2]], data, [dataclasses.replace(c, max_epochs=1)
                                                                for c in cfgs[:2]])
    sequential = vectorised = seq_cpu = grp_cpu = math.inf
    for _ in range(repeats):  # alternated, best of each: the machine is shared
        t0, c0 = time.perf_counter(), time.process_time()
        seq = [fit(build(c, data, cache), data, c) for c in cfgs]
        sequential, seq_cpu = min(sequential, time.perf_counter() - t0), min(seq_cpu, time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        grp = fit_group([build(c, data, cache) for c in cfgs], data, cfgs)
        vectorised, grp_cpu = min(vectorised, time.perf_counter() - t0), min(grp_cpu, time.process_time() - c0)
    gap = max(abs(a.validation[a.metric] - b.validation[b.metric]) for a, b in zip(seq, grp))
    row = {"head": head, "view": view, "configs": len(cfgs), "epochs": epochs, "sequential_s": round(sequential, 2),
           "vectorised_s": round(vectorised, 2), "ratio": round(sequential / vectorised, 2),
           "sequential_cpu_s": round(seq_cpu, 2), "vectorised_cpu_s": round(grp_cpu, 2),
           "cpu_ratio": round(seq_cpu / grp_cpu, 2), "threads": torch.get_num_threads(),
           "max_val_metric_gap": gap, "train_examples": data.train.n, "repeats": repeats}
    print(f"(1) {head:<17} 16 configs x {epochs} epochs: one by one {sequential:7.1f}s, vectorised "
          f"{vectorised:7.1f}s -> {sequential / vectorised:.2f}x; CPU time {seq_cpu:.1f}s vs {grp_cpu:.1f}s -> "
          f"{seq_cpu / grp_cpu:.2f}x (max |val gap| {gap:.4f})", flush=True)
    return row


def backbone_batches(folder: str, limit: int, batch_size: int):
    """The tweet corpus's train and validation splits tokenised as adl extract does
    (length-bucketed batches): {split: [(input_ids, mask, labels), ...]}."""
    from adl.extract import models, tokenize
    from adl.extract.datasets import load_dataset

    tok = models.load_tokenizer(folder, "sequence")
    ds = load_dataset("tweets", limit=limit)
    batches = {}
    for split in ("train", "validation"):
        ts = tokenize.tokenize_split(ds.splits[split], ds.task, tok, 512, labeled=True)
        batches[split] = []
        for rows in tokenize.make_batches(ts.lengths, batch_size):
            ids, mask = tokenize.collate(ts, rows, models.pad_id(tok))
            batches[split].append((torch.from_numpy(ids), torch.from_numpy(mask).bool(),
                                   torch.from_numpy(ts.labels[rows])))
    return batches


def _states(model, ids, mask, pooled: bool, projection=None):
    """What the cache would hold for this batch: pooled (B, L, H), or tokens (B, T, L, H), or with
    ``projection`` (the cache's --project map, GELU included) tokens (B, T, L, D)."""
    with torch.inference_mode():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        z = torch.stack(states, dim=2)  # (B, T, L, H)
        if projection is not None:
            z = projection.apply(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        z = masked_mean(z, mask) if pooled else z
    return z.clone()  # a clone made outside inference mode is a normal tensor autograd can save


def backbone_epoch(model, head, batches, cfg, pooled: bool, seed: int, projection=None) -> float:
    """Seconds of one epoch (train + validation, like the cached epoch) with MiniLM recomputing
    the hidden states of every batch."""
    opt = torch.optim.AdamW(param_groups(head.named_parameters(), cfg.weight_decay), lr=cfg.lr)
    head.train()
    order = np.random.default_rng(seed).permutation(len(batches["train"]))
    t0 = time.perf_counter()
    for i in order:
        ids, mask, y = batches["train"][i]
        loss = F.cross_entropy(head(_states(model, ids, mask, pooled, projection), None if pooled else mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, y in batches["validation"]:
            z = _states(model, ids, mask, pooled, projection)
            correct += int((head(z, None if pooled else mask).argmax(-1) == y).sum())
    return time.perf_counter() - t0


def cache_vs_backbone(cache, kind: str, folder: str, limit: int, epochs: int) -> dict:
    from transformers import AutoModel

    head_name, view = HEADS[kind]
    cfg = dataclasses.replace(configs(cache, head_name, epochs)[0], patience=epochs)
    data = load_data(cache, view, device="cpu", seed=0, memory_gb=8)
    res = fit(build(cfg, data, cache), data, cfg)
    cached = min(r["seconds"] for r in res.history)  # train epoch + validation, best epoch
    batches = backbone_batches(folder, limit, cfg.batch_size)
    model = AutoModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    projection = None
    if kind == "tokens" and cache.manifest["projection"]:
        from adl.extract.projection import FILE, Projection

        projection = Projection.load(cache.root / FILE)
        view = f"tokens, --project {projection.dim}"
    loop = backbone_epoch(model, build(cfg, data, cache), batches, cfg, kind == "pooled", 0, projection)
    backbone = f"{model.config.num_hidden_layers} layers x {model.config.hidden_size}"
    row = {"head": head_name, "view": view, "backbone": backbone, "cache_epoch_s": round(cached, 3),
           "backbone_epoch_s": round(loop, 2),
           "speedup": round(loop / cached, 1), "train_examples": data.train.n,
           "note": "both epochs = train pass + validation pass"}
    print(f"({backbone}, {view}) {head_name:<17} per epoch: from the cache {cached:6.2f}s, backbone in the loop {loop:7.1f}s -> "
          f"{loop / cached:.0f}x", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="cache/tweets-2000")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timings are the best of this many runs")
    ap.add_argument("--large-limit", type=int, default=150, help="tweets per split for part 3")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: 1,2,3")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--kinds", default="pooled,tokens", help="heads of parts 1 and 2: pooled,tokens")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_cache(Path(args.cache), args.limit)
    cache = open_cache(args.cache)
    results = {"cache": str(cache.root), "model": cache.manifest["model"]["id"], "threads": torch.get_num_threads(),
               "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
               "load_average_at_start": os.getloadavg(),
               "vectorised_vs_sequential": [], "cache_vs_backbone": [], "cache_vs_large_backbone": []}
    skip = set(args.skip.split(","))
    for kind in args.kinds.split(","):
        if "1" not in skip:
            results["vectorised_vs_sequential"].append(vectorised_vs_sequential(cache, kind, args.epochs, args.repeats))
        if "2" not in skip:
            minilm = cache.manifest["model"]["id"]
            results["cache_vs_backbone"].append(cache_vs_backbone(cache, kind, minilm, args.limit, args.epochs))
    if "3" not in skip:
        root = Path(args.cache).parent
        folder = large_backbone(root / "bert-large-shape")
        path = root / f"tweets-large-shape-{args.large_limit}"
        ensure_cache(path, args.large_limit, folder)
        large = open_cache(path)
        for kind in ("pooled", "tokens"):
            results["cache_vs_large_backbone"].append(
                cache_vs_backbone(large, kind, folder, args.large_limit, args.epochs))
        # per-token states of a model this size are what --project exists for (1024 -> 64 per layer)
        path = root / f"tweets-large-shape-{args.large_limit}-project64"
        ensure_cache(path, args.large_limit, folder, project=64)
        results["cache_vs_large_backbone"].append(
            cache_vs_backbone(open_cache(path), "tokens", folder, args.large_limit, args.epochs))
    out = Path(__file__).parent / "results" / "sweep.json"
    out.parent.mkdir(exist_ok=True)
    if out.is_file():  # parts skipped in this run keep their last measured rows
        earlier = json.loads(out.read_text())
        for part, key in (("1", "vectorised_vs_sequential"), ("2", "cache_vs_backbone"), ("3", "cache_vs_large_backbone")):
            if part in skip:
                results[key] = earlier.get(key, [])
            elif part != "3":  # heads left out by --kinds keep their rows
                measured = {r["head"] for r in results[key]}
                results[key] += [r for r in earlier.get(key, []) if r["head"] not in measured]
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
