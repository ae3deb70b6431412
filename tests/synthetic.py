"""A tiny synthetic cache whose label signal lives in one known layer (for stage-two tests).

Every token of every layer is N(0, 1) noise; in layer ``signal_layer`` each token also gets
``strength * mu[label]`` (its example's class for sequence tasks, its word's tag for token
tasks), with mu a fixed random (C, D) matrix. The pooled view is the per-example mean of the
tokens, so it carries the same signal in the same layer. Rows are sorted by length, like a
real extraction.
"""

from __future__ import annotations

import numpy as np

from adl.cache import ShardWriter, SplitLayout, finalize

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _sequence_split(rng, n, n_classes):
    lengths = np.sort(rng.integers(3, 9, size=n))
    labels = rng.integers(0, n_classes, size=n)
    tags = np.repeat(labels, lengths)  # the signal each token carries
    return SplitLayout(ids=np.arange(n), offsets=np.concatenate([[0], np.cumsum(lengths)]), labels=labels), tags


def _words(rng, n_words):
    """A valid BIO tag sequence over ``n_words`` words (ids into TAGS)."""
    out = []
    while len(out) < n_words:
        if rng.random() < 0.55:
            out.append(0)
        else:
            b = 1 + 2 * int(rng.integers(0, 2))
            out += [b] + [b + 1] * int(rng.integers(0, 2))
    return out[:n_words]


def _token_split(rng, n):
    """[CLS] w1 (w1') w2 ... [SEP]: each word has 1-2 sub-tokens; labels on first sub-tokens only."""
    sents = []
    for _ in range(n):
        word_tags = _words(rng, int(rng.integers(2, 7)))
        word_ids, labels, signal = [-1], [-100], [0]
        for w, tag in enumerate(word_tags):
            for sub in range(int(rng.integers(1, 3))):
                word_ids.append(w)
                labels.append(tag if sub == 0 else -100)
                signal.append(tag)
        word_ids.append(-1), labels.append(-100), signal.append(0)
        sents.append((word_ids, labels, signal))
    sents.sort(key=lambda s: len(s[0]))
    lengths = [len(s[0]) for s in sents]
    lay = SplitLayout(ids=np.arange(n), offsets=np.concatenate([[0], np.cumsum(lengths)]),
                      word_ids=np.concatenate([s[0] for s in sents]).astype(np.int32),
                      token_labels=np.concatenate([s[1] for s in sents]).astype(np.int64))
    return lay, np.concatenate([s[2] for s in sents])


def write_synthetic_cache(root, *, task="sequence", n=(96, 48, 48), layers=4, dim=8, signal_layer=2,
                          strength=1.5, n_classes=2, views=("pooled:mean", "tokens"), dataset="toy", seed=0,
                          projection=None, fmt="zarr", dtype="float16"):
    """Write a finished cache at ``root`` (splits train/validation/test with sizes ``n``); return root."""
    rng = np.random.default_rng(seed)
    names = TAGS if task == "token" else [f"class{c}" for c in range(n_classes)]
    mu = rng.normal(size=(len(names), dim))
    layouts, signals = {}, {}
    for split, size in zip(("train", "validation", "test"), n):
        layouts[split], signals[split] = _token_split(rng, size) if task == "token" else _sequence_split(
            rng, size, n_classes)
    arrays = {}
    if "tokens" in views:
        arrays["tokens"] = ((layers, dim), 64)
    pools = [v.partition(":")[2] for v in views if v.startswith("pooled:")]
    for pool in pools:
        arrays[f"pooled_{pool}"] = ((layers, dim), 16)
    w = ShardWriter(root, fmt)
    w.create(layouts, arrays, dtype, 16)
    for split, lay in layouts.items():
        tokens = rng.normal(size=(lay.n_tokens, layers, dim))
        tokens[:, signal_layer] += strength * mu[signals[split]]
        if "tokens" in views:
            w.write(split, "tokens", 0, tokens.astype(dtype))
        pooled = np.add.reduceat(tokens, lay.offsets[:-1], axis=0) / np.diff(lay.offsets)[:, None, None]
        for pool in pools:
            w.write(split, f"pooled_{pool}", 0, pooled.astype(dtype))
        w.commit(split, 1)
    w.finish({s: lay.n for s, lay in layouts.items()})
    w.close()
    finalize(root, 1, {
        "model": {"id": "synthetic"}, "tokenizer": {"max_length": 32}, "dataset": {"name": dataset},
        "task": task, "label_names": names, "splits": {s: {"n": lay.n, "labeled": True} for s, lay in layouts.items()},
        "layers": list(range(layers)), "views": list(views), "hidden_size": dim, "token_dim": dim,
        "dtype": dtype, "format": fmt, "projection": projection,
    })
    return root
