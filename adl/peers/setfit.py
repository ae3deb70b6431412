"""SetFit through the ``setfit`` library: contrastive tuning of the sentence body on pairs of
training texts, then a logistic-regression head on its embeddings (Tunstall et al. 2022).

SetFit trains for its fixed budget (``num_epochs`` over ``num_iterations`` pairs per example,
or ``max_steps``) and selects nothing on validation: validation is scored once, like test.
Backbone passes are counted by a forward pre-hook on the body's input embedding layer.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from adl import DIST
from adl.errors import AdlError
from adl.peers.data import PeerData
from adl.peers.loop import Forwards, PeerResult
from adl.train.metrics import selection_metric
from adl.train.trainer import score


def _library():
    try:
        import setfit
    except ImportError as e:
        raise AdlError(f"--method setfit needs the setfit library ({e}): pip install '{DIST}[peers]'") from None
    return setfit


def fit_setfit(model_id: str, data: PeerData, cfg, *, on_epoch=None, revision: str | None = None) -> PeerResult:
    if data.task != "sequence":
        raise AdlError("--method setfit classifies whole texts; this cache is a token task (NER): use full, "
                       "bitfit, lora, prompt or ptuning-bias")
    setfit = _library()
    from datasets import Dataset

    model = setfit.SetFitModel.from_pretrained(model_id, revision=revision)  # the cache's hub commit
    model.model_body.max_seq_length = data.max_length
    forwards, training = Forwards(), [False]
    # sentence-transformers calls the transformer's forward() directly (no hooks run there), but
    # the transformer calls its input embedding layer as a module: count the rows it embeds
    embeddings = model.model_body[0].auto_model.get_input_embeddings()

    def count(module, args):
        forwards.add(int(args[0].shape[0]), backward=training[0] and torch.is_grad_enabled())

    hook = embeddings.register_forward_pre_hook(count)
    train, metric = data.splits["train"], selection_metric(data.task)
    args = setfit.TrainingArguments(batch_size=cfg.batch_size, num_epochs=cfg.max_epochs,
                                    num_iterations=cfg.setfit_iterations, body_learning_rate=cfg.lr,
                                    max_steps=cfg.max_steps or -1, seed=cfg.seed, report_to="none",
                                    eval_strategy="no", save_strategy="no", show_progress_bar=cfg.progress)
    ds = Dataset.from_dict({"text": list(train.raw.texts), "label": [int(y) for y in train.labels]})
    start = time.perf_counter()
    try:
        trainer = setfit.Trainer(model=model, args=args, train_dataset=ds)
        training[0] = True
        trainer.train()
    except (TypeError, AttributeError, ImportError) as e:
        import transformers

        raise AdlError(f"setfit {setfit.__version__} cannot train with transformers {transformers.__version__} "
                       f"({str(e).splitlines()[0]}): install a setfit release that supports it") from None
    finally:
        training[0] = False
    trained = time.perf_counter() - start
    scores = {name: score(_predict(model, data.splits[name], cfg.batch_size), data.splits[name], data.label_names)
              for name in ("validation", "test")}
    hook.remove()
    row = {"epoch": 1, "loss": _embedding_loss(trainer), **{f"val_{k}": v for k, v in scores["validation"].items()
                                               if isinstance(v, (int, float))}, "lr": cfg.lr, "seconds": trained}
    if on_epoch is not None:
        on_epoch(1, row)
    head = model.model_head
    params = sum(p.numel() for p in model.model_body.parameters() if p.requires_grad)
    params += int(np.size(head.coef_) + np.size(head.intercept_)) if hasattr(head, "coef_") else 0
    return PeerResult([row], 1, scores["validation"], scores["test"], metric,
                      "setfit: the library's fixed budget, no validation selection", time.perf_counter() - start,
                      trained, params, forwards)


def _embedding_loss(trainer) -> float:
    """The mean contrastive loss of the body's training, from its Hugging Face trainer's log
    (NaN if this setfit release logs it elsewhere)."""
    state = getattr(getattr(trainer, "st_trainer", None), "state", None)
    for entry in reversed(getattr(state, "log_history", None) or []):
        for key in ("train_loss", "embedding_loss", "loss"):
            if isinstance(entry.get(key), (int, float)):
                return float(entry[key])
    return float("nan")


def _predict(model, split, batch_size: int) -> np.ndarray:
    pred = model.predict(list(split.raw.texts), batch_size=batch_size, as_numpy=True)
    return np.asarray(pred, np.int64)
