"""Metrics against hand-worked examples."""

import math

import numpy as np
import pytest

from adl.errors import AdlError
from adl.train.metrics import (confusion_matrix, hidden_state_variability, matthews_corrcoef, selection_metric,
                               sequence_metrics, token_metrics, words_from_tokens)


def test_binary_metrics_by_hand():
    # TP=3 (1->1), FN=1 (1->0), FP=2 (0->1), TN=4 (0->0)
    y_true = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    y_pred = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    m = sequence_metrics(y_true, y_pred, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.7)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*4*6*5) = 10 / sqrt(600)
    assert m["mcc"] == pytest.approx(10 / math.sqrt(600))
    pos = m["per_class"]["pos"]
    assert pos == pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4})
    neg = m["per_class"]["neg"]
    assert neg == pytest.approx({"precision": 4 / 5, "recall": 4 / 6, "f1": 8 / 11, "support": 6})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 8 / 11) / 2)


def test_three_class_mcc_by_hand():
    # confusion (rows true, cols pred): [[2,1,0],[0,2,1],[1,0,3]]
    pairs = [(0, 0)] * 2 + [(0, 1)] + [(1, 1)] * 2 + [(1, 2)] + [(2, 0)] + [(2, 2)] * 3
    y_true, y_pred = map(np.array, zip(*pairs))
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    # s=10, c=7, t=(3,3,4), p=(3,3,4): (70 - 34) / sqrt((100 - 34)(100 - 34)) = 36/66
    assert matthews_corrcoef(cm) == pytest.approx(36 / 66)
    m = sequence_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["mcc"] == pytest.approx(6 / 11) and m["accuracy"] == pytest.approx(0.7)


def test_degenerate_cases():
    assert sequence_metrics(np.array([0, 1, 1]), np.array([1, 1, 1]), ["a", "b"])["mcc"] == 0.0
    perfect = sequence_metrics(np.array([0, 2, 1]), np.array([0, 2, 1]), ["a", "b", "c"])
    assert perfect["mcc"] == pytest.approx(1.0) and perfect["macro_f1"] == 1.0
    absent = sequence_metrics(np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"])
    assert absent["macro_f1"] == 1.0 and absent["per_class"]["c"]["support"] == 0
    with pytest.raises(AdlError, match="unlabeled"):
        sequence_metrics(np.array([0, -1]), np.array([0, 1]), ["a", "b"])
    with pytest.raises(AdlError, match="one prediction per example"):
        sequence_metrics(np.array([0, 1]), np.array([0]), ["a", "b"])


def test_token_metrics_entity_f1_by_hand():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"]]
    y_pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O"]]
    # true entities: PER(0-1), LOC(3), ORG(1-2); predicted: PER(0-1) ok, ORG(3) wrong, ORG(1) wrong span
    m = token_metrics(y_true, y_pred)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["per_type"]["PER"] == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1})
    assert m["per_type"]["LOC"]["f1"] == 0.0 and m["per_type"]["ORG"]["support"] == 1


def test_token_metrics_conll_scheme_vs_strict():
    # conlleval treats an I-X after O as the start of an entity; strict IOB2 does not
    y_true, y_pred = [["O", "B-PER"]], [["O", "I-PER"]]
    assert token_metrics(y_true, y_pred)["f1"] == 1.0
    assert token_metrics(y_true, y_pred, mode="strict")["f1"] == 0.0
    with pytest.raises(AdlError, match="align"):
        token_metrics([["O", "O"]], [["O"]])


def test_words_from_tokens_alignment():
    names = ["O", "B-PER", "I-PER"]
    # sentence 0: [CLS] Jo ##hn Smith [SEP]; sentence 1: [CLS] hi [SEP]
    labels = np.array([-100, 1, -100, 2, -100, -100, 0, -100])
    pred = np.array([0, 1, 0, 0, 2, 2, 1, 0])
    offsets = np.array([0, 5, 8])
    true_tags, pred_tags = words_from_tokens(pred, labels, offsets, names)
    assert true_tags == [["B-PER", "I-PER"], ["O"]]
    assert pred_tags == [["B-PER", "O"], ["B-PER"]]
    logits = np.eye(3)[pred]  # (N, C) logits give the same answer
    assert words_from_tokens(logits, labels, offsets, names) == (true_tags, pred_tags)
    with pytest.raises(AdlError, match="offsets"):
        words_from_tokens(pred, labels, np.array([0, 5]), names)


def test_selection_metric():
    assert selection_metric("token") == "f1" and selection_metric("sequence") == "accuracy"
    with pytest.raises(AdlError):
        selection_metric("ner")


def _hsv_direct(x, y):
    """tr(Sigma_W pinv(Sigma_B)) / C with explicit D x D matrices."""
    classes = np.unique(y)
    mu = x.mean(0)
    means = np.stack([x[y == c].mean(0) for c in classes])
    within = x - means[np.searchsorted(classes, y)]
    sw = within.T @ within / len(x)
    sb = (means - mu).T @ (means - mu) / len(classes)
    return np.trace(sw @ np.linalg.pinv(sb)) / len(classes)


def test_hidden_state_variability():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [30, 40, 50])
    centers = rng.normal(size=(3, 8)) * 5
    x = centers[y] + rng.normal(size=(len(y), 8))
    separated = hidden_state_variability(x, y)
    assert separated == pytest.approx(_hsv_direct(x, y), rel=1e-8)
    shuffled = hidden_state_variability(x, rng.permutation(y))
    assert separated < shuffled / 10
    assert hidden_state_variability(x.astype(np.float32), y) == pytest.approx(separated, rel=1e-5)
    with pytest.raises(AdlError, match="two classes"):
        hidden_state_variability(x, np.zeros(len(y)))
