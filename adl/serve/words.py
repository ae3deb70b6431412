"""Inputs as the heads' training data was tokenised, and raw texts as the words NER heads tag.

A token data set holds pre-split words, and extraction tokenised them word by word
(``is_split_into_words``; byte-level BPE loaded with a prefix space per word,
``adl.extract.models.load_tokenizer``). A raw text therefore reaches a token head as its
whitespace-separated words tokenised that way (``text_words``), which is how ``Predictor``
(``adl predict``, ``adl serve``) reads it and what ``adl.attach`` checks a user's own tokens
against. Entities are then spans of those words, with character offsets into the text.
"""

from __future__ import annotations

import re

import numpy as np

from adl.extract.datasets import Split
from adl.extract.tokenize import TokenizedSplit, tokenize_split, truncated_rows


def split_words(text: str) -> tuple[list[str], dict[int, tuple[int, int]]]:
    """A raw text as the words a token data set holds: split at whitespace, each word's (start,
    end) in the text. The words of a data set row joined by spaces split back into those words."""
    found = list(re.finditer(r"\S+", text))
    return [m.group() for m in found], {i: m.span() for i, m in enumerate(found)}


def tokenize_inputs(task: str, inputs: list, tok, max_length: int, labels=None) -> tuple[TokenizedSplit, list[int]]:
    """Strings (sequence task) or word lists (token task) tokenised as at extraction, cut at
    ``max_length`` -> (the tokens, the positions of the inputs that were cut)."""
    n = len(inputs)
    split = Split("input", None if task == "token" else inputs, [list(w) for w in inputs] if task == "token"
                  else None, labels, np.arange(n, dtype=np.int64))
    ts = tokenize_split(split, task, tok, max_length, labeled=labels is not None)
    kw = {"is_split_into_words": True} if task == "token" else {}
    return ts, truncated_rows(tok, inputs, ts.lengths, max_length, kw) if ts.truncated else []


def text_words(texts: list[str], tok, max_length: int) -> tuple[TokenizedSplit, list[int], list[dict]]:
    """Raw texts as token heads read them: each text's words (``split_words``) tokenised with the
    token task's tokenizer ``tok`` as at extraction. -> (the tokens, the positions cut at
    max_length, per text: word index -> (start, end) in the text)."""
    split = [split_words(t) for t in texts]
    ts, cut = tokenize_inputs("token", [w for w, _ in split], tok, max_length)
    return ts, cut, [s for _, s in split]


def offset_word_ids(offsets, special, spans: dict[int, tuple[int, int]]) -> np.ndarray:
    """Tokens of some other tokenisation of a text -> the ``split_words`` word each falls in, by its
    character offsets (T, 2); -1 on special tokens (``special`` (T,) true) and empty ones. (T,)"""
    ends = np.array([spans[i][1] for i in range(len(spans))], np.int64)
    out = np.full(len(offsets), -1, np.int64)
    for t, ((a, b), s) in enumerate(zip(offsets, special)):
        if not s and b > a:
            out[t] = min(int(np.searchsorted(ends, a, side="right")), len(ends) - 1)  # first word ending after a
    return out
