"""fit_group(heads, data, cfgs): train G head configurations together, one pass of the data per epoch.

The G heads share a shape (same head type, k, heads, layers_enc, ff, pos_emb, dropout, batch
size, seed: ``group_key``) and differ in per-configuration scalars only (``GROUP_SCALARS``):

    alpha, cutoff   LayerMix buffers, built into each head by its own config
    lam, lasso      loss coefficients, (G,) tensors
    lr, weight_decay    one fused AdamW group pair per distinct (lr, weight decay)
    patience, lr_patience, max_epochs
                    stopping and plateau halving: ``fit_all``'s, per configuration

``Group`` is a learner for ``adl.train.trainer.fit_all``, the loop every head trains with; only
the step differs. The running configurations' parameters live in stacked leaves, one set per
(lr, weight decay) (a grid over one lr has one; a plateau that halves some configurations' lr
regroups them, AdamW moments included), stepped by one public ``torch.optim.AdamW`` (fused)
with a decay / no-decay group pair per set. Each step evaluates the loss of all of them with one
``vmap`` of ``functional_call`` over the stack and backpropagates the sum (the configurations
share no parameters, so each one gets its own gradient). The heads get their weights back
whenever the loop reads them (snapshots, layer weights, the end). Every batch of the cached data
is read once for all G. The mix's per-layer projection of all G is computed outside the vmap as
one GEMM per layer over G*k outputs (``LayerMix.project``, the same function a lone head
uses; W is kept as (L, D, G, k), so the GEMM reads it and its gradient arrives without a
transpose); vmapping it would copy the shared input G times. Heads are built exactly as ``adl train`` builds them
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
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from adl.sweep.config import GROUP_SCALARS
from adl.train.data import SplitData, TrainData
from adl.train.trainer import (
    FitResult,
    Solo,
    TrainingDiverged,
    _autocast,
    amp_dtype,
    fit_all,
    labelled_examples,
    objective,
    param_groups,
    predict_head,
    snapshot,
)

# Per-configuration scalars of a group; every other TrainConfig field splits groups.
NOT_SHAPE = GROUP_SCALARS + ("out", "overwrite")


def group_key(cfg) -> tuple:
    """Configurations with equal keys can be trained together (resolved TrainConfigs)."""
    return tuple((f, getattr(cfg, f)) for f in sorted(vars(cfg)) if f not in NOT_SHAPE)


class _Terms(nn.Module):
    """One ``functional_call`` of a head that returns what a step needs: logits and penalties."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, z, mask, feats=None, what: str = "terms"):
        if what == "weights":
            return self.head.weights()
        logits = self.head(z, mask, feats) if feats is not None else self.head(z, mask)
        if what == "logits":
            return logits
        return logits, self.head.penalties()


def _prefixed(d: dict) -> dict:
    return {"head." + n: t for n, t in d.items()}


class Group:
    """The learner of G configurations: ``heads[r]`` hold each configuration's weights between
    steps; while training, the running ones live in stacked leaves (``_Part``)."""

    fix = Solo.fix
    predict_final = predict_head

    def __init__(self, heads: list[nn.Module], cfgs, device: torch.device):
        self.heads, self.cfgs = [h.to(device) for h in heads], cfgs
        self.terms = _Terms(heads[0])  # the module functional_call runs, with each row's tensors
        mix = getattr(heads[0], "mix", None)
        self.project = mix is not None and mix.fixed_layer is None  # one GEMM for the whole group
        self.names = [n for n, p in heads[0].named_parameters() if p.requires_grad]
        amp = amp_dtype(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.amp = amp if amp == torch.bfloat16 else None
        self.lam = torch.tensor([float(c.lam or 0.0) for c in cfgs], device=device)
        self.lasso = torch.tensor([float(c.lasso or 0.0) for c in cfgs], device=device)
        self.lrs = {r: c.lr for r, c in enumerate(cfgs)}
        self.parts: list[_Part] = []
        self._run(list(range(len(heads))))

    def _dim(self, name: str) -> int:
        """The stacking dim of a parameter: everything is (G, ...) but the mix's W, which the group
        keeps transposed, (L, D, G, k), the layout its GEMM reads and its gradient comes back in
        (``_stacked``)."""
        return 2 if self.project and name == "mix.W" else 0

    def _stacked(self, name: str, ts: list[Tensor]) -> Tensor:
        """Stack the configurations' ``name`` tensors (each shaped as in the head) into the leaf layout."""
        if self._dim(name) == 2:
            return torch.stack([t.transpose(-1, -2) for t in ts], 2)  # (L, k, D) each -> (L, D, G, k)
        return torch.stack(ts)

    def _row(self, name: str, leaf: Tensor, j: int) -> Tensor:
        """Row j of a leaf (or of its optimizer moments), shaped as in the head."""
        return leaf.select(2, j).transpose(-1, -2) if self._dim(name) == 2 else leaf[j]

    def _run(self, rows: list[int], moments: dict | None = None) -> None:
        """Make ``rows`` the running configurations: the weights go back to the heads, then into
        stacked leaves again, one ``_Part`` per (lr, weight decay), so that a grid over one or two
        lrs steps one or two fused AdamW group pairs over stacked tensors; the optimizer moments
        travel with their configuration. The stack runs in part order (``order``); ``back`` maps
        each running row to its place there. What does not train (buffers, frozen parameters such
        as a fixed layer's logits) is stacked once here. ``moments`` (from a checkpoint) stand in
        for the current ones."""
        moments = self._sync() if moments is None else moments
        if not rows:  # every configuration stopped: the heads hold the weights, nothing steps any more
            self.parts, self.rows, self.order, self.back = [], [], [], []
            return
        key = {r: (self.lrs[r], self.cfgs[r].weight_decay) for r in rows}
        self.parts = [_Part([r for r in rows if key[r] == k], {}) for k in dict.fromkeys(key.values())]
        self.rows, self.order = rows, [r for part in self.parts for r in part.rows]
        self.back = [self.order.index(r) for r in rows]
        hs = [self.heads[r] for r in self.order]
        frozen = [n for n, p in hs[0].named_parameters() if not p.requires_grad]
        self.fixed = {n: torch.stack([h.get_parameter(n).detach() for h in hs]) for n in frozen}
        self.fixed.update({n: torch.stack([h.get_buffer(n) for h in hs]) for n, _ in hs[0].named_buffers()})
        idx = torch.tensor(self.order, device=self.lam.device)
        self._lam, self._lasso = self.lam[idx], self.lasso[idx]
        groups = []
        for part in self.parts:
            part.leaves.update({n: nn.Parameter(self._stacked(n, [self.heads[r].get_parameter(n).detach()
                                                                  for r in part.rows])) for n in self.names})
            lr, wd = key[part.rows[0]]
            groups += [{**g, "lr": lr} for g in param_groups(part.leaves.items(), wd)]  # a lone head's decay rule
        self.opt = torch.optim.AdamW(groups, lr=groups[0]["lr"], fused=True)
        if moments:  # carry each configuration's AdamW moments over (the public state_dict route)
            owner = {id(t): (part, n) for part in self.parts for n, t in part.leaves.items()}
            state, leaves = {}, [leaf for g in self.opt.param_groups for leaf in g["params"]]
            for i, leaf in enumerate(leaves):
                part, name = owner[id(leaf)]
                ms = [moments.get(r, {}).get(name) for r in part.rows]
                if all(m is not None for m in ms):  # a leaf that never had a gradient has no moments
                    state[i] = {"step": ms[0]["step"].clone(),
                                **{k: self._stacked(name, [m[k] for m in ms]) for k in MOMENTS}}
            self.opt.load_state_dict({**self.opt.state_dict(), "state": state})

    @torch.no_grad()
    def _sync(self, only: int | None = None) -> dict:
        """Copy the stacked leaves back into the heads (or into head ``only``); returns each row's
        AdamW state per parameter."""
        moments = {}
        for part in self.parts:
            for n, leaf in part.leaves.items():
                state = self.opt.state.get(leaf)
                for j, r in enumerate(part.rows):
                    if only is not None and r != only:
                        continue
                    self.heads[r].get_parameter(n).copy_(self._row(n, leaf, j))
                    if state:
                        moments.setdefault(r, {})[n] = {"step": state["step"],
                                                        **{k: self._row(n, state[k], j) for k in MOMENTS}}
        return moments

    def _params(self) -> dict[str, Tensor]:
        """The running configurations' trainable parameters, (G, ...): the leaves themselves when
        one part runs, else their concatenation (differentiable). The mix's projection (``PROJ``)
        stays one tensor per part, W as (L, g*k, D), for ``_features``."""
        out = {}
        for n in self.names:
            ts = [p.leaves[n] for p in self.parts]
            if self.project and n in PROJ:
                out[n] = [t.flatten(2, 3).transpose(1, 2) if n == "mix.W" else t for t in ts]  # views
            else:
                out[n] = ts[0] if len(ts) == 1 else torch.cat(ts, self._dim(n))
        return out

    def _features(self, z: Tensor, params: dict) -> Tensor | None:
        """(G, ..., L, k) per-layer features of every running configuration, or None (no shared mix).

        With several parts, whichever is smaller is concatenated: the parts' features when the
        batch has fewer rows than the states are wide (pooled states), else their W."""
        if not self.project:
            return None
        mix = self.heads[self.rows[0]].mix
        W, gamma, beta = (params.get(n, [None] * len(self.parts)) for n in PROJ)

        def features(w, g, b):
            return mix.project(z, w, g, b)

        if len(W) == 1:
            return features(W[0], gamma[0], beta[0])
        if z.shape[:-2].numel() < z.shape[-1]:
            return torch.cat([features(*t) for t in zip(W, gamma, beta)])
        return features(torch.cat(W, 1), *(None if t[0] is None else torch.cat(t) for t in (gamma, beta)))

    def _vmapped(self, fn, params, feats, z, mask, y=None, extra=()):
        """vmap ``fn(params, fixed, *extra, feats, z, mask, y)`` over the running configurations."""
        params = {n: t for n, t in params.items() if not (self.project and n in PROJ)}
        dims = (0, 0) + (0,) * len(extra) + (None if feats is None else 0, None, None, None)
        return vmap(fn, in_dims=dims, randomness="different")(params, self.fixed, *extra, feats, z, mask, y)

    def _call(self, p, f, feat, z, mask, what):
        return functional_call(self.terms, {**_prefixed(p), **_prefixed(f)}, (z, mask, feat, what))

    # ---- the Learner protocol (adl.train.trainer.fit_all) -----------------------------------

    def set_lr(self, lrs: list[float]) -> None:
        if [self.lrs[r] for r in self.rows] == list(lrs):
            return
        self.lrs.update(zip(self.rows, lrs))
        self._run(self.rows)  # a plateau halved some configurations' lr: regroup the leaves

    def train_epoch(self, split: SplitData, batch_size: int, epoch: int) -> list[float]:
        for h in self.heads:
            h.train()
        def loss(p, f, lam, lasso, feat, z, mask, y):
            logits, penalties = self._call(p, f, feat, z, mask, "terms")
            return objective(logits, y, penalties, {"lam": lam, "lasso": lasso})

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
        return (total.cpu().double() / max(steps, 1))[self.back].tolist()

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
            pred = logits.argmax(-1)[self.back]  # (G, B) or (G, B, T), in the order of rows
            for i in range(len(self.rows)):
                outs[i].append(pred[i][b.mask] if split.task == "token" else pred[i])
        return [torch.cat(o).cpu().numpy() for o in outs]

    @torch.no_grad()
    def weights(self) -> np.ndarray:
        self._sync()
        return np.stack([self.heads[r].weights().float().cpu().numpy() for r in self.rows])

    def snapshot(self, i: int) -> dict:
        self._sync(only=self.rows[i])
        return snapshot(self.heads[self.rows[i]])

    def keep(self, positions: list[int]) -> None:
        self._run([self.rows[p] for p in positions])

    def final(self, config: int, state: dict) -> nn.Module:
        self.heads[config].load_state_dict(state)  # a stopped configuration: no longer in the stacked leaves
        return self.heads[config]

    def state(self) -> dict:
        """The running configurations' weights and AdamW moments (per configuration, so a
        checkpoint does not depend on how the leaves are parted) and every lr."""
        moments = self._sync()
        return {"rows": list(self.rows), "lrs": dict(self.lrs), "moments": moments,
                "heads": {r: self.heads[r].state_dict() for r in self.rows}}

    def load_state(self, state: dict) -> None:
        for r, sd in state["heads"].items():
            self.heads[r].load_state_dict(sd)
        self.lrs.update(state["lrs"])
        self.parts = []
        self._run(state["rows"], moments=state["moments"])


MOMENTS = ("exp_avg", "exp_avg_sq")
PROJ = ("mix.W", "mix.gamma", "mix.beta")  # the mix's per-layer projection, computed outside the vmap


@dataclass
class _Part:
    rows: list[int]  # the configurations stacked in these leaves, in order
    leaves: dict[str, nn.Parameter]  # name -> (len(rows), ...) or, for the mix's W, (L, D, len(rows), k)


def fit_group(heads: list[nn.Module], data: TrainData, cfgs, *, on_epoch=None, on_done=None, checkpoint=None,
              resume=None) -> list[FitResult | TrainingDiverged | None]:
    """Train ``heads[i]`` with ``cfgs[i]`` (resolved TrainConfigs with one ``group_key``) together.

    ``on_epoch(i, row)``, ``on_done(i, result)``, ``checkpoint`` and ``resume`` as in ``fit_all``.
    Returns one FitResult per configuration (heads[i] holds its restored best weights), or a
    TrainingDiverged for a configuration whose loss became non-finite (None: finished before
    the ``resume`` point).
    """
    if len({group_key(c) for c in cfgs}) != 1 or len(heads) != len(cfgs) or not heads:
        raise ValueError("fit_group needs one head per config and configs that share group_key")  # a bug
    with _vmap_friendly():
        return fit_all(Group(heads, cfgs, data.train.device), data, cfgs, heads, on_epoch=on_epoch, on_done=on_done,
                       checkpoint=checkpoint, resume=resume)


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
