"""The peers' learner for adl's one training loop (``adl.train.trainer.fit_all``).

    loss = CE(logits, y) over labelled positions (-100 ignored)      (trainer.objective, no penalties)

``fit_peer`` hands ``fit_all`` a ``PeerLearner``: AdamW on the model's trainable parameters,
one shuffled pass over train per epoch (at most ``max_steps`` optimiser steps), predictions in
each split's order. The loop is the heads': validation scored with ``trainer.score`` (accuracy /
MCC / macro-F1, or entity F1 over words for NER), a copy of the trainable parameters when
validation improves, early stopping after ``patience`` epochs or at ``max_epochs``, the best
copy restored and the test split scored once. The learning rate is constant (a FinetuneConfig
has no lr_patience). Under CUDA fp16 autocast the steps go through the trainer's GradScaler
(``trainer.grad_scaler``, ``trainer.optimizer_step``), as a head's do.

``Forwards`` counts examples through the backbone: every training example each epoch (with a
backward pass), every validation example each epoch, the test split once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from adl.extract.models import DevicePlan
from adl.extract.tokenize import make_batches
from adl.peers.data import PeerData, PeerSplit
from adl.train.trainer import FitResult, fit_all, grad_scaler, objective, optimizer_step


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


class PeerLearner:
    """One peer model as a ``trainer.Learner``: one configuration, so ``keep`` has nothing to do."""

    fix = "lower --lr and rerun with --overwrite"

    def __init__(self, model, data: PeerData, cfg, plan: DevicePlan):
        self.model, self.pad, self.cfg, self.plan = model, data.pad, cfg, plan
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.scaler, self.amp = grad_scaler(plan.kind, plan.autocast), plan.autocast
        self.forwards = Forwards()

    def set_lr(self, lrs: list[float]) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lrs[0]

    def train_epoch(self, split: PeerSplit, batch_size: int, epoch: int) -> list[float]:
        """One shuffled pass (seeded by seed and epoch) -> [the mean loss]."""
        self.model.train()
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(split))
        batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
        total, steps = torch.zeros(()), 0
        for rows in batches[: self.cfg.max_steps]:
            ids, mask, y = split.batch(rows, self.pad)
            if not (y != -100).any():
                continue  # no labelled position: CE would be NaN, nothing to learn
            with self.plan.autocast_context():
                logits = self.model(self._to(ids), self._to(mask))
            loss = objective(logits, self._to(y), {}, {})
            optimizer_step(loss, self.opt, self.scaler)
            self.forwards.add(len(rows), backward=True)
            total += loss.detach().cpu()
            steps += 1
        return [float(total) / max(steps, 1)]

    def predict(self, split: PeerSplit, batch_size: int) -> list[np.ndarray]:
        return [self.predict_final(self.model, split, batch_size)]

    @torch.no_grad()
    def predict_final(self, model, split: PeerSplit, batch_size: int) -> np.ndarray:
        """Class ids in the split's order: (N,) for sequence tasks, flat (total_tokens,) for token tasks."""
        model.eval()
        out = np.zeros(len(split) if split.task == "sequence" else int(split.offsets[-1]), np.int64)
        for rows in make_batches(split.tokens.lengths, batch_size):
            ids, mask, _ = split.batch(rows, self.pad)
            with self.plan.autocast_context():
                logits = model(self._to(ids), self._to(mask))
            pred = logits.argmax(-1).cpu().numpy()  # (B,) or (B, T)
            self.forwards.add(len(rows))
            if split.task == "sequence":
                out[rows] = pred
            else:
                for j, i in enumerate(rows):
                    a, b = split.offsets[i], split.offsets[i + 1]
                    out[a:b] = pred[j, : b - a]
        return out

    def weights(self) -> np.ndarray:
        return np.zeros((1, 0))  # a peer mixes no layers

    def snapshot(self, i: int) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def keep(self, positions: list[int]) -> None:
        pass

    @torch.no_grad()
    def final(self, config: int, state: dict):
        """The model with its best trainable parameters (``snapshot``) restored."""
        for n, p in self.model.named_parameters():
            if n in state:
                p.copy_(state[n])
        return self.model

    def state(self) -> dict:
        return {"model": self.snapshot(0), "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.final(0, state["model"])
        self.opt.load_state_dict(state["opt"])
        self.scaler.load_state_dict(state["scaler"])

    def _to(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.plan.device)


def fit_peer(model, data: PeerData, cfg, plan: DevicePlan, *, on_epoch=None) -> PeerResult:
    """Train ``model`` (a PeerModel on ``plan.device``) with the resolved FinetuneConfig ``cfg``
    through ``fit_all``; a non-finite loss is a TrainingDiverged (an AdlError, one line)."""
    learner, start, to_best = PeerLearner(model, data, cfg, plan), time.perf_counter(), [0.0]

    def on_best(i: int, epoch: int) -> None:
        to_best[0] = time.perf_counter() - start

    result = fit_all(learner, data, [cfg], [model], on_epoch=on_epoch, on_best=on_best)[0]  # one config: never None
    if not isinstance(result, FitResult):
        raise result
    return PeerResult(result.history, result.best_epoch, result.validation, result.test, result.metric,
                      result.stop_reason, time.perf_counter() - start, to_best[0], result.params,
                      learner.forwards)
