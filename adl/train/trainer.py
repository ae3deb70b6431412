"""fit(head, data, cfg): one training recipe for every head, read top to bottom.

    loss = CE(logits, y)                          y = -100 ignored (padding, unlabeled)
         + lam   * Entropy(softmax(alpha p))      heads with a LayerMix (summed over layers)
         + lasso * sum_l ||W_l||_2                head2toe's group lasso

AdamW with the layer logits (``mix.p``, scalar-mix ``s``) in a group without weight decay
(decay would pull the mix back to uniform); ReduceLROnPlateau(factor 0.5, patience
lr_patience) on the validation selection metric; early stopping after ``patience`` epochs
without improvement; the best epoch's weights are restored and the test split is scored once.

Selection metric (metrics.selection_metric): sequence tasks -> accuracy (MCC and macro-F1 are
reported too); token tasks -> entity-level F1 over words (first sub-token of each word,
CoNLL scheme, seqeval via metrics.words_from_tokens), never sub-token accuracy.

No host sync inside an epoch: the loss is summed on the device and read once per epoch. A
non-finite epoch loss raises ``TrainingDiverged`` (an AdlError); the caller has already saved
the last good head through ``on_best``.

Mixed precision: ``amp_dtype`` picks bf16 on CUDA GPUs that support it, fp16 (with a
GradScaler) on older ones, and nothing on CPU/MPS, so CPU runs are exact and reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adl.errors import AdlError
from adl.train.data import SplitData, TrainData
from adl.train.metrics import selection_metric, sequence_metrics, token_metrics, words_from_tokens

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


def trainable_params(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


def param_groups(head: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: layer logits without decay, everything else with ``weight_decay``."""
    decay, no_decay = [], []
    for name, p in head.named_parameters():
        if p.requires_grad:
            (no_decay if name == "s" or name.endswith(NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def objective(head: nn.Module, logits: Tensor, y: Tensor, cfg) -> Tensor:
    """CE over non-ignored targets + lam * entropy (mixing heads) + lasso * group lasso (head2toe)."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    if cfg.lam and hasattr(head, "mix"):
        loss = loss + cfg.lam * head.entropy()
    if cfg.lasso and hasattr(head, "group_lasso"):
        loss = loss + cfg.lasso * head.group_lasso()
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


def fit(head: nn.Module, data: TrainData, cfg, *, on_epoch: Callable[[dict, nn.Module], None] | None = None,
        on_best: Callable[[nn.Module, int], None] | None = None) -> FitResult:
    """Train ``head`` on ``data`` with ``cfg`` (a resolved TrainConfig); see the module docstring.

    ``on_epoch(row, head)`` runs after every epoch (live display); ``on_best(head, epoch)`` after
    every improvement (the caller saves the checkpoint).
    """
    device = data.train.device
    torch.manual_seed(cfg.seed)  # dropout stream
    head.to(device)
    amp = amp_dtype(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    opt = torch.optim.AdamW(param_groups(head, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=cfg.lr_patience)
    metric = selection_metric(data.task)
    best, best_epoch, best_state, best_val, history = -math.inf, 0, None, None, []
    start, stop_reason = time.perf_counter(), "max_epochs"
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        loss = _train_epoch(head, data.train, cfg, opt, scaler, amp, epoch)
        if not math.isfinite(loss):
            raise TrainingDiverged(_diverged_message(loss, epoch, lr, best_epoch), epoch, best_epoch or None)
        val = evaluate(head, data.validation, data.label_names, cfg.batch_size, amp)
        sched.step(val[metric])
        w = layer_weights(head)
        row = {"epoch": epoch, "loss": loss, **_scalars(val, "val_"), "lr": lr,
               "seconds": time.perf_counter() - t0, **{f"w_{l}": float(v) for l, v in zip(data.layers, w)}}
        history.append(row)
        if val[metric] > best:
            best, best_epoch, best_val = val[metric], epoch, val
            best_state = copy.deepcopy(head.state_dict())
            if on_best is not None:
                on_best(head, epoch)
        if on_epoch is not None:
            on_epoch(row, head)
        if epoch - best_epoch >= cfg.patience:
            stop_reason = f"early stop: no better validation {metric} for {cfg.patience} epochs"
            break
    head.load_state_dict(best_state)
    test = evaluate(head, data.test, data.label_names, cfg.batch_size, amp) if data.test is not None else None
    w = layer_weights(head)
    return FitResult(history, best_epoch, best_val, test, metric, stop_reason, time.perf_counter() - start,
                     trainable_params(head), [float(v) for v in w], [int(i) for i in np.flatnonzero(w > 0)])


def _train_epoch(head, split: SplitData, cfg, opt, scaler, amp, epoch: int) -> float:
    """One pass over the shuffled training split; returns the mean loss (the epoch's only sync)."""
    head.train()
    total, steps = torch.zeros((), device=split.device), 0
    for b in split.batches(cfg.batch_size, epoch):
        with _autocast(split.device, amp):
            logits = head(b.z, b.mask)
        loss = objective(head, logits, b.y, cfg)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += loss.detach()
        steps += 1
    return float(total.item()) / max(steps, 1)


def _diverged_message(loss: float, epoch: int, lr: float, best_epoch: int) -> str:
    kept = (f"the last good head (epoch {best_epoch}) is kept" if best_epoch
            else "no epoch finished cleanly, so no head was saved")
    return (f"training diverged: the loss became {loss} in epoch {epoch} (lr {lr:g}); {kept}; "
            "lower --lr or raise --cutoff/--weight-decay and rerun with --overwrite")
