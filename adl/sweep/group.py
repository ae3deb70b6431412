"""fit_group(heads, data, cfgs): train G head configurations together, one pass of the data per epoch.

The G heads share a shape (same head type, k, heads, layers_enc, ff, pos_emb, dropout, batch
size, seed: ``group_key``) and differ in per-configuration scalars only (``GROUP_SCALARS``):

    alpha, cutoff   LayerMix buffers, built into each head by its own config
    lam, lasso      loss coefficients, (G,) tensors
    lr, weight_decay, patience, lr_patience, max_epochs
                    one AdamW param group pair per configuration; stopping is ``fit_all``'s

``Group`` is a learner for ``adl.train.trainer.fit_all``, the loop every head trains with; only
the step differs. Each step stacks the running heads' own parameters (``torch.stack``, so the
gradients land in each head's ``.grad``), evaluates the loss of all of them with one ``vmap`` of
``functional_call`` over the stack, backpropagates the sum (the configurations share no
parameters, so each one gets its own gradient) and steps one public ``torch.optim.AdamW``
(fused) whose param groups are the configurations. Every batch of the cached data is read once
for all G. The mix's per-layer projection of all G is computed outside the vmap as one GEMM per
layer over G*k outputs (``heads.layer_features``, the same function a lone head uses); vmapping
it would copy the shared input G times. Heads are built exactly as ``adl train`` builds them
(``torch.manual_seed(seed)`` then ``make_head``), so with the same seed the initial weights
are identical.

Speed: on a CPU the projection GEMM dominates and its FLOPs scale with G, so a group costs
about what G solo runs do (bench/sweep.py); the group saves per-step overhead, data handling
and evaluation passes, which matter most on a GPU.

With dropout 0 a grouped configuration matches the solo run within float tolerance (batched
GEMMs and the fused AdamW round differently). With dropout > 0 the masks are drawn per
configuration under ``vmap(randomness="different")`` from one stream seeded with ``seed``, so
grouped and solo runs agree in distribution, not value. On CUDA the group runs under bf16
autocast where supported and in fp32 otherwise (no fp16 GradScaler here).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from adl.train.data import SplitData, TrainData
from adl.train.heads import layer_features
from adl.train.trainer import (
    FitResult,
    TrainingDiverged,
    _autocast,
    amp_dtype,
    fit_all,
    labelled_examples,
    param_groups,
    snapshot,
)

# Per-configuration scalars of a group; every other TrainConfig field splits groups.
GROUP_SCALARS = ("alpha", "cutoff", "lam", "lasso", "lr", "weight_decay", "patience", "lr_patience", "max_epochs")
NOT_SHAPE = GROUP_SCALARS + ("out", "overwrite")


def group_key(cfg) -> tuple:
    """Configurations with equal keys can be trained together (resolved TrainConfigs)."""
    return tuple((f, getattr(cfg, f)) for f in sorted(vars(cfg)) if f not in NOT_SHAPE)


class _Terms(nn.Module):
    """One ``functional_call`` of a head that returns what a step needs: logits, entropy, lasso."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, z, mask, feats=None, what: str = "terms"):
        if what == "weights":
            return self.head.weights()
        logits = self.head(z, mask, feats) if feats is not None else self.head(z, mask)
        if what == "logits":
            return logits
        zero = logits.new_zeros(())
        ent = self.head.entropy() if hasattr(self.head, "mix") else zero  # as trainer.objective
        lasso = self.head.group_lasso() if hasattr(self.head, "group_lasso") else zero
        return logits, ent, lasso


def _prefixed(d: dict) -> dict:
    return {"head." + n: t for n, t in d.items()}


class Group:
    """The learner of G configurations: ``heads[r]`` hold the parameters, ``rows`` the running ones."""

    def __init__(self, heads: list[nn.Module], cfgs, device: torch.device):
        self.heads = [h.to(device) for h in heads]
        self.terms = _Terms(heads[0])  # the module functional_call runs, with each row's tensors
        mix = getattr(heads[0], "mix", None)
        self.project = mix is not None and mix.fixed_layer is None  # one GEMM for the whole group
        self.names = [n for n, p in heads[0].named_parameters() if p.requires_grad]
        groups = []
        for h, c in zip(heads, cfgs):  # two AdamW groups per configuration: decay, no decay (layer logits)
            groups += param_groups(h, c.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=cfgs[0].lr, fused=True)
        amp = amp_dtype(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.amp = amp if amp == torch.bfloat16 else None
        self.lam = torch.tensor([float(c.lam or 0.0) for c in cfgs], device=device)
        self.lasso = torch.tensor([float(c.lasso or 0.0) for c in cfgs], device=device)
        self._run(list(range(len(heads))))

    def _run(self, rows: list[int]) -> None:
        """Make ``rows`` the running configurations: stack what does not train (buffers, frozen
        parameters such as a fixed layer's logits) once."""
        self.rows = rows
        hs = [self.heads[r] for r in rows]
        frozen = [n for n, p in hs[0].named_parameters() if not p.requires_grad]
        self.fixed = {n: torch.stack([h.get_parameter(n).detach() for h in hs]) for n in frozen}
        self.fixed.update({n: torch.stack([h.get_buffer(n) for h in hs]) for n, _ in hs[0].named_buffers()})
        idx = torch.tensor(rows, device=self.lam.device)
        self._lam, self._lasso = self.lam[idx], self.lasso[idx]

    def _params(self) -> dict[str, Tensor]:
        """The running heads' trainable parameters stacked (G, ...): differentiable, so backward
        fills each head's own ``.grad``. The mix's W is stacked for ``layer_features``: (L, G*k, D)."""
        hs = [self.heads[r] for r in self.rows]
        out = {n: torch.stack([h.get_parameter(n) for h in hs]) for n in self.names if n != "mix.W" or not self.project}
        if self.project:
            out["mix.W"] = torch.stack([h.mix.W for h in hs], dim=1).flatten(1, 2)
        return out

    def _features(self, z: Tensor, params: dict) -> Tensor | None:
        """(G, ..., L, k) per-layer features of every running configuration, or None (no shared mix)."""
        if not self.project:
            return None
        mix = self.heads[self.rows[0]].mix
        gamma = params.get("mix.gamma"), params.get("mix.beta")
        return layer_features(z, params["mix.W"], mix.k, activation=mix.activation, gamma=gamma[0], beta=gamma[1])

    def _vmapped(self, fn, params, feats, z, mask, y=None, extra=()):
        """vmap ``fn(params, fixed, *extra, feats, z, mask, y)`` over the running configurations."""
        params = {n: t for n, t in params.items() if not (self.project and n in ("mix.W", "mix.gamma", "mix.beta"))}
        dims = (0, 0) + (0,) * len(extra) + (None if feats is None else 0, None, None, None)
        return vmap(fn, in_dims=dims, randomness="different")(params, self.fixed, *extra, feats, z, mask, y)

    def _call(self, p, f, feat, z, mask, what):
        return functional_call(self.terms, {**_prefixed(p), **_prefixed(f)}, (z, mask, feat, what))

    # ---- the Learner protocol (adl.train.trainer.fit_all) -----------------------------------

    def set_lr(self, lrs: list[float]) -> None:
        for r, lr in zip(self.rows, lrs):
            for g in self.opt.param_groups[2 * r : 2 * r + 2]:
                g["lr"] = lr

    def train_epoch(self, split: SplitData, batch_size: int, epoch: int) -> list[float]:
        for h in self.heads:
            h.train()
        def loss(p, f, lam, lasso, feat, z, mask, y):
            logits, ent, gl = self._call(p, f, feat, z, mask, "terms")
            ce = F.cross_entropy(logits.float().flatten(0, -2), y.reshape(-1), ignore_index=-100)
            return ce + lam * ent + lasso * gl  # trainer.objective

        total, steps, has_labels = torch.zeros(len(self.rows), device=split.device), 0, labelled_examples(split)
        for b in split.batches(batch_size, epoch):
            if not has_labels[b.index].any():
                continue
            with _autocast(split.device, self.amp):
                params = self._params()
                losses = self._vmapped(loss, params, self._features(b.z, params), b.z, b.mask, b.y,
                                       extra=(self._lam, self._lasso))
            self.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.opt.step()
            total += losses.detach()
            steps += 1
        return (total.cpu().double() / max(steps, 1)).tolist()

    @torch.no_grad()
    def predict(self, split: SplitData, batch_size: int) -> list[np.ndarray]:
        for h in self.heads:
            h.eval()
        outs = [[] for _ in self.rows]
        params = self._params()
        for b in split.batches(batch_size):
            with _autocast(split.device, self.amp):
                feats = self._features(b.z, params)
                logits = self._vmapped(lambda p, f, feat, z, mask, y: self._call(p, f, feat, z, mask, "logits"),
                                       params, feats, b.z, b.mask)
            pred = logits.argmax(-1)  # (G, B) or (G, B, T)
            for i in range(len(self.rows)):
                outs[i].append(pred[i][b.mask] if split.task == "token" else pred[i])
        return [torch.cat(o).cpu().numpy() for o in outs]

    @torch.no_grad()
    def weights(self) -> np.ndarray:
        return np.stack([self.heads[r].weights().float().cpu().numpy() for r in self.rows])

    def snapshot(self, i: int) -> dict:
        return snapshot(self.heads[self.rows[i]])

    def keep(self, positions: list[int]) -> None:
        self._run([self.rows[p] for p in positions])

    def restore(self, configs: list[int], states: list[dict]) -> None:
        for r, state in zip(configs, states):
            self.heads[r].load_state_dict(state)
        if configs:
            self._run(configs)


def fit_group(heads: list[nn.Module], data: TrainData, cfgs, *, on_epoch=None) -> list[FitResult | TrainingDiverged]:
    """Train ``heads[i]`` with ``cfgs[i]`` (resolved TrainConfigs with one ``group_key``) together.

    ``on_epoch(i, row)`` as in ``fit_all`` (True stops configuration i, "pruned"). Returns one
    FitResult per configuration (heads[i] holds its restored best weights), or a
    TrainingDiverged for a configuration whose loss became non-finite.
    """
    if len({group_key(c) for c in cfgs}) != 1 or len(heads) != len(cfgs) or not heads:
        raise ValueError("fit_group needs one head per config and configs that share group_key")  # a bug
    with _vmap_friendly():
        return fit_all(Group(heads, cfgs, data.train.device), data, cfgs, heads, on_epoch=on_epoch)


@contextlib.contextmanager
def _vmap_friendly():
    """Attention through composite ops that vmap batches (the fused CPU kernels and the
    MultiheadAttention/TransformerEncoderLayer inference fast path have no batching rule, so
    torch would loop over G); any remaining fallback warns once per op: silenced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH):
            warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
