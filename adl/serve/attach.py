"""``adl.attach``: trained heads riding on the user's own calls of their own model object.

    with adl.attach(model, ["runs/sentiment", "runs/ner"]) as heads:
        out = model.generate(**batch)            # or model(**batch), st.encode(texts), pipe(texts)
        pred = heads.results()                   # Predictor's form: pred.heads["sentiment"][i]

The model object may be a transformers model (any head: AutoModel, ...ForSequenceClassification,
...ForConditionalGeneration, ...ForCausalLM), a ``SentenceTransformer`` or a transformers
``pipeline``. Hooks on the stack whose hidden states the runs were extracted from (the encoder
of an encoder-decoder, else the base model) feed the heads during the user's own forward
pass, with the code ``Predictor`` uses (``HeadFeed``): one pass, N heads, nothing run twice.

Which passes count (one row per input row of each):
- a forward of the stack with ``input_ids`` (``inputs_embeds`` alone is refused);
- encoder-decoder ``generate``: the encoder runs once per call, before beams are expanded;
- decoder-only ``generate``: the prompt's pass; decoding steps (a KV cache already holding
  tokens) are skipped.

Rows are right-aligned before the heads see them (left-padded prompts: ``last`` is the last
real token, masks cover the real tokens), and heads, pooling and projection run outside the
caller's autocast and autograd, as extraction computed them.

Token (NER) heads read the caller's own tokens. Where a row's text is known, its entities are
spans of the text's whitespace-separated words, as ``Predictor`` decodes a raw text
(``adl.serve.words``); a row whose tokens are not extraction's for those words says so.

Threads: hooks run in the thread that calls the model, so every thread has its own rows and
its own head state; ``results()`` returns the calling thread's rows.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from adl.errors import AdlError
from adl.serve.attach_checks import Expect, expectations, notes_for, padded_without_mask, run_tokenizer, unwrap
from adl.serve.decode import entities, sequence_prediction
from adl.serve.predictor import Prediction
from adl.train.rundir import check_same_backbone, load_run
from adl.serve.taps import HeadFeed, feed_layer, finish_heads
from adl.serve.words import offset_word_ids, split_words, text_words

_ATTACHED: weakref.WeakSet = weakref.WeakSet()  # stacks with heads attached (attaching twice is refused)
_LOCK = threading.Lock()
OTHER_WORD_TOKENS = ("token heads read words tokenised otherwise than at extraction (each whitespace-separated word "
                     "on its own; byte-level BPE with a prefix space)")


@dataclass
class AttachedPrediction(Prediction):
    """``Prediction`` plus, per row, how its tokenisation differed from the runs' extraction
    (empty when it did not) and the row's text when the wrapper showed it."""

    tokenisation: list[list[str]] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)


@dataclass
class _Row:
    logits: dict[str, np.ndarray]  # (C,) or (n, C) over the row's real tokens
    ids: np.ndarray  # (n,) the row's real token ids
    positions: np.ndarray  # (n,) where they sit in the caller's row
    width: int  # the caller's row length (with padding)
    notes: list[str]
    text: str | None = None


class _Batch:
    """One counted pass: the right-aligned mask and the heads' state, fed layer by layer."""

    def __init__(self, ids: Tensor, mask: Tensor, feeds: list[HeadFeed], notes: list[list[str]]):
        self.ids, self.mask_in, self.notes = ids, mask, notes
        left = bool((mask[:, 1:] > mask[:, :-1]).any())  # a pad before a real token somewhere
        # stable sort of "is padding": real tokens first, in order -> (B, T) gather index
        self.order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices if left else None
        self.mask = mask if self.order is None else mask.gather(1, self.order)
        self.need: dict[int, list[HeadFeed]] = {}
        for f in feeds:
            f.start()
            for layer in f.active:
                self.need.setdefault(layer, []).append(f)
        self.feeds = feeds

    def deliver(self, layer: int, h: Tensor) -> None:
        feeds = self.need.get(layer)
        if not feeds:
            return
        if self.order is not None:
            h = h.gather(1, self.order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        feed_layer(feeds, layer, h, self.mask)

    def rows(self) -> list[_Row]:
        out = finish_heads(self.feeds, self.mask)
        ids, mask = self.ids.cpu().numpy(), self.mask_in.cpu().numpy()
        lengths = self.mask.sum(1).cpu().numpy()
        rows = []
        for b in range(ids.shape[0]):
            pos = np.flatnonzero(mask[b])
            logits = {name: (z[b, : lengths[b]] if z.ndim == 3 else z[b]) for name, z in out.items()}
            rows.append(_Row(logits, ids[b, pos], pos, ids.shape[1], self.notes[b]))
        return rows


class Attached:
    """Heads attached to one model object; see the module docstring. Build with ``adl.attach``."""

    def __init__(self, model, runs, device: str | None = None):
        runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs or [])
        if not runs:
            raise AdlError("adl.attach needs run folders, e.g. adl.attach(model, ['runs/sentiment', 'runs/ner'])")
        self.runs = [load_run(r) for r in runs]
        check_same_backbone(self.runs)
        self.target = unwrap(model, self.runs[0])  # identity checked: config hash, states, tokenizer
        self.model = model
        self.expect: Expect = expectations(self.target, self.runs[0])
        self.device = device or str(next(self.target.model.parameters()).device)
        self.stack = self.target.stack
        self.L = int(self.runs[0].manifest["model"]["num_hidden_states"])
        self.layers = self.target.layers
        self._local = threading.local()
        self._warned: set[str] = set()
        self._handles: list = []
        self._patched: list[tuple[object, str]] = []
        with _LOCK:
            if self.stack in _ATTACHED:
                raise AdlError("heads are already attached to this model: detach them first (or leave their "
                               "`with` block), or attach every run in one adl.attach(model, [run, ...])")
            _ATTACHED.add(self.stack)
        try:
            self._hook()
        except BaseException:
            self.detach()
            raise

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Attached:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove every hook and wrapper: the model is as it was before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for obj, name in self._patched:
            vars(obj).pop(name, None)
        self._patched = []
        with _LOCK:
            _ATTACHED.discard(self.stack)

    # ---- hooks --------------------------------------------------------------------------------

    def _hook(self) -> None:
        add = self._handles.append
        add(self.target.entry.register_forward_pre_hook(self._begin, with_kwargs=True))
        for i in sorted({layer for r in self.runs for layer in r.layers if layer < self.L - 1}):
            add(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        add(self.target.entry.register_forward_hook(self._end))
        for obj, name, wrap in self.target.wrappers(self):
            setattr(obj, name, wrap)  # an instance attribute shadowing the method; detach pops it
            self._patched.append((obj, name))

    def _state(self):
        s = self._local
        if not hasattr(s, "rows"):
            s.rows, s.batch, s.texts = [], None, deque()
            s.feeds = [HeadFeed(run, self.device) for run in self.runs]  # per-thread head state
        return s

    def _begin(self, module, args, kwargs) -> None:
        s = self._state()
        s.batch = None
        given = self.target.inputs(args, kwargs)
        ids, mask = given.get("input_ids"), given.get("attention_mask")
        if ids is None:
            if given.get("inputs_embeds") is not None:
                raise AdlError("adl.attach reads the input ids, and this call passes inputs_embeds only: pass "
                               "input_ids (with attention_mask), or detach the heads for this call")
            return
        past = given.get("cache", given.get("past_key_values"))  # transformers renamed it "cache"
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            return  # a decoding step of generate: the heads read the prompt's pass only
        if mask is None or bool(mask.all()):
            if padded_without_mask(ids, self.target.pad_id):
                raise AdlError("these inputs are padded but the call has no attention mask marking the padding: "
                               "pass attention_mask=... (the tokenizer returns it with padding=True)")
            mask = torch.ones_like(ids) if mask is None else mask
        if mask.dim() != 2:
            raise AdlError(f"adl.attach needs the 2-D (batch, tokens) attention mask, got shape {tuple(mask.shape)}")
        notes = notes_for(ids, mask, given.get("position_ids"), self.expect)
        self._warn(n for row in notes for n in row)
        s.batch = _Batch(ids, mask, s.feeds, notes)

    def _warn(self, notes) -> None:
        """Warn once per kind of tokenisation difference (rows record each in ``.tokenisation``)."""
        for note in dict.fromkeys(notes):
            if note not in self._warned:
                self._warned.add(note)
                warnings.warn(f"adl.attach: {note}; the heads' results record it per row (.tokenisation)",
                              stacklevel=3)

    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            batch = self._local.batch if hasattr(self._local, "batch") else None
            if batch is not None:
                batch.deliver(layer, args[0] if args else kwargs["hidden_states"])
        return hook

    def _end(self, module, args, output) -> None:
        s = self._state()
        batch, s.batch = s.batch, None
        if batch is None:
            return
        batch.deliver(self.L - 1, self.target.last(output))
        rows = batch.rows()
        if len(s.texts) >= len(rows):
            for row in rows:
                row.text = s.texts.popleft()
        s.rows.extend(rows)

    # ---- what the wrappers call ---------------------------------------------------------------

    def saw_texts(self, texts: list) -> None:
        """The wrapper's next rows come from these inputs (strings; anything else is None)."""
        self._state().texts.extend(t if isinstance(t, str) else None for t in texts)

    def reorder(self, start: int, inputs: list) -> None:
        """Put the rows made since ``start`` in the order of ``inputs`` (sentence-transformers
        sorts texts by length inside ``encode``): each row goes to an input with its text."""
        s = self._state()
        rows = s.rows[start:]
        where: dict = {}
        for i, text in enumerate(inputs):
            where.setdefault(text, deque()).append(i)
        index = [where[r.text].popleft() if where.get(r.text) else len(inputs) + j for j, r in enumerate(rows)]
        s.rows[start:] = [r for _, r in sorted(zip(index, rows), key=lambda p: p[0])]

    def one_row_per_prompt(self, start: int, prompts: int) -> None:
        """A decoder-only ``generate`` with beams (or several sequences per prompt) runs its
        prompt pass on each prompt repeated k times in a row: keep the first of each k."""
        s = self._state()
        made = len(s.rows) - start
        if made > prompts and made % prompts == 0:
            s.rows[start:] = s.rows[start :: made // prompts]

    def row_count(self) -> int:
        return len(self._state().rows)

    # ---- results ------------------------------------------------------------------------------

    def results(self) -> AttachedPrediction:
        """Every row this thread's calls fed since the last ``results()``, in input order; clears them."""
        s = self._state()
        rows, s.rows = s.rows, []
        pred = AttachedPrediction({})
        for run in self.runs:  # decoding first: it may add a note to a row
            pred.logits[run.name] = [r.logits[run.name] for r in rows]
            pred.heads[run.name] = [self._decode(run, r) for r in rows]
        pred.tokenisation, pred.texts = [r.notes for r in rows], [r.text for r in rows]
        return pred

    def _decode(self, run, row: _Row) -> dict:
        z = row.logits[run.name]
        if run.task == "sequence":
            return sequence_prediction(z, run.label_names)
        words = self._words(row)
        if words is not None:
            word_ids, spans = words
            return {"entities": entities(z, word_ids, spans, row.text, run.label_names)}
        tags: list = [None] * row.width
        for t, label in zip(row.positions, z.argmax(-1)):
            tags[int(t)] = run.label_names[int(label)]
        return {"tags": tags}

    def _words(self, row: _Row):
        """(word ids (n,), word -> character span) over the row's tokens, the words being the text's
        whitespace-separated ones, as ``Predictor`` reads a raw text (``adl.serve.words``); None when
        the text is unknown or the wrapper's tokenizer does not give the row's ids (per-token tags then).

        Tokens that are extraction's for those words (``text_words``) take their word ids from it.
        Other tokens (a BPE tokenizer without the prefix space extraction gave each word) go to
        the word their characters fall in, and the row records that its tokens differ."""
        if row.text is None:
            return None
        ref = self._word_tokenizer()
        if ref is not None:
            ts, _, spans = text_words([row.text], ref, self.expect.max_length)
            if np.array_equal(ts.input_ids, row.ids):
                return ts.word_ids, spans[0]
        tok = self.target.tokenizer
        if tok is None or not getattr(tok, "is_fast", False):
            return None
        enc = tok(row.text, truncation=True, max_length=len(row.ids), return_offsets_mapping=True,
                  return_special_tokens_mask=True)
        if list(enc["input_ids"]) != row.ids.tolist():
            return None
        if ref is not None and OTHER_WORD_TOKENS not in row.notes:
            row.notes.append(OTHER_WORD_TOKENS)
            self._warn(row.notes)
        spans = split_words(row.text)[1]
        return offset_word_ids(enc["offset_mapping"], enc["special_tokens_mask"], spans), spans

    def _word_tokenizer(self):
        """The token task's tokenizer as extraction loaded it, one per thread (None: not at hand)."""
        s = self._state()
        if not hasattr(s, "word_tokenizer"):
            token_runs = [r for r in self.runs if r.task == "token"]
            s.word_tokenizer = run_tokenizer(token_runs[0]) if token_runs else None
        return s.word_tokenizer


def attach(model, runs, device: str | None = None) -> Attached:
    """Attach the heads of ``runs`` (a run folder or a list of them) to ``model``: a transformers model, a
    SentenceTransformer or a pipeline. Use as a context manager, or call ``.detach()``."""
    return Attached(model, runs, device)
