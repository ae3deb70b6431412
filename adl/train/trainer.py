"""fit(head, data, cfg) and fit_all(learner, ...): the one training loop, for a head alone and
for a vectorised group of configurations (adl.sweep.group) alike.

    loss = CE(logits, y)                          y = -100 ignored (padding, unlabeled)
         + lam   * Entropy(softmax(alpha p))      heads with a LayerMix (summed over layers)
         + lasso * sum_l ||W_l||_2                head2toe's group lasso

AdamW with the layer logits (``mix.p``, scalar-mix ``s``) in a group without weight decay
(decay would pull the mix back to uniform); ReduceLROnPlateau(factor 0.5, patience
lr_patience) on the validation selection metric; early stopping after ``patience`` epochs
without improvement, counted from the first epoch that scores above 0 (a model that finds no
entity, F1 0, has not started to learn: a slow start, such as fine-tuning at lr 2e-5 on NER,
trains on to ``max_epochs`` instead of stopping at a useless epoch 1); the best epoch's weights
are restored and the test split is scored once.

Selection metric (metrics.selection_metric): sequence tasks -> accuracy (MCC and macro-F1 are
reported too); token tasks -> entity-level F1 over words (first sub-token of each word,
CoNLL scheme, seqeval via metrics.words_from_tokens), never sub-token accuracy.

No host sync inside an epoch: the loss is summed on the device and read once per epoch; a
batch with no labelled position is skipped (decided on the host). A non-finite epoch loss
stops that configuration with ``TrainingDiverged`` (an AdlError; ``fit`` raises it); the
caller has already saved the last good head through ``on_best``.

Mixed precision: ``amp_dtype`` picks bf16 on CUDA GPUs that support it, fp16 (with a
GradScaler) on older ones, and nothing on CPU/MPS, so CPU runs are exact and reproducible.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adl.errors import AdlError
from adl.train.data import SplitData, TrainData
from adl.train.metrics import (
    selection_metric,
    sequence_metrics,
    token_metrics,
    words_from_tokens,
)

NO_DECAY = ("mix.p",)  # layer logits kept out of weight decay (plus scalar-mix's top-level "s")


class TrainingDiverged(AdlError):
    """The loss became NaN or infinite; ``epoch`` and ``best_epoch`` say where."""

    def __init__(self, message: str, epoch: int, best_epoch: int | None):
        super().__init__(message)
        self.epoch, self.best_epoch = epoch, best_epoch


@dataclass
class FitResult:
    history: list[dict]  # one row per epoch: epoch, loss, val_<metric>..., lr, seconds, w_<layer>...
    best_epoch: int
    validation: dict  # full metrics of the best epoch (with per_class / per_type)
    test: dict | None  # full metrics on the test split, scored once after restoring the best weights
    metric: str  # the selection metric's name
    stop_reason: str
    seconds: float
    params: int  # trainable parameters
    weights: list[float] = field(default_factory=list)  # final layer weights (L,)
    active_layers: list[int] = field(default_factory=list)  # indices into data.layers


def amp_dtype(device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype: None off CUDA; bf16 where supported (no scaler needed), else fp16."""
    if device_type != "cuda":
        return None
    return torch.bfloat16 if bf16_supported else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def needs_scaler(device_type: str, amp: torch.dtype | None) -> bool:
    """Loss scaling is needed under fp16 autocast on CUDA only: fp16 gradients underflow to zero;
    bf16 has fp32's exponent range, and fp32 needs none."""
    return device_type == "cuda" and amp == torch.float16


def grad_scaler(device_type: str, amp: torch.dtype | None) -> torch.amp.GradScaler:
    """The GradScaler every learner steps through (``optimizer_step``): enabled by ``needs_scaler``,
    else a pass-through."""
    return torch.amp.GradScaler("cuda" if device_type == "cuda" else "cpu", enabled=needs_scaler(device_type, amp))


def optimizer_step(loss: Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """One step: backward of the scaled loss, the optimizer step on unscaled gradients (skipped
    when they are not finite, with the scale halved), then the scale's update."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def trainable_params(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


def param_groups(named, weight_decay: float) -> list[dict]:
    """AdamW groups of ``named`` ((name, parameter) pairs): layer logits without decay, everything
    else with ``weight_decay``."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (no_decay if name == "s" or name.endswith(NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def coefficients(cfg) -> dict[str, float]:
    """The penalties' coefficients of a resolved config, by the names ``head.penalties()`` uses."""
    return {"lam": float(cfg.lam or 0.0), "lasso": float(cfg.lasso or 0.0)}


def objective(logits: Tensor, y: Tensor, penalties: dict[str, Tensor], coefs: dict) -> Tensor:
    """CE over non-ignored targets + sum of coefs[name] * penalty: lam * entropy (mixing heads),
    lasso * group lasso (head2toe). ``penalties`` is ``head.penalties()``; a coefficient is a
    number, or a (G,)-row tensor under a vectorised sweep's vmap (adl.sweep.group)."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    for name, term in penalties.items():
        c = coefs[name]
        if isinstance(c, Tensor) or c:  # a zero number adds nothing: skip it
            loss = loss + c * term
    return loss


def layer_weights(head: nn.Module) -> np.ndarray:
    """(L,) the head's layer weights on the host (one sync)."""
    return head.weights().detach().float().cpu().numpy()


@torch.no_grad()
def predict(head: nn.Module, split: SplitData, batch_size: int, amp: torch.dtype | None = None) -> np.ndarray:
    """Predicted class ids in cache order: (N,) for sequence tasks, flat (total_tokens,) for tokens."""
    head.eval()
    out = []
    for b in split.batches(batch_size):
        with _autocast(split.device, amp):
            logits = head(b.z, b.mask)
        pred = logits.argmax(-1)
        out.append(pred[b.mask] if split.task == "token" else pred)  # (tokens of the batch,) in order
    return torch.cat(out).cpu().numpy()


def score(pred: np.ndarray, split: SplitData, label_names: list[str]) -> dict:
    """Full metrics of ``pred`` (from ``predict``) against the split's labels."""
    if split.task == "token":
        true_tags, pred_tags = words_from_tokens(pred, split.labels, split.offsets, label_names)
        return token_metrics(true_tags, pred_tags)
    keep = split.labels >= 0
    return sequence_metrics(split.labels[keep], pred[keep], label_names)


def evaluate(head, split: SplitData, label_names, batch_size: int, amp=None) -> dict:
    return score(predict(head, split, batch_size, amp), split, label_names)


def _scalars(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


class Learner(Protocol):
    """G head configurations being trained, of which ``fit_all`` calls the running ones by
    position 0..n-1 (``keep`` narrows them). ``Solo`` is one head with torch's AdamW; a
    vectorised sweep supplies a group (adl.sweep.group); ``adl finetune`` a peer model
    (adl.peers.loop). What is the same for every learner (the epoch loop, the history row,
    plateau halving, early stopping, best-state restore, the final test pass) is ``fit_all``'s.
    ``fix`` ends a diverged run's message: the advice, and ``{kept}`` where the kept head is named."""

    def set_lr(self, lrs: list[float]) -> None: ...  # this epoch's lr of each running configuration
    def train_epoch(self, split: SplitData, batch_size: int, epoch: int) -> list[float]: ...  # mean losses
    def predict(self, split: SplitData, batch_size: int) -> list[np.ndarray]: ...  # class ids, cache order
    def weights(self) -> np.ndarray: ...  # (n, L) layer weights
    def snapshot(self, i: int) -> dict: ...  # a copy of running configuration i's state_dict
    def keep(self, positions: list[int]) -> None: ...  # only these running configurations go on (maybe none)
    def final(self, config: int, state: dict) -> nn.Module: ...  # config (0..G-1, stopped) as a head with state
    def predict_final(self, head: nn.Module, split, batch_size: int) -> np.ndarray: ...  # ``final``'s class ids
    def state(self) -> dict: ...  # what the next epoch needs (weights, optimizer moments), as tensors
    def load_state(self, state: dict) -> None: ...  # continue from ``state()``
    amp: torch.dtype | None  # the autocast dtype its predictions run under
    fix: str


def predict_head(learner, head: nn.Module, split: SplitData, batch_size: int) -> np.ndarray:
    """``predict_final`` of the learners of heads (Solo, the sweep's group): ``predict`` under their amp."""
    return predict(head, split, batch_size, learner.amp)


def snapshot(head: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


class Solo:
    """One head, torch.optim.AdamW (layer logits without decay), fp16 GradScaler under CUDA fp16."""

    fix = "{kept}; lower --lr or raise --cutoff/--weight-decay and rerun with --overwrite"
    predict_final = predict_head

    def __init__(self, head: nn.Module, cfg, device: torch.device):
        self.head, self.cfg = head.to(device), cfg
        self.amp = amp_dtype(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.scaler = grad_scaler(device.type, self.amp)
        self.coefs = coefficients(cfg)
        self.opt = torch.optim.AdamW(param_groups(head.named_parameters(), cfg.weight_decay), lr=cfg.lr)

    def set_lr(self, lrs: list[float]) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lrs[0]

    def train_epoch(self, split: SplitData, batch_size: int, epoch: int) -> list[float]:
        """One pass over the shuffled training split; the mean loss is the epoch's only sync."""
        self.head.train()
        total, steps, has_labels = torch.zeros((), device=split.device), 0, labelled_examples(split)
        for b in split.batches(batch_size, epoch):
            if not has_labels[b.index].any():
                continue  # CE over no position is NaN: not a divergence, nothing to learn
            with _autocast(split.device, self.amp):
                logits = self.head(b.z, b.mask)
            loss = objective(logits, b.y, self.head.penalties(), self.coefs)
            optimizer_step(loss, self.opt, self.scaler)
            total += loss.detach()
            steps += 1
        return [float(total.item()) / max(steps, 1)]

    def predict(self, split: SplitData, batch_size: int) -> list[np.ndarray]:
        return [predict(self.head, split, batch_size, self.amp)]

    def weights(self) -> np.ndarray:
        return layer_weights(self.head)[None]

    def snapshot(self, i: int) -> dict:
        return snapshot(self.head)

    def keep(self, positions: list[int]) -> None:
        pass  # one configuration: fit_all stops when it stops

    def final(self, config: int, state: dict) -> nn.Module:
        self.head.load_state_dict(state)
        return self.head

    def state(self) -> dict:
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self.scaler.load_state_dict(state["scaler"])


def labelled_examples(split: SplitData) -> np.ndarray:
    """(N,) bool, host side: examples with at least one labelled position (a token task's
    sentence may have none; a batch of only such sentences is skipped, with no device sync)."""
    if split.task != "token":
        return split.labels >= 0
    c = np.concatenate([[0], np.cumsum(split.labels != -100)])
    return c[split.offsets[1:]] > c[split.offsets[:-1]]


def fit(head: nn.Module, data: TrainData, cfg, *, on_epoch: Callable[[int, dict], bool | None] | None = None,
        on_best: Callable[[int, int], None] | None = None) -> FitResult:
    """Train ``head`` on ``data`` with ``cfg`` (a resolved TrainConfig); see the module docstring.

    Raises TrainingDiverged when the loss becomes non-finite; ``head`` then holds the last epoch's weights.
    """
    result = fit_all(Solo(head, cfg, data.train.device), data, [cfg], [head], on_epoch=on_epoch, on_best=on_best)[0]
    if isinstance(result, TrainingDiverged):
        raise result
    return result


def fit_all(learner: Learner, data: TrainData, cfgs: list, heads: list[nn.Module], *,
            on_epoch: Callable[[int, dict], bool | None] | None = None,
            on_best: Callable[[int, int], None] | None = None,
            on_done: Callable[[int, "FitResult | TrainingDiverged"], None] | None = None,
            checkpoint: Callable[[int, Callable[[], dict]], None] | None = None,
            resume: dict | None = None) -> list[FitResult | TrainingDiverged | None]:
    """The training loop of every head: ``learner`` trains configurations ``cfgs`` (``heads[i]``
    ends with configuration i's best weights). ``data``: anything with ``train``, ``validation``,
    ``test`` (splits the learner reads and ``score`` scores), ``task``, ``label_names``, ``layers``.

    Per epoch and configuration: train, score validation, step ReduceLROnPlateau (factor 0.5,
    patience ``lr_patience``, on the selection metric; a config whose lr_patience is None keeps
    its lr), write the history row, keep a copy of
    the best state (then ``on_best(i, epoch)``), then ``on_epoch(i, row)``: returning True stops
    configuration i ("pruned"). A configuration stops after ``patience`` epochs without a better
    validation score (once one is above 0), at its ``max_epochs``, or when its loss is not finite (its result is then a
    TrainingDiverged). A configuration that stops is finished at once, while the others train
    on: its best state is restored, the test split scored, and ``on_done(i, result)`` called.
    ``seconds`` (per row and in total) is the wall time divided by the configurations sharing it.

    Then ``checkpoint(epoch, state)``: ``state()`` is everything the loop and the learner carry
    into the next epoch (``LoopState``; plain values and tensors, for ``torch.save``), and
    ``resume=state()`` continues from there exactly as if never stopped (RNG streams included).
    Configurations finished before that epoch come back as None.
    """
    metric = selection_metric(data.task)
    loop = LoopState(cfgs, metric) if resume is None else LoopState.load(resume, cfgs, metric, learner)
    results: list[FitResult | TrainingDiverged | None] = [None] * len(cfgs)
    for epoch in range(loop.epoch + 1, max(c.max_epochs for c in cfgs) + 1):
        t0, rows = time.perf_counter(), loop.rows
        lrs = [loop.lr(r) for r in rows]
        learner.set_lr(lrs)
        losses = learner.train_epoch(data.train, cfgs[0].batch_size, epoch)
        preds = learner.predict(data.validation, cfgs[0].batch_size)
        weights = learner.weights()
        seconds = (time.perf_counter() - t0) / len(rows)
        for i, r in enumerate(rows):
            if loop.step(learner, data, i, r, epoch, losses[i], preds[i], weights[i], lrs[i], seconds, on_best):
                continue
            if on_epoch is not None and on_epoch(r, loop.history[r][-1]):
                loop.stop[r] = "pruned"
            elif loop.best[r] > 0 and epoch - loop.best_epoch[r] >= cfgs[r].patience:
                loop.stop[r] = f"early stop: no better validation {loop.metric} for {cfgs[r].patience} epochs"
            elif epoch >= cfgs[r].max_epochs:
                loop.stop[r] = "max_epochs"
        loop.epoch, loop.rows = epoch, [r for r in rows if loop.stop[r] is None]
        if len(loop.rows) < len(rows):
            learner.keep([rows.index(r) for r in loop.rows])
            for r in rows:
                if loop.stop[r] is not None:
                    results[r] = loop.finish(learner, data, heads, r)
                    if on_done is not None:
                        on_done(r, results[r])
        if not loop.rows:
            break
        if checkpoint is not None:
            checkpoint(epoch, lambda: loop.state(learner))
    return results


class LoopState:
    """What ``fit_all`` carries from one epoch to the next, per configuration r: the stand-in
    optimizer holding its lr and its ReduceLROnPlateau, best score / epoch / validation metrics /
    state, history, stop reason; the running ``rows`` and the last finished ``epoch``."""

    def __init__(self, cfgs: list, metric: str):
        G = len(cfgs)
        self.cfgs, self.metric = cfgs, metric
        torch.manual_seed(cfgs[0].seed)  # the dropout stream
        self.stand_ins = [torch.optim.SGD([torch.zeros(1)], lr=c.lr) for c in cfgs]  # hold each lr
        self.scheds = [None if getattr(c, "lr_patience", None) is None else
                       torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=c.lr_patience)
                       for o, c in zip(self.stand_ins, cfgs)]
        self.best, self.best_epoch, self.best_val = [-math.inf] * G, [0] * G, [None] * G
        self.best_state: list[dict | None] = [None] * G
        self.history, self.stop, self.diverged = [[] for _ in range(G)], [None] * G, [None] * G
        self.rows, self.epoch, self.start = list(range(G)), 0, time.perf_counter()

    def lr(self, r: int) -> float:
        return self.stand_ins[r].param_groups[0]["lr"]

    def step(self, learner, data, i, r, epoch, loss, pred, weights, lr, seconds, on_best) -> bool:
        """Score configuration r's epoch (running position i); True when its loss diverged."""
        if not math.isfinite(loss):
            self.diverged[r] = TrainingDiverged(_diverged_message(loss, epoch, lr, self.best_epoch[r], learner.fix),
                                                epoch, self.best_epoch[r] or None)
            self.stop[r] = "diverged"
            return True
        val = score(pred, data.validation, data.label_names)
        if self.scheds[r] is not None:
            self.scheds[r].step(val[self.metric])
        self.history[r].append({"epoch": epoch, "loss": loss, **_scalars(val, "val_"), "lr": lr, "seconds": seconds,
                                **{f"w_{l}": float(v) for l, v in zip(data.layers, weights)}})
        if val[self.metric] > self.best[r]:
            self.best[r], self.best_epoch[r], self.best_val[r] = val[self.metric], epoch, val
            self.best_state[r] = learner.snapshot(i)
            if on_best is not None:
                on_best(r, epoch)
        return False

    def finish(self, learner, data, heads, r: int) -> "FitResult | TrainingDiverged":
        """Configuration r (stopped, no longer running) with its best state restored and scored on test."""
        if self.diverged[r] is not None:
            return self.diverged[r]
        head = learner.final(r, self.best_state[r])
        self.best_state[r] = None
        test = None if data.test is None else score(learner.predict_final(head, data.test, self.cfgs[r].batch_size),
                                                     data.test, data.label_names)
        w = layer_weights(head)
        return FitResult(self.history[r], self.best_epoch[r], self.best_val[r], test, self.metric, self.stop[r],
                         (time.perf_counter() - self.start) / len(self.cfgs), trainable_params(heads[r]),
                         [float(v) for v in w], [int(j) for j in np.flatnonzero(w > 0)])

    def state(self, learner) -> dict:
        """Plain values and tensors: the loop, the learner (``learner.state()``) and the RNG streams."""
        run = set(self.rows)
        return {"epoch": self.epoch, "rows": list(self.rows),
                "lr": [self.lr(r) for r in range(len(self.cfgs))],
                "sched": [None if s is None else s.state_dict() for s in self.scheds],
                "best": list(self.best), "best_epoch": list(self.best_epoch),
                "best_val": [v if r in run else None for r, v in enumerate(self.best_val)],
                "best_state": [s if r in run else None for r, s in enumerate(self.best_state)],
                "history": [h if r in run else [] for r, h in enumerate(self.history)], "stop": list(self.stop),
                "seconds": time.perf_counter() - self.start, "learner": learner.state(), "rng": rng_state()}

    @classmethod
    def load(cls, state: dict, cfgs: list, metric: str, learner) -> "LoopState":
        loop = cls(cfgs, metric)
        for r, (lr, sched) in enumerate(zip(state["lr"], state["sched"])):
            loop.stand_ins[r].param_groups[0]["lr"] = lr
            if sched is not None:
                loop.scheds[r].load_state_dict(sched)
        for name in ("epoch", "rows", "best", "best_epoch", "best_val", "best_state", "history", "stop"):
            setattr(loop, name, state[name])
        loop.start -= state["seconds"]
        learner.load_state(state["learner"])
        set_rng_state(state["rng"])
        return loop


def rng_state() -> dict:
    """The global torch RNG streams (dropout draws): CPU, and every CUDA device when there is one."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _diverged_message(loss: float, epoch: int, lr: float, best_epoch: int, fix: str) -> str:
    kept = (f"the last good head (epoch {best_epoch}) is kept" if best_epoch
            else "no epoch finished cleanly, so no head was saved")
    return f"training diverged: the loss became {loss} in epoch {epoch} (lr {lr:g}); " + fix.format(kept=kept)
