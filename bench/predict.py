"""The live path, measured (not a test): heads on the real all-MiniLM-L6-v2's own forward pass.

    .venv/bin/python bench/predict.py [--n 192] [--limit 200] [--repeats 3]

Set-up (a few minutes): small caches of the real tweets and the real WNUT-16 (--limit rows per
split), and four small heads trained for 2 epochs: tweets adalayers-pooled (pooled:mean),
tweets adalayers (tokens), WNUT-16 adalayers (tokens, NER), and tweets single-layer on layer
3 (pooled) for the early exit. Measured on --n real test tweets in the Predictor's own
length-bucketed batches (batch 32), the same batches for every variant:

(a) backbone + 3 heads (the two tweet heads and the NER head), streamed through hooks, vs
    the bare backbone forward. Target: time <= 1.10x, peak memory <= 1.2x.
(b) the naive path: output_hidden_states=True, then each head run on its own over the
    stacked states (the cache's layout, rounded to float16 as the cache stores them).
(c) early exit: the layer-3 head alone (the pass stops after layer 3) vs the bare full forward.

--backbone large runs the same on a BERT of RoBERTa-large's shape (24 layers x 1024, random
weights, MiniLM's tokenizer; bench/sweep.py builds it): caches, heads and passes as above, to
show what the same heads cost beside a backbone of the size the method is meant for. Results
go to bench/results/predict-large.json.

Time: the best of --repeats interleaved passes per variant, in one process. Memory: each
variant runs in a fresh subprocess; the figure is the growth of the resident set during the
pass (/proc/self/statm sampled every millisecond by a thread) over its level at the start,
once the model is loaded, the inputs tokenised and one warm-up batch run. So it counts the
activations and head buffers of the pass, which is what heads add (ru_maxrss cannot: the
model's loading already set a higher peak). The model's weights are the same in every variant. Results
go to bench/results/predict.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from adl.extract.config import ExtractConfig
from adl.extract.datasets import load_dataset
from adl.extract.loop import to_device
from adl.extract.tokenize import collate, make_batches
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.run import run_train

HEADS = {  # run name -> (cache, train options)
    "sentiment-pooled": ("tweets", dict(head="adalayers-pooled")),
    "sentiment-tokens": ("tweets", dict(head="adalayers")),
    "ner": ("wnut16", dict(head="adalayers", lr=1e-3, alpha=8.0)),
    "layer3": ("tweets", dict(head="single-layer", layer=3, pool="mean")),
}
STREAMED = ["sentiment-pooled", "sentiment-tokens", "ner"]


def setup(work: Path, limit: int, model: str) -> None:
    for name in ("tweets", "wnut16"):
        if not (work / name / "manifest.json").is_file():
            run_extract(ExtractConfig(model=model, dataset=name, out=str(work / name), limit=limit,
                                      views="pooled,tokens", progress=False))
    for run, (cache, opts) in HEADS.items():
        if not (work / run / "metrics.json").is_file():
            run_train(TrainConfig(cache=str(work / cache), out=str(work / run), max_epochs=2, device="cpu",
                                  overwrite=True, **opts))


def texts(n: int) -> list[str]:
    test = load_dataset("tweets", seed=42).splits["test"]
    return list(test.texts[:n])


def batches(p: Predictor, enc):
    pad = 0 if p.tokenizer("sequence").pad_token_id is None else p.tokenizer("sequence").pad_token_id
    out = []
    for rows in make_batches(enc.ts.lengths, p.batch_size, p.batch_tokens):
        ids, mask = collate(enc.ts, rows, pad)
        out.append((to_device(ids, p.plan), to_device(mask, p.plan)))
    return out


def bare(p: Predictor, enc, feeds) -> None:
    for ids, mask in batches(p, enc):
        p.backbone.model(input_ids=ids, attention_mask=mask)


def naive(p: Predictor, enc, feeds) -> None:
    """All hidden states kept, then each head on its own over its layers (as the cache stores them)."""
    for ids, mask in batches(p, enc):
        states = p.backbone.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for f in feeds:
            z = torch.stack([f.stored(layer, states[layer], mask) for layer in f.layers], -2)
            f.head(z, mask.bool() if z.dim() == 4 else None)


def streamed(p: Predictor, enc, feeds) -> None:
    for ids, mask in batches(p, enc):
        p.taps.run(ids, mask, feeds, full=False, last=False)
        for f in feeds:
            f.finish(mask)


VARIANTS = {"bare": (bare, []), "streamed": (streamed, STREAMED), "naive": (naive, STREAMED),
            "early_exit": (streamed, ["layer3"])}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sampler(threading.Thread):
    """The resident set's high-water mark, sampled every millisecond (torch ops release the GIL)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = rss_mb(), threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.001)


def child(work: Path, variant: str, n: int) -> None:
    """One variant in this (fresh) process: print its resident-set growth during the pass, in MB."""
    fn, names = VARIANTS[variant]
    p = Predictor([work / r for r in [*STREAMED, "layer3"]], device="cpu")
    enc = p.encode(texts(n))
    feeds = [p.feeds[name] for name in names]
    with torch.inference_mode():
        first = batches(p, enc)[-1:]  # the shortest batch warms the kernels up
        p.backbone.model(input_ids=first[0][0], attention_mask=first[0][1])
        base, sampler = rss_mb(), Sampler()
        sampler.start()
        fn(p, enc, feeds)
        sampler.done.set()
        sampler.join()
    peak = max(sampler.peak, rss_mb())
    print(json.dumps({"variant": variant, "growth_mb": peak - base, "peak_mb": peak,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def timings(work: Path, n: int, repeats: int) -> dict:
    p = Predictor([work / r for r in [*STREAMED, "layer3"]], device="cpu")
    enc = p.encode(texts(n))
    best = {v: float("inf") for v in VARIANTS}
    with torch.inference_mode():
        bare(p, enc, [])  # warm-up
        for _ in range(repeats):
            for v, (fn, names) in VARIANTS.items():
                feeds = [p.feeds[name] for name in names]
                t = time.perf_counter()
                fn(p, enc, feeds)
                best[v] = min(best[v], time.perf_counter() - t)
    return {"seconds": best, "tokens": enc.ts.n_tokens, "batches": len(batches(p, enc)),
            "active_layers": {f: sorted(p.feeds[f].active) for f in p.feeds}}


def memory(argv: list[str]) -> dict:
    """Each variant in a fresh process (``argv``: this run's --work, --n and --backbone)."""
    out = {}
    for v in VARIANTS:
        res = subprocess.run([sys.executable, __file__, "--child", v, *argv],
                             capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--backbone", choices=("minilm", "large"), default="minilm",
                    help="large: a BERT of RoBERTa-large's shape (24 x 1024) with random weights (the hub is out "
                         "of reach; a pass costs the same whatever the weights), heads trained on its caches")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work or Path(tempfile.gettempdir()) / "adl-bench-predict")
    args.work = str(work)
    model = "minilm"
    if args.backbone == "large":
        from sweep import large_backbone  # bench/sweep.py, beside this script

        work = work / "large"
        model = large_backbone(work / "bert-large-shape")
    if args.child:
        child(work, args.child, args.n)
        return
    t0 = time.perf_counter()
    setup(work, args.limit, model)
    setup_s = time.perf_counter() - t0
    m = memory(["--work", args.work, "--n", str(args.n), "--backbone", args.backbone])
    print(json.dumps(m))
    t = timings(work, args.n, args.repeats)
    s, g = t["seconds"], {v: m[v]["growth_mb"] for v in m}
    ratios = {"a_time_streamed_vs_bare": s["streamed"] / s["bare"],
              "a_memory_growth_streamed_vs_bare": g["streamed"] / g["bare"],
              "a_peak_rss_streamed_vs_bare": m["streamed"]["peak_mb"] / m["bare"]["peak_mb"],
              "b_time_naive_vs_bare": s["naive"] / s["bare"],
              "b_memory_growth_naive_vs_bare": g["naive"] / g["bare"],
              "c_speedup_early_exit": s["bare"] / s["early_exit"]}
    result = {"n_texts": args.n, "limit": args.limit, "repeats": args.repeats, **t, "memory": m, "ratios": ratios,
              "memory_method": "resident set (/proc/self/statm) sampled every 1 ms during the pass, peak minus "
                               "the level at its start (model loaded, inputs tokenised, one warm-up batch run); "
                               "one fresh subprocess per variant",
              "setup_seconds": round(setup_s, 1), "torch_threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "backbone": args.backbone, "command": "bench/predict.py " + " ".join(sys.argv[1:])}
    out = Path(__file__).parent / "results" / ("predict.json" if args.backbone == "minilm" else "predict-large.json")
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"{args.n} tweets, {t['tokens']} tokens, {t['batches']} batches; best of {args.repeats}")
    for v in VARIANTS:
        print(f"  {v:>10}: {s[v]:.3f} s, peak RSS {m[v]['peak_mb']:.0f} MB (+{g[v]:.1f} MB over loaded)")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
