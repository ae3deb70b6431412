"""Evaluation metrics for heads: sequence classification, word-level NER, hidden-state variability.

Sequence metrics are plain numpy (from the confusion matrix); token metrics use seqeval in its
default conlleval-compatible mode; ``hidden_state_variability`` is a training-free layer score.
"""

from __future__ import annotations

import warnings

import numpy as np

from adl.errors import AdlError


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true, np.int64).ravel(), np.asarray(y_pred, np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise AdlError(f"{y_true.size} true labels but {y_pred.size} predictions; pass one prediction per example")
    for name, y in (("true labels", y_true), ("predictions", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise AdlError(f"{name} must be class ids in 0..{n_classes - 1}; drop unlabeled (-1) examples first")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with 0 where b == 0 (sklearn's zero_division=0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def matthews_corrcoef(cm: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin 2004) from a confusion matrix; equals the binary MCC for C = 2.

        MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2))

    with t_k true counts (row sums), p_k predicted counts (column sums), c = trace, s = total.
    0 when the denominator is 0 (a constant prediction or a single true class), as in sklearn.
    """
    cm = np.asarray(cm, np.float64)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denom) if denom > 0 else 0.0


def sequence_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict:
    """accuracy, macro_f1, mcc and per_class {name: {precision, recall, f1, support}}.

    macro_f1 averages over the classes present in y_true or y_pred (sklearn's default), so a
    class absent from a small split does not count as an F1 of 0. Zero divisions give 0.
    """
    n = len(label_names)
    cm = confusion_matrix(y_true, y_pred, n)
    if cm.sum() == 0:
        raise AdlError("no labelled examples to score; check that the split has labels")
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support + predicted) > 0
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(label_names)}
    return {"accuracy": float(np.trace(cm) / cm.sum()), "macro_f1": float(f1[present].mean()),
            "mcc": matthews_corrcoef(cm), "per_class": per_class}


def token_metrics(y_true: list[list[str]], y_pred: list[list[str]], *, mode: str | None = None) -> dict:
    """Entity-level precision, recall, f1 (micro), per_type {TYPE: {precision, recall, f1, support}},
    and word-level tag accuracy, from seqeval.

    ``mode=None`` is seqeval's default, compatible with conlleval (the CoNLL scheme): an I-X after
    O or after another type starts a new entity. ``mode="strict"`` applies IOB2 strictly.
    Zero divisions give 0 (no warning).
    """
    from seqeval.metrics import accuracy_score, classification_report
    from seqeval.scheme import IOB2

    if len(y_true) != len(y_pred) or any(len(a) != len(b) for a, b in zip(y_true, y_pred)):
        raise AdlError("true and predicted tag sequences differ in length; align predictions to words first")
    if not any(y_true):
        raise AdlError("no words to score; check that the split has token labels")
    scheme = IOB2 if mode == "strict" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on empty classes; zero_division=0 handles them
        report = classification_report(y_true, y_pred, output_dict=True, zero_division=0, mode=mode, scheme=scheme)
    micro = report["micro avg"]
    per_type = {name: {"precision": float(r["precision"]), "recall": float(r["recall"]),
                       "f1": float(r["f1-score"]), "support": int(r["support"])}
                for name, r in report.items() if not name.endswith(" avg")}
    return {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "f1": float(micro["f1-score"]), "accuracy": float(accuracy_score(y_true, y_pred)),
            "per_type": per_type}


def words_from_tokens(pred: np.ndarray, labels: np.ndarray, offsets: np.ndarray,
                      label_names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Per-sentence word-level (true_tags, pred_tags) from flat sub-token arrays.

    pred: (N_tokens,) predicted ids, or (N_tokens, C) logits (argmax taken).
    labels: (N_tokens,) tag ids on the first sub-token of each word, -100 elsewhere
    (continuation sub-tokens, special tokens); only those positions are words.
    offsets: (n_sentences + 1,) sentence i owns rows offsets[i]:offsets[i+1].
    """
    pred, labels, offsets = np.asarray(pred), np.asarray(labels, np.int64), np.asarray(offsets, np.int64)
    if pred.ndim == 2:
        pred = pred.argmax(-1)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise AdlError(f"predictions {pred.shape} and labels {labels.shape} must both be (N_tokens,)")
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != labels.size \
            or np.any(np.diff(offsets) < 0):
        raise AdlError(f"offsets must rise from 0 to N_tokens={labels.size} (n_sentences + 1 entries); "
                       "pass the cache's offsets for this split")
    names = np.asarray(label_names, dtype=object)
    words = labels != -100
    if np.any(labels[words] < 0) or np.any(labels[words] >= len(names)):
        raise AdlError(f"token labels must be tag ids in 0..{len(names) - 1} or -100")
    true_tags, pred_tags = [], []
    for start, end in zip(offsets[:-1], offsets[1:]):
        keep = words[start:end]
        true_tags.append(names[labels[start:end][keep]].tolist())
        pred_tags.append(names[pred[start:end][keep]].tolist())
    return true_tags, pred_tags


def selection_metric(task: str) -> str:
    """The validation metric that picks checkpoints and sweep points.

    token -> "f1": entity-level F1 over words (CoNLL scheme), never a sub-token accuracy proxy.
    sequence -> "accuracy": the thesis' headline number for IMDB and CoLA; MCC (GLUE's CoLA
    metric) and macro-F1 are reported alongside, and a run may select on them explicitly.
    """
    if task == "token":
        return "f1"
    if task == "sequence":
        return "accuracy"
    raise AdlError(f"unknown task {task!r}; use sequence or token")


def hidden_state_variability(x: np.ndarray, y: np.ndarray) -> float:
    """Xie et al. 2022 (Papyan's NC1): tr(Sigma_W pinv(Sigma_B)) / C; lower = better separated.

    x: (N, D) pooled features of one layer, y: (N,) class ids (C >= 2 distinct classes).
        Sigma_W = 1/N sum_n (x_n - mu_{y_n})(x_n - mu_{y_n})^T
        Sigma_B = 1/C sum_c (mu_c - mu)(mu_c - mu)^T,   mu = mean of all x
    Computed in float64 without forming D x D matrices: with M (C, D) the centred class means,
    Sigma_B = M^T M / C = V diag(s^2 / C) V^T (SVD of M), so
        tr(Sigma_W pinv(Sigma_B)) = sum_j C * ||X_w v_j||^2 / N / s_j^2
    over singular values above the usual pinv tolerance (X_w: within-class centred features).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y).ravel()
    if x.ndim != 2 or x.shape[0] != y.size:
        raise AdlError(f"features must be (N, D) with one label each; got {x.shape} and {y.size} labels")
    classes, y_idx = np.unique(y, return_inverse=True)
    C, N = classes.size, y.size
    if C < 2:
        raise AdlError("hidden-state variability needs at least two classes in the labels")
    counts = np.bincount(y_idx, minlength=C).astype(np.float64)
    means = np.zeros((C, x.shape[1]))
    np.add.at(means, y_idx, x)
    means /= counts[:, None]
    within = x - means[y_idx]
    _, s, vt = np.linalg.svd(means - x.mean(0), full_matrices=False)
    keep = s > s.max() * max(C, x.shape[1]) * np.finfo(np.float64).eps
    if not keep.any():
        return float("inf")  # all class means coincide: no between-class spread at all
    proj = within @ vt[keep].T  # (N, r)
    return float((C * (proj**2).sum(0) / N / s[keep] ** 2).sum() / C)
