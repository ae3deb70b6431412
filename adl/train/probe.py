"""fit_probe(head, data, cfg): a linear probe fitted the way a practitioner fits one.

    x = the probe's features (one layer, or all layers concatenated), standardised with the
        training split's mean m and standard deviation s
    p(y | x) = softmax(W (x - m) / s + b), W and b by L2-regularised logistic regression
        (scikit-learn, L-BFGS, solved to convergence), for each C in CS; the C with the best
        validation selection metric wins
    the winner is folded into the probe's Linear: W' = W / s, b' = b - W' m

Features per task: sequence tasks use each labelled example's pooled states (a tokens view is
mean-pooled over real tokens); token tasks use every labelled position (the first sub-token of
each word). Validation and test are scored with the same metrics as every head (word-level
entity F1 for NER), through the probe module itself, so what is reported is what predicts.
One history row per C (``epoch`` = its rank in CS).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from adl.train.data import SplitData, TrainData
from adl.train.heads import LinearProbe, task_input
from adl.train.metrics import selection_metric
from adl.train.trainer import (
    FitResult,
    _scalars,
    evaluate,
    fit,
    snapshot,
    trainable_params,
)

CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried, chosen on validation
MAX_ITER = 2000


def fit_head(head, data: TrainData, cfg, **kw) -> FitResult:
    """The training every head gets: a probe in closed form, any other head with ``trainer.fit``."""
    if isinstance(head, LinearProbe):
        return fit_probe(head, data, cfg, on_epoch=kw.get("on_epoch"))
    return fit(head, data, cfg, **kw)


@torch.no_grad()
def probe_features(head: LinearProbe, split: SplitData) -> tuple[np.ndarray, np.ndarray]:
    """(n, F) float64 features and (n,) labels of the split's labelled examples or positions."""
    xs, ys = [], []
    for b in split.batches(256):
        if split.task == "token":
            keep = b.y != -100
            x, y = b.z[keep], b.y[keep]  # (n, L, D) at labelled first sub-tokens
        else:
            keep = b.y >= 0
            x, y = task_input(b.z, b.mask, "sequence")[keep], b.y[keep]
        xs.append(head.inputs(x).double().cpu())
        ys.append(y.cpu())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def _logistic(x: np.ndarray, y: np.ndarray, C: float):
    """The fitted L2 logistic regression (scikit-learn, imported here: loading a run never needs it)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, max_iter=MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return lr.fit(x, y)


def _fold(head: LinearProbe, lr, mean: np.ndarray, scale: np.ndarray) -> None:
    """Load the fitted regression into ``head.out`` (classes absent from train never win)."""
    coef, bias = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps the logit of classes_[1] only
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, bias[0]])
    W = np.zeros((head.out.out_features, coef.shape[1]))
    b = np.full(head.out.out_features, -1e4)
    W[lr.classes_], b[lr.classes_] = coef / scale, bias - (coef / scale) @ mean
    head.out.weight.copy_(torch.from_numpy(W).to(head.out.weight))
    head.out.bias.copy_(torch.from_numpy(b).to(head.out.bias))


def fit_probe(head: LinearProbe, data: TrainData, cfg, *, on_epoch=None) -> FitResult:
    """Fit ``head`` (see the module docstring); ``on_epoch(0, row)`` after each C."""
    from sklearn.metrics import log_loss

    start, metric = time.perf_counter(), selection_metric(data.task)
    head.to(data.train.device).eval()
    x, y = probe_features(head, data.train)
    mean, scale = x.mean(0), x.std(0) + 1e-8
    x = (x - mean) / scale
    history, best, best_val, best_state, best_epoch = [], -np.inf, None, None, 0
    weights = head.weights().cpu().numpy()
    for epoch, C in enumerate(CS, start=1):
        t0 = time.perf_counter()
        lr = _logistic(x, y, C)
        with torch.no_grad():
            _fold(head, lr, mean, scale)
        val = evaluate(head, data.validation, data.label_names, cfg.batch_size)
        loss = float(log_loss(y, lr.predict_proba(x), labels=lr.classes_))
        row = {"epoch": epoch, "loss": loss, **_scalars(val, "val_"), "C": C, "iterations": int(np.max(lr.n_iter_)),
               "seconds": time.perf_counter() - t0, **{f"w_{l}": float(v) for l, v in zip(data.layers, weights)}}
        history.append(row)
        if val[metric] > best:
            best, best_val, best_state, best_epoch = val[metric], val, snapshot(head), epoch
        if on_epoch is not None:
            on_epoch(0, row)
    head.load_state_dict(best_state)
    test = evaluate(head, data.test, data.label_names, cfg.batch_size) if data.test is not None else None
    return FitResult(history, best_epoch, best_val, test, metric,
                     f"logistic regression (L-BFGS), C={CS[best_epoch - 1]:g} chosen on validation",
                     time.perf_counter() - start, trainable_params(head), [float(v) for v in weights],
                     [int(i) for i in np.flatnonzero(weights > 0)])


@torch.no_grad()
def refit_probe(head: LinearProbe, data: TrainData, C: float) -> None:
    """Fit ``head`` again on train + validation with the C validation chose (standardised with
    the union's mean and standard deviation): the choice is made, so validation becomes data."""
    xs, ys = zip(*(probe_features(head, split) for split in (data.train, data.validation)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    mean, scale = x.mean(0), x.std(0) + 1e-8
    _fold(head, _logistic((x - mean) / scale, y, C), mean, scale)


def chosen_c(result: FitResult) -> float:
    """The C validation chose (the history row of the best 'epoch')."""
    return float(result.history[result.best_epoch - 1]["C"])
