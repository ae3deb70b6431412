"""``Predictor``: trained heads riding on one forward pass of their frozen backbone.

    p = Predictor(["runs/sentiment", "runs/ner"], device="auto")
    out = p(["I love this phone", "Apple opens a store in Paris"], return_backbone=True)
    out.heads["sentiment"][0]   # {"label": "positive", "probs": {...}}
    out.heads["ner"][1]         # {"entities": [{"type": ..., "start": 0, "end": 5, "text": "Apple"}]}

Inputs are tokenised, length-bucketed and padded exactly as at extraction
(``adl.extract.tokenize``: truncation at the cache's max_length, rows sorted by decreasing
length, batches capped by a padded-token budget), and each head sees its layers stored the
way the cache stored them (``adl.serve.taps``). With the extraction's batch size and token
budget (the defaults), a run's own split is batched exactly as it was extracted.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from adl.devices import check_device
from adl.errors import AdlError
from adl.extract import models
from adl.extract.datasets import Split
from adl.extract.loop import to_device
from adl.extract.recorded import check_tokenizer, recorded_backbone
from adl.extract.tokenize import TokenizedSplit, collate, make_batches, tokenize_split
from adl.serve.embedding import embed, embedding_spec
from adl.serve.decode import entities, joined_spans, sequence_prediction, token_spans
from adl.train.rundir import Run, check_same_backbone, load_run
from adl.serve.taps import HeadFeed, LayerTaps, finish_heads


@dataclass
class Prediction:
    """Per input, in input order."""

    heads: dict[str, list[dict]]
    backbone: list[dict] | None = None  # the model's own output per input: name -> tensor, padding removed
    embeddings: list[list[float]] | None = None  # the backbone's sentence embedding (adl.serve.embedding)
    truncated: int = 0  # inputs cut at max_length
    logits: dict[str, list[np.ndarray]] = field(default_factory=dict)  # (C,) or (T, C) per input


OnRows = Callable[[np.ndarray, Prediction], None]


@dataclass(frozen=True, eq=False)
class Encoded:
    """Tokenised inputs: the extraction's TokenizedSplit plus what NER decoding needs."""

    ts: TokenizedSplit
    texts: list[str]  # the inputs as text (pre-split words joined by spaces)
    word_ids: list[np.ndarray] | None  # per input (T,), -1 on special tokens; None: no token head
    spans: list[dict] | None  # per input: word index -> (start, end) in texts[i]


def compute_differs(recorded: dict | None, now: dict) -> str | None:
    """A warning when the backbone runs in another precision than at extraction (device kind and
    autocast dtype, as ``DevicePlan.identity`` names them): its hidden states then differ slightly
    from the cached ones the heads were trained on. None when they agree (or nothing is recorded)."""
    if not recorded or (recorded.get("device"), recorded.get("autocast")) == (now["device"], now["autocast"]):
        return None

    def name(c: dict) -> str:
        return f"{c.get('device')} " + (f"under {c['autocast']} autocast" if c.get("autocast") else "in float32")

    return (f"the backbone runs on {name(now)}, but the heads' cache was extracted on {name(recorded)}: "
            "predictions may differ slightly from the cache path's (extract on the same kind of device to match)")


class Predictor:
    """Heads of one or more run folders on their shared backbone (head name = run folder name)."""

    def __init__(self, runs, device: str = "auto", batch_size: int | None = None, batch_tokens: int | None = None):
        if isinstance(runs, (str, bytes)) or not runs:
            raise AdlError("Predictor needs a list of run folders, e.g. Predictor(['runs/sentiment'])")
        check_device(device)
        self.runs: list[Run] = [load_run(r) for r in runs]
        check_same_backbone(self.runs)
        m = self.runs[0].manifest
        self.manifest = m
        self.recorded = recorded_backbone(m, f"run {self.runs[0].root}")
        self.plan = models.select_device(device)
        self.compute_warning = compute_differs(m.get("compute"), self.plan.identity())
        if self.compute_warning:
            warnings.warn(self.compute_warning, stacklevel=2)
        self.backbone = self.recorded.load(self.plan)
        self.embedding = embedding_spec(self.recorded.model_id)  # sentence-transformers' pooling, if any
        self.taps = LayerTaps(self.backbone)
        self.feeds = {run.name: HeadFeed(run, self.plan.device) for run in self.runs}
        self.max_length = int(m["tokenizer"]["max_length"])
        self.batch_size = int(batch_size or m.get("batch_size") or 32)
        per_row = (m.get("batch_tokens") or 128 * int(m.get("batch_size") or 32)) / int(m.get("batch_size") or 32)
        self.batch_tokens = int(batch_tokens or per_row * self.batch_size)
        self._tokenizers = {}
        for run in self.runs:  # each head's tokenizer must be the one its cache was extracted with
            check_tokenizer(run.manifest, self.tokenizer(run.task), f"run {run.root}")
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def heads_info(self) -> list[dict]:
        return [{"name": r.name, "task": r.task, "labels": r.label_names, "layers": r.layers,
                 "weights": self.feeds[r.name].head.weights().detach().float().cpu().tolist(),
                 "view": r.info["view"], "metrics": r.metrics.get("test")} for r in self.runs]

    def tokenizer(self, task: str):
        """The extraction's tokenizer for ``task`` (byte-level BPE gets a prefix space for words)."""
        if task not in self._tokenizers:
            self._tokenizers[task] = self.recorded.tokenizer(task)
        return self._tokenizers[task]

    # ---- inputs -----------------------------------------------------------------------------

    def encode(self, inputs: list, labels=None) -> Encoded:
        """Strings, or pre-split word lists (a token data set's rows), tokenised as at extraction.
        ``labels``: sequence ids (N,) or per-word tag ids, for scoring against the run's labels."""
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (list, tuple)):
            raise AdlError("pass a list of texts (strings, or lists of words), not a single string")
        words = bool(inputs) and all(isinstance(x, (list, tuple)) for x in inputs)
        if not words and not all(isinstance(x, str) for x in inputs):
            raise AdlError("inputs must all be strings, or all lists of words")
        empty = [i for i, x in enumerate(inputs) if not (x if words else x.strip())]
        if empty:
            raise AdlError(f"input {empty[0]} is empty ({len(empty)} empty in all): drop empty texts first")
        task = "token" if words else "sequence"
        tok = self.tokenizer(task)
        n = len(inputs)
        split = Split("input", None if words else list(inputs), [list(w) for w in inputs] if words else None,
                      labels, np.arange(n, dtype=np.int64))
        ts = tokenize_split(split, task, tok, self.max_length, labeled=labels is not None)
        texts, word_ids, spans = list(inputs) if not words else [], None, None
        if any(r.task == "token" for r in self.runs):
            if words:
                joined = [joined_spans(list(w)) for w in inputs]
                texts, spans = [t for t, _ in joined], [s for _, s in joined]
                word_ids = [ts.word_ids[ts.offsets[i]:ts.offsets[i + 1]] for i in range(n)]
            else:
                enc = tok(list(inputs), truncation=True, max_length=self.max_length, return_offsets_mapping=True)
                word_ids = [np.array([-1 if w is None else w for w in enc.word_ids(i)]) for i in range(n)]
                spans = [token_spans(word_ids[i], enc["offset_mapping"][i]) for i in range(n)]
        elif words:
            texts = [" ".join(w) for w in inputs]
        return Encoded(ts, texts, word_ids, spans)

    # ---- the pass ---------------------------------------------------------------------------

    def forward(self, enc: Encoded, heads: list[str] | None = None, *, return_backbone: bool = False,
                return_embedding: bool = False, on_rows: OnRows | None = None) -> Prediction:
        """Run the backbone once over ``enc`` in length-bucketed batches; raw logits per head.

        ``on_rows(rows, pred)`` is called after each backbone batch with the input positions it
        finished: their logits (and backbone outputs, embeddings) in ``pred`` are final."""
        feeds = [self.feeds[name] for name in self._pick(heads)]
        ts, n = enc.ts, len(enc.ts)
        logits = {f.run.name: [None] * n for f in feeds}
        backbone = [None] * n if return_backbone else None
        embeddings = [None] * n if return_embedding else None
        pred = Prediction({}, backbone, embeddings, ts.truncated, logits)
        pad = models.pad_id(self.tokenizer("token" if ts.word_ids is not None else "sequence"))
        with self._lock, torch.inference_mode():
            for rows in make_batches(ts.lengths, self.batch_size, self.batch_tokens):
                ids, mask = collate(ts, rows, pad)
                ids_t, mask_t = to_device(ids, self.plan), to_device(mask, self.plan)
                output, last = self.taps.run(ids_t, mask_t, feeds, full=return_backbone, last=return_embedding)
                lengths = mask.sum(1)
                for name, out in finish_heads(feeds, mask_t).items():
                    for b, i in enumerate(rows):
                        logits[name][i] = out[b, : lengths[b]] if out.ndim == 3 else out[b]
                if backbone is not None:
                    for b, i in enumerate(rows):
                        backbone[i] = _one_example(output, b, int(lengths[b]), ids.shape)
                if embeddings is not None:
                    emb = embed(self.embedding, last, mask_t).cpu().tolist()
                    for b, i in enumerate(rows):
                        embeddings[i] = emb[b]
                if on_rows is not None:
                    on_rows(rows, pred)
        return pred

    def decode(self, enc: Encoded, pred: Prediction, rows=None) -> Prediction:
        """Fill ``pred.heads`` from its logits, at positions ``rows`` (default: all): labels with
        probabilities, or entity spans. Each input is decoded on its own, so decoding a batch's
        rows as it finishes gives what decoding them all at the end gives."""
        for name, per_input in pred.logits.items():
            run, out = self.feeds[name].run, pred.heads.setdefault(name, [None] * len(per_input))
            for i in range(len(per_input)) if rows is None else rows:
                z = per_input[i]
                out[i] = sequence_prediction(z, run.label_names) if run.task == "sequence" else \
                    {"entities": entities(z, enc.word_ids[i], enc.spans[i], enc.texts[i], run.label_names)}
        return pred

    def __call__(self, texts: list, heads: list[str] | None = None, return_backbone: bool = False,
                 return_embedding: bool = False, on_rows: OnRows | None = None) -> Prediction:
        """Encode, run and decode ``texts``. ``on_rows(rows, pred)`` (see ``forward``) sees each
        batch's inputs decoded too, so a caller can hand them out before the last batch is done."""
        enc = self.encode(texts)

        def finished(rows, pred: Prediction) -> None:
            self.decode(enc, pred, rows)
            if on_rows is not None:
                on_rows(rows, pred)

        return self.forward(enc, heads, return_backbone=return_backbone, return_embedding=return_embedding,
                            on_rows=finished)

    def _pick(self, heads: list[str] | None) -> list[str]:
        if heads is None:
            return self.names
        if isinstance(heads, str):
            heads = [heads]
        unknown = [h for h in heads if h not in self.feeds]
        if unknown:
            raise AdlError(f"no head named {unknown[0]!r}; this predictor has {', '.join(self.names)}")
        return list(dict.fromkeys(heads))


def _one_example(output, b: int, n: int, shape: tuple[int, int]) -> dict:
    """Row b of the model's output, padding removed: (B, T, ...) -> (n, ...), (B, ...) -> (...)."""
    out = {}
    for key, value in output.items():
        if not isinstance(value, torch.Tensor):
            continue  # caches and tuples of attentions are not per-example outputs
        if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(shape):
            out[key] = value[b, :n].cpu()
        elif value.shape[:1] == shape[:1]:
            out[key] = value[b].cpu()
    return out
