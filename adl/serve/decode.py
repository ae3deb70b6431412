"""Logits -> predictions: a label with its probabilities, or entity spans in the input text.

NER heads tag each word on its first sub-token (as in training). Word tags become entities
by the conlleval chunk rules (``tag_spans``), the scheme the head was selected on: seqeval's
default mode in ``adl.train.metrics.token_metrics``, where an I-X after O or after another type
starts a new entity. The rules are written here rather than imported from seqeval because any
import under ``seqeval.metrics`` loads scikit-learn and SciPy (seconds at every start of
``adl predict``); tests/test_decode.py checks them against seqeval's ``get_entities``. Spans are character offsets into the input text: for a raw string,
from the fast tokenizer's offsets of the word's sub-tokens; for pre-split words, into the
words joined by single spaces.
"""

from __future__ import annotations

import numpy as np


def sequence_prediction(logits: np.ndarray, label_names: list[str]) -> dict:
    """(C,) -> {"label", "probs": {name: p}} (softmax in float64)."""
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    return {"label": label_names[int(logits.argmax())], "probs": {n: float(v) for n, v in zip(label_names, p)}}


def first_subtokens(word_ids: np.ndarray) -> np.ndarray:
    """Positions of each word's first sub-token, in word order; word_ids -1 on special tokens."""
    w = np.asarray(word_ids)
    starts = (w >= 0) & np.concatenate([[True], w[1:] != w[:-1]])
    return np.flatnonzero(starts)


def joined_spans(words: list[str]) -> tuple[str, dict[int, tuple[int, int]]]:
    """Pre-split words -> (the words joined by spaces, word index -> (start, end) in it)."""
    spans, pos = {}, 0
    for i, w in enumerate(words):
        spans[i] = (pos, pos + len(w))
        pos += len(w) + 1
    return " ".join(words), spans


def token_spans(word_ids: np.ndarray, offsets) -> dict[int, tuple[int, int]]:
    """word index -> its character span, from its sub-tokens' (start, end) offsets (T, 2)."""
    spans: dict[int, tuple[int, int]] = {}
    for w, (a, b) in zip(np.asarray(word_ids).tolist(), offsets):
        if w >= 0:
            s = spans.get(w, (a, b))
            spans[w] = (min(s[0], a), max(s[1], b))
    return spans


def entities(logits: np.ndarray, word_ids: np.ndarray, spans: dict[int, tuple[int, int]], text: str,
             label_names: list[str]) -> list[dict]:
    """(T, C) token logits of one example -> [{"type", "start", "end", "text"}] (end exclusive):
    one tag per word, on its first sub-token."""
    first = first_subtokens(word_ids)
    pred = logits.argmax(-1)
    tags = [label_names[int(pred[t])] for t in first]
    where = [spans[int(word_ids[t])] for t in first]
    out = []
    for kind, a, b in tag_spans(tags):
        start, end = where[a][0], where[b][1]
        out.append({"type": kind, "start": int(start), "end": int(end), "text": text[start:end]})
    return out


def tag_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Word tags -> entities [(type, first word, last word)] by the conlleval chunk rules.

    A tag is its first letter (B, I, E, S, O) and its type after the first "-" ("O" has type
    "_"). An entity ends before tag t when the previous tag was E or S, a B or I is followed
    by B, S or O, or the type changes after a non-O tag; one starts at t when t is B or S,
    an E or I follows E, S or O, or the type changes on a non-O tag. IOB2 is the special case
    without E and S.
    """
    out, begin, prev_tag, prev_type = [], 0, "O", ""
    for i, chunk in enumerate([*tags, "O"]):
        tag, kind = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        typed = prev_type != kind
        if prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O")) \
                or (prev_tag not in ("O", ".") and typed):
            out.append((prev_type, begin, i - 1))
        if tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I")) or (tag not in ("O", ".") and typed):
            begin = i
        prev_tag, prev_type = tag, kind
    return out


def raw_scores(answer: dict, logits: np.ndarray) -> dict:
    """A sequence head's answer with its logits in place of probabilities ({"label", "scores":
    {name: logit}}, the names in the order of ``probs``); a token head's answer as it is."""
    if "probs" not in answer:
        return answer
    return {"label": answer["label"], "scores": {n: float(v) for n, v in zip(answer["probs"], logits)}}
