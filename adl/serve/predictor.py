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
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from adl.devices import check_device
from adl.errors import AdlError
from adl.extract import models
from adl.extract.loop import to_device
from adl.extract.recorded import check_tokenizer, recorded_backbone
from adl.extract.tokenize import TokenizedSplit, collate, make_batches
from adl.serve.decode import entities, joined_spans, sequence_prediction
from adl.serve.embedding import embed, embedding_spec
from adl.train.rundir import Run, check_same_backbone, load_run
from adl.serve.taps import HeadFeed, LayerTaps, finish_heads
from adl.serve.words import text_words, tokenize_inputs


@dataclass
class Prediction:
    """Per input, in input order."""

    heads: dict[str, list[dict]]
    backbone: list[dict] | None = None  # the model's own output per input: name -> tensor, padding removed
    embeddings: list[list[float]] | None = None  # the backbone's sentence embedding (adl.serve.embedding)
    truncated: int = 0  # inputs cut at max_length
    logits: dict[str, list[np.ndarray]] = field(default_factory=dict)  # (C,) or (T, C) per input
    cut: list[bool] = field(default_factory=list)  # per input: cut at max_length
    # seconds spent tokenising, in the backbone and heads, decoding; padded tokens per backbone batch
    stats: dict = field(default_factory=lambda: {"tokenize_s": 0.0, "forward_s": 0.0, "decode_s": 0.0,
                                                  "batch_tokens": []})


OnRows = Callable[[np.ndarray, Prediction], None]


@dataclass(frozen=True, eq=False)
class Encoded:
    """Tokenised inputs: the extraction's TokenizedSplit plus what NER decoding needs.

    ``ts`` feeds every head, except when raw texts meet both kinds of head and the token
    tokenizer splits them differently from the sequence one (byte-level BPE: a word gets a
    prefix space): then ``token_ts`` feeds the token heads in a second pass, as each was trained."""

    ts: TokenizedSplit
    texts: list[str]  # the inputs as text (pre-split words joined by spaces)
    word_ids: list[np.ndarray] | None  # per input (T,), -1 on special tokens; None: no token head
    spans: list[dict] | None  # per input: word index -> (start, end) in texts[i]
    cut: np.ndarray | None = None  # (N,) bool: inputs cut at max_length
    token_ts: TokenizedSplit | None = None


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
    """Heads of one or more run folders on their shared backbone (head name = run folder name).

    Safe to call from several threads: a call (tokenising included: a fast tokenizer is not
    safe across threads) holds the predictor's lock, so calls run one after another."""

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
        self._tokenizers, self._fingerprints, self._lock = {}, {}, threading.RLock()
        for run in self.runs:  # each head's tokenizer must be the one its cache was extracted with
            check_tokenizer(run.manifest, self.fingerprint(run.task), f"run {run.root}")

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def heads_info(self) -> list[dict]:
        return [{"name": r.name, "task": r.task, "labels": r.label_names, "layers": r.layers,
                 "weights": self.feeds[r.name].head.weights().detach().float().cpu().tolist(),
                 "view": r.info["view"], "metrics": r.metrics.get("test")} for r in self.runs]

    def add(self, path) -> str:
        """Load the head of run folder ``path`` onto this backbone (-> its name); a run on another
        backbone, tokenizer or max_length, or of a name already here, is refused (AdlError)."""
        run = load_run(path)
        with self._lock:
            check_same_backbone([*self.runs, run])
            check_tokenizer(run.manifest, self.fingerprint(run.task), f"run {run.root}")
            self.feeds[run.name] = HeadFeed(run, self.plan.device)
            self.runs = [*self.runs, run]
        return run.name

    def remove(self, name: str) -> None:
        """Unload head ``name`` (the last head stays: a predictor needs one)."""
        with self._lock:
            self._pick([name])
            if len(self.runs) == 1:
                raise AdlError(f"{name} is the only head: load another before unloading it")
            self.runs = [r for r in self.runs if r.name != name]
            del self.feeds[name]

    def tokenizer(self, task: str):
        """The extraction's tokenizer for ``task`` (byte-level BPE gets a prefix space for words)."""
        with self._lock:
            if task not in self._tokenizers:
                self._tokenizers[task] = self.recorded.tokenizer(task)
            return self._tokenizers[task]

    def fingerprint(self, task: str) -> str:
        """``tokenizer(task)``'s ``tokenizer_hash``, computed once: every head of that task checks it."""
        with self._lock:
            if task not in self._fingerprints:
                self._fingerprints[task] = models.tokenizer_hash(self.tokenizer(task))
            return self._fingerprints[task]

    # ---- inputs -----------------------------------------------------------------------------

    def encode(self, inputs: list, labels=None) -> Encoded:
        """Strings, or pre-split word lists (a token data set's rows), tokenised as at extraction.
        ``labels``: sequence ids (N,) or per-word tag ids, for scoring against the run's labels.

        Token heads read a raw text as its words (``split_words``) tokenised with the token
        tokenizer (``is_split_into_words``), as their training data was; sequence heads read it
        whole with the sequence tokenizer."""
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (list, tuple)):
            raise AdlError("pass a list of texts (strings, or lists of words), not a single string")
        words = bool(inputs) and all(isinstance(x, (list, tuple)) for x in inputs)
        if not words and not all(isinstance(x, str) for x in inputs):
            raise AdlError("inputs must all be strings, or all lists of words")
        empty = [i for i, x in enumerate(inputs) if not (x if words else x.strip())]
        if empty:
            raise AdlError(f"input {empty[0]} is empty ({len(empty)} empty in all): drop empty texts first")
        with self._lock:
            return self._encode(list(inputs), words, labels)

    def _tokenize(self, task: str, inputs: list, labels) -> tuple[TokenizedSplit, list[int]]:
        """-> the inputs tokenised as at extraction, and the positions cut at max_length."""
        return tokenize_inputs(task, inputs, self.tokenizer(task), self.max_length, labels)

    def _encode(self, inputs: list, words: bool, labels) -> Encoded:
        n, tasks = len(inputs), {r.task for r in self.runs}
        ts, cut, token_ts, spans = None, [], None, None
        if words:
            ts, cut = self._tokenize("token", inputs, labels)
            joined = [joined_spans(list(w)) for w in inputs]
            texts, spans = [t for t, _ in joined], [s for _, s in joined]
        else:
            texts = inputs
            if "sequence" in tasks:
                ts, cut = self._tokenize("sequence", inputs, labels)
            if "token" in tasks:
                token_ts, token_cut, spans = text_words(inputs, self.tokenizer("token"), self.max_length)
                cut = sorted({*cut, *token_cut})
        words_of = token_ts or ts  # the tokens the word ids index
        word_ids = [words_of.word_ids[words_of.offsets[i]:words_of.offsets[i + 1]] for i in range(n)] \
            if "token" in tasks else None
        if ts is None:
            ts, token_ts = token_ts, None
        elif token_ts is not None and np.array_equal(ts.input_ids, token_ts.input_ids) \
                and np.array_equal(ts.offsets, token_ts.offsets):
            token_ts = None  # the same tokens: one pass serves both kinds of head
        mask = np.zeros(n, bool)
        mask[list(cut)] = True
        return Encoded(ts, texts, word_ids, spans, mask, token_ts)

    # ---- the pass ---------------------------------------------------------------------------

    def forward(self, enc: Encoded, heads: list[str] | None = None, *, return_backbone: bool = False,
                return_embedding: bool = False, on_rows: OnRows | None = None) -> Prediction:
        """Run the backbone once over ``enc`` in length-bucketed batches; raw logits per head.

        ``on_rows(rows, pred)`` is called after each backbone batch with the input positions it
        finished: their logits (and backbone outputs, embeddings) in ``pred`` are final. With a
        second pass for token heads (``Encoded.token_ts``), rows are reported from that pass."""
        names, n = self._pick(heads), len(enc.ts)
        cut = enc.cut.tolist() if enc.cut is not None else [False] * n
        pred = Prediction({}, [None] * n if return_backbone else None, [None] * n if return_embedding else None,
                          int(sum(cut)), {name: [None] * n for name in names}, cut)
        with self._lock, torch.inference_mode():
            if enc.token_ts is None:
                self._pass(enc.ts, names, pred, on_rows)
            else:
                token = [name for name in names if self.feeds[name].task == "token"]
                self._pass(enc.ts, [name for name in names if name not in token], pred, None)
                self._pass(enc.token_ts, token, pred, on_rows, outputs=False)
        return pred

    def _pass(self, ts: TokenizedSplit, names: list[str], pred: Prediction, on_rows: OnRows | None,
              outputs: bool = True) -> None:
        """One pass of the backbone over ``ts`` for heads ``names``, into ``pred`` (and, with
        ``outputs``, the model's own output and the embeddings it asks for)."""
        feeds, logits = [self.feeds[name] for name in names], pred.logits
        backbone, embeddings = (pred.backbone, pred.embeddings) if outputs else (None, None)
        pad = models.pad_id(self.tokenizer("token" if ts.word_ids is not None else "sequence"))
        for rows in make_batches(ts.lengths, self.batch_size, self.batch_tokens):
            t0 = time.perf_counter()
            ids, mask = collate(ts, rows, pad)
            ids_t, mask_t = to_device(ids, self.plan), to_device(mask, self.plan)
            output, last = self.taps.run(ids_t, mask_t, feeds, full=backbone is not None, last=embeddings is not None)
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
            pred.stats["forward_s"] += time.perf_counter() - t0
            pred.stats["batch_tokens"].append(int(ids.size))
            if on_rows is not None:
                on_rows(rows, pred)

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
        batch's inputs decoded too, so a caller can hand them out before the last batch is done.
        ``pred.stats`` tells the seconds each step took."""
        with self._lock:
            t0 = time.perf_counter()
            enc = self.encode(texts)
            tokenized = time.perf_counter() - t0

            def finished(rows, pred: Prediction) -> None:
                t = time.perf_counter()
                self.decode(enc, pred, rows)
                pred.stats["decode_s"] += time.perf_counter() - t
                if on_rows is not None:
                    on_rows(rows, pred)

            pred = self.forward(enc, heads, return_backbone=return_backbone, return_embedding=return_embedding,
                                on_rows=finished)
            pred.stats["tokenize_s"] = tokenized
            return pred

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
