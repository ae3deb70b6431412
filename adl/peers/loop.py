"""The peers' training loop: AdamW on the trainable parameters, early stopping on validation.

    loss = CE(logits, y) over labelled positions (-100 ignored)

Per epoch: one shuffled pass over train (at most ``max_steps`` optimiser steps), one pass over
validation scored with adl.train.trainer.score (accuracy / MCC / macro-F1, or entity F1 over
words for NER), a copy of the trainable parameters when validation improves. After
``patience`` epochs without a better score, or ``max_epochs``, the best copy is restored and
the test split is scored once. The learning rate is constant (no schedule), as in adl's heads
before a plateau.

``Forwards`` counts examples through the backbone: every training example each epoch (with a
backward pass), every validation example each epoch, the test split once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from adl.errors import AdlError
from adl.extract.tokenize import make_batches
from adl.peers.data import PeerData, PeerSplit
from adl.peers.model import trainable_params
from adl.train.metrics import selection_metric
from adl.train.trainer import score


@dataclass
class Forwards:
    examples: int = 0  # examples through the backbone, any pass
    backward: int = 0  # of which with a backward pass (training)
    batches: int = 0

    def add(self, n: int, backward: bool = False) -> None:
        self.examples += n
        self.backward += n if backward else 0
        self.batches += 1


@dataclass
class PeerResult:
    history: list[dict]
    best_epoch: int
    validation: dict
    test: dict
    metric: str
    stop_reason: str
    seconds: float  # training + evaluation, from the first step to the test pass
    seconds_to_best: float  # from the first step to the end of the selected epoch
    params: int
    forwards: Forwards = field(default_factory=Forwards)


@torch.no_grad()
def predict(model, split: PeerSplit, pad: int, batch_size: int, device: str, autocast, forwards: Forwards) -> np.ndarray:
    """Class ids in the split's order: (N,) for sequence tasks, flat (total_tokens,) for token tasks."""
    model.eval()
    lengths = split.tokens.lengths
    out = np.zeros(len(split) if split.task == "sequence" else int(split.offsets[-1]), np.int64)
    for rows in make_batches(lengths, batch_size):
        ids, mask, _ = split.batch(rows, pad)
        with autocast():
            logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        pred = logits.argmax(-1).cpu().numpy()  # (B,) or (B, T)
        forwards.add(len(rows))
        if split.task == "sequence":
            out[rows] = pred
        else:
            for j, i in enumerate(rows):
                a, b = split.offsets[i], split.offsets[i + 1]
                out[a:b] = pred[j, : b - a]
    return out


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _restore(model, state: dict) -> None:
    for n, p in model.named_parameters():
        if n in state:
            p.copy_(state[n])


def fit_peer(model, data: PeerData, cfg, device: str, autocast, *, on_epoch=None) -> PeerResult:
    """Train ``model`` (a PeerModel on ``device``) with the resolved FinetuneConfig ``cfg``."""
    metric, names = selection_metric(data.task), data.label_names
    train, val = data.splits["train"], data.splits["validation"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    forwards, history = Forwards(), []
    best, best_epoch, best_val, best_state, to_best, stop = -math.inf, 0, None, None, 0.0, "max_epochs"
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        loss = _train_epoch(model, train, data.pad, cfg, epoch, device, autocast, opt, forwards)
        if not math.isfinite(loss):
            raise AdlError(f"training diverged: the loss became {loss} in epoch {epoch} (lr {cfg.lr:g}); "
                           "lower --lr and rerun with --overwrite")
        scores = score(predict(model, val, data.pad, cfg.batch_size, device, autocast, forwards), val, names)
        row = {"epoch": epoch, "loss": loss, **{f"val_{k}": v for k, v in scores.items() if isinstance(v, (int, float))},
               "lr": cfg.lr, "seconds": time.perf_counter() - t0}
        history.append(row)
        if scores[metric] > best:
            best, best_epoch, best_val, best_state = scores[metric], epoch, scores, _snapshot(model)
            to_best = time.perf_counter() - start
        if on_epoch is not None:
            on_epoch(epoch, row)
        if epoch - best_epoch >= cfg.patience:
            stop = f"early stop: no better validation {metric} for {cfg.patience} epochs"
            break
    _restore(model, best_state)
    test_split = data.splits["test"]
    test = score(predict(model, test_split, data.pad, cfg.batch_size, device, autocast, forwards), test_split, names)
    return PeerResult(history, best_epoch, best_val, test, metric, stop, time.perf_counter() - start, to_best,
                      trainable_params(model), forwards)


def _train_epoch(model, split: PeerSplit, pad: int, cfg, epoch: int, device: str, autocast, opt,
                 forwards: Forwards) -> float:
    """One shuffled pass (seeded by seed and epoch) -> the mean loss."""
    model.train()
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(split))
    batches = [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    total, steps = torch.zeros(()), 0
    for rows in batches[: cfg.max_steps]:
        ids, mask, y = split.batch(rows, pad)
        if not (y != -100).any():
            continue  # no labelled position: CE would be NaN, nothing to learn
        with autocast():
            logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), torch.from_numpy(y).to(device).reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        forwards.add(len(rows), backward=True)
        total += loss.detach().cpu()
        steps += 1
    return float(total) / max(steps, 1)
