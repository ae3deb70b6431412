"""Logits -> predictions: a label with its probabilities, or entity spans in the input text.

NER heads tag each word on its first sub-token (as in training). Word tags become entities
with seqeval's ``get_entities`` in its default, conlleval-compatible mode, the scheme the
head was selected on (``adl.train.metrics.token_metrics``): an I-X after O or after another
type starts a new entity. Spans are character offsets into the input text: for a raw string,
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
    from seqeval.metrics.sequence_labeling import get_entities

    first = first_subtokens(word_ids)
    pred = logits.argmax(-1)
    tags = [label_names[int(pred[t])] for t in first]
    where = [spans[int(word_ids[t])] for t in first]
    out = []
    for kind, a, b in get_entities(tags):
        start, end = where[a][0], where[b][1]
        out.append({"type": kind, "start": int(start), "end": int(end), "text": text[start:end]})
    return out


def raw_scores(answer: dict, logits: np.ndarray) -> dict:
    """A sequence head's answer with its logits in place of probabilities ({"label", "scores":
    {name: logit}}, the names in the order of ``probs``); a token head's answer as it is."""
    if "probs" not in answer:
        return answer
    return {"label": answer["label"], "scores": {n: float(v) for n, v in zip(answer["probs"], logits)}}
