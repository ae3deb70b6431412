"""FinetuneConfig: one frozen dataclass for ``adl finetune``, with each method's published defaults.

Every option left None is filled from ``DEFAULTS[method]`` by ``resolve``; ``SOURCES`` says
where each default comes from. The task head (a linear layer on the pooled or per-token
last hidden state) is trained by every method and counted in its trainable parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adl.checks import FRACTION, INT_GE0, INT_GE1, NON_NEGATIVE, POSITIVE, check, choice
from adl.devices import check_device
from adl.errors import AdlError

METHODS = ("full", "bitfit", "lora", "prompt", "ptuning-bias", "setfit")
PROMPT_METHODS = ("prompt", "ptuning-bias")

# batch 32, patience 2-3 and the epoch caps are adl's choices (the papers train for a fixed budget)
DEFAULTS: dict[str, dict] = {
    "full": dict(lr=2e-5, weight_decay=0.01, batch_size=32, max_epochs=5, patience=2),
    "bitfit": dict(lr=1e-3, weight_decay=0.0, batch_size=32, max_epochs=10, patience=3),
    "lora": dict(lr=5e-4, weight_decay=0.01, batch_size=32, max_epochs=10, patience=3, lora_r=8, lora_alpha=8,
                 lora_dropout=0.1),
    "prompt": dict(lr=3e-2, weight_decay=0.0, batch_size=32, max_epochs=10, patience=3, virtual_tokens=20),
    "ptuning-bias": dict(lr=1e-3, weight_decay=0.0, batch_size=32, max_epochs=10, patience=3, virtual_tokens=20,
                         encoder_hidden=128),
    "setfit": dict(lr=2e-5, weight_decay=0.0, batch_size=16, max_epochs=1, patience=1, setfit_iterations=20),
}
SOURCES = {
    "full": "Devlin et al. 2019 (BERT): lr in {5e-5, 3e-5, 2e-5}, 2-4 epochs, AdamW with weight decay 0.01",
    "bitfit": "Ben Zaken et al. 2022 (BitFit): every bias term plus the head, lr in {1e-4, ..., 1e-3}",
    "lora": "Hu et al. 2021 (LoRA), RoBERTa-base on GLUE: r 8, alpha 8, lr 5e-4, on the query and value "
            "projections (PEFT's per-model default targets), dropout 0.1",
    "prompt": "Lester et al. 2021 (prompt tuning): 20 prompt tokens; they used lr 0.3 with Adafactor, adl uses "
              "AdamW at lr 3e-2 (an adaptation, not a published value)",
    "ptuning-bias": "Liu et al. 2021 (P-tuning): 20 virtual tokens from an MLP prompt encoder (PEFT), plus every "
                    "linear-layer bias (the 'P-tuning + bias' of docs/peers.md); the biases' lr is BitFit's 1e-3",
    "setfit": "Tunstall et al. 2022 (SetFit): body lr 2e-5, batch 16, 20 pair iterations, 1 epoch, "
              "logistic-regression head",
}


@dataclass(frozen=True)
class FinetuneConfig:
    """``adl finetune``: a peer method trained on the exact examples of ``cache``."""

    cache: str
    method: str
    out: str | None = None  # default runs/<cache>-<method>-<YYYYmmdd-HHMMSS>
    overwrite: bool = False
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    max_epochs: int | None = None
    patience: int | None = None  # epochs without a better validation score before stopping
    seed: int = 0
    train_limit: int | None = None  # a seeded sample of N training examples, the one `adl train --train-limit` draws
    dropout: float = 0.1  # before the task head
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    virtual_tokens: int | None = None  # prompt / ptuning-bias
    encoder_hidden: int | None = None  # ptuning-bias: the prompt encoder's width
    setfit_iterations: int | None = None  # setfit: pairs drawn per example
    max_steps: int | None = None  # cap on optimiser steps per epoch (setfit: in total); None = all
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        choice("--method", self.method, METHODS)
        check(self, RULES)
        check_device(self.device)
        given = {k for k in ("lora_r", "lora_alpha", "lora_dropout", "virtual_tokens", "encoder_hidden",
                             "setfit_iterations") if getattr(self, k) is not None}
        foreign = sorted(given - set(DEFAULTS[self.method]))
        if foreign:
            raise AdlError(f"--{foreign[0].replace('_', '-')} does not apply to --method {self.method}")


RULES = {**dict.fromkeys(("batch_size", "max_epochs", "patience", "lora_r", "virtual_tokens", "encoder_hidden",
                          "setfit_iterations", "max_steps", "train_limit"), INT_GE1),
         "lr": POSITIVE, "lora_alpha": POSITIVE, "weight_decay": NON_NEGATIVE, "lora_dropout": FRACTION,
         "dropout": FRACTION, "seed": INT_GE0}


def resolve(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with every None filled from the method's defaults."""
    fill = {k: v for k, v in DEFAULTS[cfg.method].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill)
