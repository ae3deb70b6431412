"""Stage one, measured (not a test): the real all-MiniLM-L6-v2 on the real tweet corpus.

    .venv/bin/python bench/extract.py [--n 1500] [--docs 300] [--repeats 3]

(a) overhead: the bare backbone forward (output_hidden_states, same length-bucketed batches,
    inputs prepared beforehand, model already loaded) vs `adl extract --views pooled` end to
    end (data loading, tokenising, model loading, pooling, writing, manifest; in process, so
    without the python/torch import time). Also its forward loop alone. Target <= 1.05.
(b) against a naive loop on long documents: pad every example to max length 512, no
    bucketing, output_hidden_states to numpy, mean-pool in numpy, one zarr write per example.
    Documents are consecutive tweets joined until a target length drawn log-normal (median
    230 tokens, sigma 0.6, clipped to 16..512, about IMDB's review lengths). Target >= 2x.
(c) cache bytes of the pooled view vs its raw payload N x L x H x 2 bytes. Target within 2%.

Timings are the best of --repeats interleaved runs (machines are often shared: the load
average is recorded). Results go to bench/results/extract.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adl.cache import open_cache
from adl.extract import models, tokenize
from adl.extract.config import ExtractConfig
from adl.extract.datasets import load_dataset
from adl.extract.run import run_extract

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
MAX_LENGTH = 512


def load_model():
    from transformers import AutoModel

    folder = models.resolve_model_id("minilm")
    model = AutoModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()
    return folder, model, models.load_tokenizer(folder, "sequence")


def bare_forward(model, tok, spec: str, limit: int | None, batch_size: int) -> float:
    """Seconds of the forward passes alone over adl's batches of ``spec``."""
    budget = ExtractConfig(model="minilm", dataset=spec, batch_size=batch_size).token_budget
    ds = load_dataset(spec, limit=limit)
    batches = []
    for name, split in ds.splits.items():
        ts = tokenize.tokenize_split(split, ds.task, tok, MAX_LENGTH, labeled=True)
        for rows in tokenize.make_batches(ts.lengths, batch_size, budget):
            ids, mask = tokenize.collate(ts, rows, models.pad_id(tok))
            batches.append((torch.from_numpy(ids), torch.from_numpy(mask)))
    with torch.inference_mode():
        model(input_ids=batches[-1][0], attention_mask=batches[-1][1], output_hidden_states=True)  # warm-up
        start = time.perf_counter()
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return time.perf_counter() - start


def adl_extract(spec: str, limit: int | None, batch_size: int, out: Path) -> tuple[float, float]:
    """-> (end-to-end seconds, seconds of the forward loop with its writes)."""
    start = time.perf_counter()
    m = run_extract(ExtractConfig(model="minilm", dataset=spec, limit=limit, views="pooled", batch_size=batch_size,
                                  out=str(out), overwrite=True, progress=False))
    return time.perf_counter() - start, m["loop_seconds"]


def naive_loop(model, tok, texts: list[str], batch_size: int, out: Path) -> float:
    """Pad to max length, no bucketing, hidden states to numpy, one write per example."""
    import zarr

    start = time.perf_counter()
    L, H = model.config.num_hidden_layers + 1, model.config.hidden_size
    store = zarr.open_group(str(out), mode="w", zarr_format=3)
    pooled = store.create_array("pooled", shape=(len(texts), L, H), dtype="float16", chunks=(1, L, H))
    with torch.inference_mode():
        for b in range(0, len(texts), batch_size):
            enc = tok(texts[b : b + batch_size], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                      return_tensors="pt")
            out_ = model(**enc, output_hidden_states=True)
            states = np.stack([h.numpy() for h in out_.hidden_states], 1)  # (B, L, T, H)
            mask = enc["attention_mask"].numpy()[:, None, :, None]
            means = (states * mask).sum(2) / mask.sum(2)
            for i, row in enumerate(means):
                pooled[b + i] = row.astype(np.float16)
    return time.perf_counter() - start


def long_documents(tok, n_docs: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Consecutive tweets joined into documents of log-normal target lengths (<= 512 tokens)."""
    ds = load_dataset("tweets")
    train = ds.splits["train"]
    order = np.argsort(train.ids)  # the file's order: consecutive tweets
    texts = [train.texts[i] for i in order]
    labels = [ds.label_names[int(train.labels[i])] for i in order]
    rng = np.random.default_rng(seed)
    docs, doc_labels, i = [], [], 0
    while len(docs) < n_docs and i < len(texts):
        target = int(np.clip(rng.lognormal(np.log(230), 0.6), 16, MAX_LENGTH))
        parts, n_tokens, first = [], 0, labels[i]
        while n_tokens < target and i < len(texts):
            parts.append(texts[i])
            n_tokens += len(tok(texts[i], add_special_tokens=False)["input_ids"]) + 1
            i += 1
        docs.append(" ".join(parts))
        doc_labels.append(first)
    return docs, doc_labels


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1500, help="tweets per split for (a) and (c) (3 splits)")
    p.add_argument("--docs", type=int, default=300, help="long documents for (b)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "extract.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="adl-bench-"))
    try:
        results = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    report(results, args.out)
    return results


def run(args, work: Path) -> dict:
    load_before = os.getloadavg()
    _, model, tok = load_model()
    bare, ours, loops = [], [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(model, tok, "tweets", args.n, args.batch_size))
        total, loop = adl_extract("tweets", args.n, args.batch_size, work / "tweets")
        ours.append(total)
        loops.append(loop)
    c = open_cache(work / "tweets")
    m = c.manifest
    n = sum(s["n"] for s in m["splits"].values())
    raw = n * len(m["layers"]) * m["hidden_size"] * 2
    stored = sum(c.nbytes(s, "pooled:mean") for s in c.splits)
    folder = sum(f.stat().st_size for f in (work / "tweets").rglob("*") if f.is_file())

    docs, labels = long_documents(tok, args.docs)
    with open(work / "docs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *zip(docs, labels)])
    doc_tokens = [len(tok(d, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for d in docs]
    naive, ours_docs = [], []
    for _ in range(args.repeats):
        naive.append(naive_loop(model, tok, docs, args.batch_size, work / "naive.zarr"))
        ours_docs.append(adl_extract(f"csv:{work / 'docs.csv'}", None, args.batch_size, work / "docs")[0])
    return {
        "machine": {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_before_after": [load_before[0], os.getloadavg()[0]]},
        "command": "python bench/extract.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                         if k != "out"),
        "a_overhead": {"examples": n, "tokens": sum(s["tokens"] for s in m["splits"].values()),
                       "bare_forward_s": min(bare), "adl_extract_s": min(ours), "ratio": min(ours) / min(bare),
                       "adl_loop_s": min(loops), "loop_ratio": min(loops) / min(bare),
                       "target": "<= 1.05", "all_bare_s": bare, "all_adl_s": ours, "all_adl_loop_s": loops},
        "b_naive": {"documents": len(docs), "mean_tokens": float(np.mean(doc_tokens)),
                    "max_tokens": int(np.max(doc_tokens)), "naive_s": min(naive), "adl_extract_s": min(ours_docs),
                    "speedup": min(naive) / min(ours_docs), "target": ">= 2", "all_naive_s": naive,
                    "all_adl_s": ours_docs},
        "c_bytes": {"pooled_bytes_on_disk": stored, "raw_payload_bytes": raw, "overhead": stored / raw - 1,
                    "cache_folder_bytes": folder, "target": "within 2%",
                    "shape": [n, len(m["layers"]), m["hidden_size"]]},
    }


def report(r: dict, path: str) -> None:
    from rich.console import Console
    from rich.table import Table

    a, b, c = r["a_overhead"], r["b_naive"], r["c_bytes"]
    t = Table(title=f"adl extract bench (MiniLM, {r['machine']['torch_threads']} threads)")
    for col in ("figure", "measured", "target"):
        t.add_column(col)
    t.add_row(f"(a) adl extract / bare forward, {a['examples']} tweets",
              f"{a['adl_extract_s']:.1f} s / {a['bare_forward_s']:.1f} s = {a['ratio']:.3f}", a["target"])
    t.add_row("    its forward loop (with writes) / bare forward",
              f"{a['adl_loop_s']:.1f} s / {a['bare_forward_s']:.1f} s = {a['loop_ratio']:.3f}", "")
    t.add_row(f"(b) naive / adl extract, {b['documents']} docs (mean {b['mean_tokens']:.0f} tokens)",
              f"{b['naive_s']:.1f} s / {b['adl_extract_s']:.1f} s = {b['speedup']:.2f}x", b["target"])
    t.add_row("(c) pooled bytes on disk / N x L x H x 2",
              f"{c['pooled_bytes_on_disk']:,} / {c['raw_payload_bytes']:,} = {1 + c['overhead']:.4f}", c["target"])
    Console().print(t)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
