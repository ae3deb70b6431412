"""The user's own call with heads attached (adl.attach) against the same call bare, same inputs.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/attach.py [--repeats 4] [--n 2000]

(1) sentence-transformers encode of --n real tweets, batch 32, the real all-MiniLM-L6-v2: two
    pooled heads (adalayers-pooled on pooled:mean), then the same plus one tokens head (adalayers).
(2) encoder-decoder generate at BART-large's shape (12 + 12 layers x 1024, random weights: the hub
    is out of reach, and a pass costs the same whatever the weights): 8 prompts of 256 tokens,
    64 new tokens (greedy), 3 encoder heads; and the alternative: generate, then a Predictor pass.
(3) decoder-only generate at GPT-2-medium's shape (24 layers x 1024, random weights): 8 prompts
    of 128 tokens, 32 new tokens (greedy), 2 heads on the prompt.
(4) "bart-heads": where (2)'s extra time goes. The 3 heads alone (adl.serve.taps, the functions
    attach calls from its hooks) on the encoder states of (2)'s prompts, against that encoder
    pass bare. Attached, (2) runs the bare call's operations plus these and the hooks' own
    bookkeeping (they fire once per generate, on the encoder; decoding steps run no hook), so the
    heads' CPU seconds over (2)'s bare CPU seconds is about what attaching costs there.

Heads are trained for one epoch on small caches extracted from each backbone (their quality is
beside the point: their cost is what is measured). Each variant runs once per repeat, the
variants interleaved within a repeat, their order reversed every other repeat (a drift in the
machine's load then falls on both sides). Each call is timed on the wall clock and in CPU
seconds of this process (one thread: what the call computes, whatever else shares the core).
Per variant the best of each is kept, and ``ratios`` gives best against best; ``spread`` gives
each repeat's own ratio (wall and CPU), min / median / max over the repeats. Everything comes
from this one run. Attaching and detaching happen outside the timed call; ``results()`` is
inside. Results: bench/results/attach.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import adl
from adl.extract.config import ExtractConfig
from adl.extract.datasets import load_dataset
from adl.extract.models import resolve_model_id
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.run import run_train


def shaped_backbone(folder: Path, kind: str) -> str:
    """BART-large's or GPT-2-medium's shape, random weights, with MiniLM's (BERT) tokenizer."""
    if (folder / "config.json").is_file():
        return str(folder)
    from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

    minilm = Path(resolve_model_id("minilm"))
    folder.mkdir(parents=True, exist_ok=True)
    for f in minilm.iterdir():
        if f.is_file() and ("token" in f.name or f.name == "vocab.txt"):
            shutil.copy(f, folder / f.name)
    torch.manual_seed(0)
    ids = dict(vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if kind == "bart":
        cfg = BartConfig(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                         decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                         max_position_embeddings=1024, decoder_start_token_id=102, forced_eos_token_id=None, **ids)
        BartForConditionalGeneration(cfg).save_pretrained(folder)
    else:
        GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, **ids)).save_pretrained(folder)
    return str(folder)


def heads(work: Path, model: str, tag: str, spec: dict[str, tuple[str, str]], limit: int) -> list[Path]:
    """Run folders, one epoch each on a small tweets cache of ``model``: name -> (view, head)."""
    cache = work / f"{tag}-cache"
    if not (cache / "manifest.json").is_file():
        run_extract(ExtractConfig(model=model, dataset="tweets", out=str(cache), limit=limit, views="pooled,tokens",
                                  progress=False))
    out = []
    for seed, (name, (_, head)) in enumerate(spec.items()):
        run = work / f"{tag}-{name}"
        if not (run / "metrics.json").is_file():
            run_train(TrainConfig(cache=str(cache), out=str(run), head=head, max_epochs=1, device="cpu", seed=seed,
                                  overwrite=True))
        out.append(run)
    return out


def timed(fn) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds of this process) of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def attached(model, runs, call, holder: object = None):
    """A timed variant: attach outside the clock, the call and results() on it."""
    def variant() -> float:
        h = adl.attach(holder or model, runs)
        try:
            return timed(lambda: (call(), h.results()))
        finally:
            h.detach()
    return variant


def interleaved(variants: dict, repeats: int) -> dict:
    """Every variant once per repeat, the order reversed every other repeat; the first variant is
    the reference. -> {"seconds", "cpu_seconds" (best per variant), "ratios" (best against the
    reference's best), "spread" (per-repeat ratios, min / median / max), "calls" (every timing)}."""
    names = list(variants)
    calls: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = variants[name]()
            calls[name].append((wall, cpu))
            print(f"  repeat {r + 1} {name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    ref, out = names[0], {"seconds": {}, "cpu_seconds": {}, "ratios": {}, "spread": {}}
    for name in names:
        out["seconds"][name] = min(w for w, _ in calls[name])
        out["cpu_seconds"][name] = min(c for _, c in calls[name])
    for name in names[1:]:
        out["ratios"][name] = {"wall": out["seconds"][name] / out["seconds"][ref],
                               "cpu": out["cpu_seconds"][name] / out["cpu_seconds"][ref]}
        out["spread"][name] = {
            kind: dict(zip(("min", "median", "max"), np.percentile(
                [a[k] / b[k] for a, b in zip(calls[name], calls[ref])], [0, 50, 100]).tolist()))
            for k, kind in ((0, "wall"), (1, "cpu"))}
    out["calls"] = {name: [[round(w, 3), round(c, 3)] for w, c in calls[name]] for name in names}
    return out


def encode_case(work: Path, n: int, repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    model = "minilm"
    runs = heads(work, model, "minilm", {"pooled-a": ("pooled", "adalayers-pooled"),
                                          "pooled-b": ("pooled", "adalayers-pooled"),
                                          "tokens": ("tokens", "adalayers")}, limit=200)
    texts = list(load_dataset("tweets", seed=42).splits["train"].texts[:n])
    st = SentenceTransformer(resolve_model_id(model), device="cpu")

    def call():
        st.encode(texts, batch_size=32)

    call()  # warm-up
    timings = interleaved({"bare": lambda: timed(call), "pooled heads": attached(None, runs[:2], call, st),
                           "pooled + tokens heads": attached(None, runs, call, st)}, repeats)
    return {"texts": n, "batch_size": 32, **timings}


def prompts(tok, n: int, length: int) -> tuple[dict, list[str]]:
    """n prompts of exactly ``length`` tokens cut from concatenated real tweets, and their texts."""
    tweets = list(load_dataset("tweets", seed=42).splits["test"].texts)
    texts, i = [], 0
    for _ in range(n):
        words = []
        while len(tok(" ".join(words))["input_ids"]) < length + 8:
            words.append(tweets[i % len(tweets)])
            i += 1
        texts.append(" ".join(words))
    batch = tok(texts, truncation=True, max_length=length, padding=True, return_token_type_ids=False,
                return_tensors="pt")
    cut = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return batch, cut


BART_HEADS = {"pooled-a": ("pooled", "adalayers-pooled"), "pooled-b": ("pooled", "adalayers-pooled"),
              "tokens": ("tokens", "adalayers")}


def generate_case(work: Path, kind: str, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = shaped_backbone(work / f"{kind}-shape", kind)
    if kind == "bart":
        spec, n, length, new, cls = BART_HEADS, 8, 256, 64, AutoModelForSeq2SeqLM
    else:
        spec = {"pooled-a": ("pooled", "adalayers-pooled"), "pooled-b": ("pooled", "adalayers-pooled")}
        n, length, new, cls = 8, 128, 32, AutoModelForCausalLM
    runs = heads(work, folder, kind, spec, limit=24)
    tok = AutoTokenizer.from_pretrained(folder)
    model = cls.from_pretrained(folder).eval()
    batch, texts = prompts(tok, n, length)

    def call():
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)

    variants = {"bare": lambda: timed(call), "heads attached": attached(model, runs, call)}
    predictor = None
    if kind == "bart":
        predictor = Predictor(runs, device="cpu")
        variants["generate, then a Predictor pass"] = lambda: timed(lambda: (call(), predictor(texts)))
    call()  # warm-up
    return {"shape": "BART-large (12+12 x 1024)" if kind == "bart" else "GPT-2-medium (24 x 1024)",
            "prompts": n, "prompt_tokens": length, "new_tokens": new, "heads": len(runs),
            **interleaved(variants, repeats)}


def heads_case(work: Path, repeats: int) -> dict:
    """Case (4): the BART case's heads alone on its encoder states, against the encoder pass."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from adl.serve.taps import HeadFeed, feed_layer, finish_heads
    from adl.train.rundir import load_run

    folder = shaped_backbone(work / "bart-shape", "bart")
    runs = heads(work, folder, "bart", BART_HEADS, limit=24)
    tok = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModelForSeq2SeqLM.from_pretrained(folder).eval().get_encoder()
    batch, _ = prompts(tok, 8, 256)
    mask = batch["attention_mask"]
    with torch.no_grad():
        states = encoder(**batch, output_hidden_states=True).hidden_states
    feeds = [HeadFeed(load_run(r), "cpu") for r in runs]

    def heads_alone():
        for f in feeds:
            f.start()
        for layer, h in enumerate(states):
            feed_layer([f for f in feeds if layer in f.active], layer, h, mask)
        finish_heads(feeds, mask)

    def encoder_pass():
        with torch.no_grad():
            encoder(**batch)

    heads_alone()  # warm-up
    return {"prompts": 8, "prompt_tokens": 256, "heads": len(runs),
            **interleaved({"encoder pass": lambda: timed(encoder_pass), "heads alone": lambda: timed(heads_alone)},
                          repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/adl-bench-attach")
    ap.add_argument("--n", type=int, default=2000, help="tweets encoded in case (1)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--cases", default="encode,bart,gpt2,bart-heads")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attach.json"),
                    help="results file; a case rerun replaces its own entry")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    for case in args.cases.split(","):
        print(f"case {case}", flush=True)
        before = os.getloadavg()
        entry = encode_case(work, args.n, args.repeats) if case == "encode" else \
            heads_case(work, args.repeats) if case == "bart-heads" else generate_case(work, case, args.repeats)
        entry = {**entry, "threads": torch.get_num_threads(), "repeats": args.repeats,
                 "load_average_before": before, "load_average_after": os.getloadavg(),
                 "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(json.dumps(entry, indent=1), flush=True)
        # read again at each write: a case rerun replaces its own entry, and runs of other cases at once keep theirs
        result = {**(json.loads(out.read_text()) if out.is_file() else {}), case: entry}
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
