"""fit_group(heads, data, cfgs): train G head configurations together, one pass of the data per epoch.

The G heads share a shape (same head type, k, heads, layers_enc, ff, pos_emb, dropout, batch
size, seed: ``group_key``) and differ in per-configuration scalars only:

    alpha, cutoff   LayerMix attributes, set per configuration inside the vmapped call
    lam, lasso      loss coefficients, (G,) tensors
    lr, weight_decay, patience, lr_patience, max_epochs
                    optimiser and stopping state, one per configuration

Their parameters are stacked, leading dimension G (``torch.func.stack_module_state``), and one
step is ``grad`` of sum_g loss_g, the losses coming from a ``vmap`` of the head over the stack
(the configurations share no parameters, so that gradient is each one's own): every batch of
the cached data is read once for all G. The mix's per-layer projection of all G is computed
outside the vmap as one einsum (``grouped_features``): vmapping it would copy the shared input
G times. Each head is built exactly as the solo trainer builds it (``torch.manual_seed(seed)``
then ``make_head``), so with the same seed the initial weights are identical.

Speed: on a CPU the projection GEMM dominates and its FLOPs scale with G, so a group costs
about what G solo runs do (bench/sweep.py); the group saves per-step overhead, data handling
and evaluation passes, which matter most on a GPU.

What mirrors ``trainer.fit`` exactly, per configuration:
- the loss: CE(ignore -100) + lam * entropy (heads with a mix) + lasso * group lasso (head2toe);
- AdamW (betas 0.9/0.999, eps 1e-8, decoupled decay, bias correction; the layer logits in the
  group without decay, chosen by ``trainer.param_groups``): torch's fused AdamW kernel on
  per-configuration views, one call per distinct (lr, weight decay);
- ReduceLROnPlateau(mode max, factor 0.5, patience lr_patience): torch's own class, stepped
  per configuration on a one-parameter stand-in optimiser;
- early stopping, best-epoch snapshot, restore, and one test evaluation (``trainer.score``).

A configuration that stops (early stopping, max_epochs, pruned by ``on_epoch``, or a
non-finite loss) is removed from the stack, so the remaining ones run faster; its best-state
snapshot is kept. With dropout 0 a grouped configuration matches the solo run within float
tolerance (batched GEMMs round differently). With dropout > 0 the masks are drawn per
configuration under ``vmap(randomness="different")`` from one stream seeded with ``seed``, so
grouped and solo runs agree in distribution, not value. On CUDA the group runs under bf16
autocast where supported and in fp32 otherwise (no fp16 GradScaler here).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from adl.train.data import SplitData, TrainData
from adl.train.metrics import selection_metric
from adl.train.sweep import GROUP_SCALARS
from adl.train.trainer import (FitResult, TrainingDiverged, _diverged_message, _scalars, amp_dtype,
                               param_groups, score, trainable_params)

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW defaults, as trainer.fit uses them
# everything in a TrainConfig but the per-configuration scalars fixes the shape, data order or code
NOT_SHAPE = GROUP_SCALARS + ("out", "overwrite")


def group_key(cfg) -> tuple:
    """Configurations with equal keys can be trained together (resolved TrainConfigs)."""
    return tuple((f, getattr(cfg, f)) for f in sorted(vars(cfg)) if f not in NOT_SHAPE)


class _Probe(nn.Module):
    """Wraps a head so one ``functional_call`` returns what a step needs, with per-config alpha/cutoff.

    ``feats`` (this configuration's slice of ``grouped_features``) replaces the mix's per-layer
    projection: computed outside vmap for the whole group, it is one GEMM over G*k outputs
    instead of a vmapped einsum that would copy the shared input G times.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    @property
    def mix(self):
        return getattr(self.head, "mix", None)

    @contextlib.contextmanager
    def _patched(self, alpha: Tensor, cutoff: Tensor, feats: Tensor | None):
        mix = self.mix
        if mix is None:
            yield
            return
        saved = mix.alpha, mix.cutoff
        mix.alpha, mix.cutoff = alpha, cutoff  # 0-d (batched) tensors inside vmap
        if feats is not None:
            mix._project = lambda *args: feats  # instance attribute shadows LayerMix._project
        try:
            yield
        finally:
            mix.alpha, mix.cutoff = saved
            mix.__dict__.pop("_project", None)

    def forward(self, z, mask, alpha, cutoff, feats=None, what: str = "loss_terms"):
        with self._patched(alpha, cutoff, feats):
            if what == "weights":
                return self.head.weights()
            logits = self.head(z, mask)
            if what == "logits":
                return logits
            zero = logits.new_zeros(())
            ent = self.head.entropy() if self.mix is not None else zero  # as trainer.objective
            lasso = self.head.group_lasso() if hasattr(self.head, "group_lasso") else zero
            return logits, ent, lasso


def grouped_features(mix, z: Tensor, W: Tensor, params: dict) -> Tensor:
    """LayerMix._project for the whole group: (..., L, D) -> (G, ..., L, k).

        f_g = N(GELU(Z) W_g^T) (* gamma_g + beta_g)

    ``W`` is the group's projection stored as (G, L, D, k) (each W_g transposed): one
    (N, D) x (D, G*k) GEMM per layer. Bringing W into that (L, D, G*k) layout, and its gradient
    back, moves rows of k contiguous floats; from the (G, L, k, D) stack of the heads it would
    be a full transpose of every W_g, forward and backward, which cost more than the GEMM.
    """
    G, L, D, k = W.shape
    h = F.gelu(z) if mix.activation else z
    lead = h.shape[:-2]
    W = W.permute(1, 2, 0, 3).reshape(L, D, G * k)
    f = torch.bmm(h.reshape(-1, L, D).transpose(0, 1), W).view(L, -1, G, k)  # (L, N, G, k)
    f = F.layer_norm(f, (k,))
    if "mix.gamma" in params:
        f = f * params["mix.gamma"].transpose(0, 1)[:, None] + params["mix.beta"].transpose(0, 1)[:, None]
    return f.permute(2, 1, 0, 3).unflatten(1, lead)  # a view: (G, ..., L, k)


class _Group:
    """The stacked state of the still-running configurations (``rows`` = their indices in 0..G-1).

    Parameters are stacked with the configuration on dim 0; the mix's projection, when the
    group computes it outside vmap (``grouped_features``), is kept transposed: (G, L, D, k).
    """

    def __init__(self, heads: list[nn.Module], cfgs, device):
        self.probe = _Probe(heads[0])
        mix = self.probe.mix
        self.grouped = mix is not None and mix.fixed_layer is None
        named = dict(heads[0].named_parameters())
        no_decay = {id(p) for p in param_groups(heads[0], 0.0)[1]["params"]}
        params, buffers = stack_module_state(heads)
        self.params = {n: params[n].detach() for n in named if named[n].requires_grad}
        self.frozen = {n: params[n].detach() for n in named if not named[n].requires_grad}
        self.buffers = dict(buffers)
        if self.grouped:
            self.params["mix.W"] = self.params["mix.W"].transpose(-1, -2).contiguous()  # (G, L, D, k)
        self.decays = [id(named[n]) not in no_decay for n in self.params]
        self.m = [torch.zeros_like(p) for p in self.params.values()]
        self.v = [torch.zeros_like(p) for p in self.params.values()]
        self.step = 0
        vec = lambda f: torch.tensor([float(getattr(c, f) or 0.0) for c in cfgs], device=device)  # noqa: E731
        self.alpha, self.cutoff, self.lam, self.lasso = vec("alpha"), vec("cutoff"), vec("lam"), vec("lasso")
        self.wd = torch.tensor([c.weight_decay for c in cfgs], dtype=torch.float64)
        self.rows = list(range(len(cfgs)))

    def keep(self, rows: list[int]) -> None:
        """Drop every configuration not in ``rows`` from the stacks."""
        pos = torch.tensor([self.rows.index(r) for r in rows])
        dev = pos.to(self.alpha.device)
        for d in (self.params, self.frozen, self.buffers):
            for n, t in d.items():
                d[n] = t.index_select(0, dev)
        self.m, self.v = [t.index_select(0, dev) for t in self.m], [t.index_select(0, dev) for t in self.v]
        self.alpha, self.cutoff, self.lam, self.lasso = (t.index_select(0, dev) for t in
                                                         (self.alpha, self.cutoff, self.lam, self.lasso))
        self.wd = self.wd.index_select(0, pos)
        self.rows = list(rows)

    def state(self, i: int) -> dict:
        """Configuration ``rows[i]``'s parameters as a head state_dict fragment (copies)."""
        out = {n: t[i].clone() for d in (self.params, self.frozen) for n, t in d.items()}
        if self.grouped:
            out["mix.W"] = out["mix.W"].transpose(-1, -2).contiguous()
        return out

    def _vmapped(self, fn, params, feats, z, mask, y=None, extra=()):
        """vmap ``fn(params, frozen, buffers, alpha, cutoff, *extra, feats, z, mask, y)`` over the group.

        A grouped projection is not passed in: ``feats`` replaces it inside the head."""
        if self.grouped:
            params = {n: t for n, t in params.items() if n != "mix.W"}
        dims = (0,) * (5 + len(extra)) + (None if feats is None else 0, None, None, None)
        return vmap(fn, in_dims=dims, randomness="different")(
            params, self.frozen, self.buffers, self.alpha, self.cutoff, *extra, feats, z, mask, y)

    def features(self, z: Tensor, params: dict) -> Tensor | None:
        return grouped_features(self.probe.mix, z, params["mix.W"], params) if self.grouped else None

    def call(self, z, mask, what: str):
        """(G, ...) logits or layer weights of every running configuration (no grad)."""
        feats = self.features(z, self.params) if what == "logits" else None

        def fn(p, f, b, a, c, feat, z, mask, y):
            return functional_call(self.probe, ({**_prefixed(p), **_prefixed(f)}, _prefixed(b)),
                                   (z, mask, a, c, feat, what))

        return self._vmapped(fn, self.params, feats, z, mask)

    def step_fn(self, n_classes: int):
        """grads, losses = step(z, mask, y): per-configuration gradients (G, ...) and losses (G,).

        The group's total loss sum_g loss_g is differentiated once; the configurations share no
        parameters, so its gradient with respect to the stacked parameters is every
        configuration's own gradient.
        """
        def loss(p, f, b, a, c, lam, lasso, feat, z, mask, y):
            logits, ent, gl = functional_call(self.probe, ({**_prefixed(p), **_prefixed(f)}, _prefixed(b)),
                                              (z, mask, a, c, feat))
            ce = F.cross_entropy(logits.float().reshape(-1, n_classes), y.reshape(-1), ignore_index=-100)
            return ce + lam * ent + lasso * gl  # trainer.objective

        def total(params, z, mask, y):
            losses = self._vmapped(loss, params, self.features(z, params), z, mask, y, extra=(self.lam, self.lasso))
            return losses.sum(), losses

        grad_fn = grad_and_value(total, has_aux=True)

        def step(z, mask, y):
            grads, (_, losses) = grad_fn(self.params, z, mask, y)
            return grads, losses

        return step

    def start_epoch(self, lr: Tensor) -> None:
        """This epoch's per-configuration lr (float64, host): AdamW classes of equal (lr, weight decay)."""
        classes: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(lr.tolist(), self.wd.tolist())):
            classes.setdefault(key, []).append(i)
        self._classes = list(classes.items())
        self._m = [m.unbind(0) for m in self.m]  # per-configuration views, updated in place
        self._v = [v.unbind(0) for v in self.v]
        self._p = [p.unbind(0) for p in self.params.values()]

    def adamw(self, grads: dict) -> None:
        """One torch.optim.AdamW step on every configuration (decoupled weight decay, bias correction):

            p <- p (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
            p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

        through torch's fused AdamW kernel (the one ``AdamW(fused=True)`` calls), once per
        distinct (lr, weight decay) with per-configuration views; the layer logits get no decay.
        The solo trainer runs the single-tensor algorithm: same formula, float rounding apart.
        """
        self.step += 1
        steps = torch.full((), float(self.step), device=self.alpha.device)
        gs = [grads[n].contiguous().unbind(0) for n in self.params]  # the kernel wants dense tensors
        for (lr, wd), rows in self._classes:
            for decays in (True, False):
                idx = [j for j, d in enumerate(self.decays) if d == decays]
                if not idx:
                    continue
                pick = lambda per: [per[j][i] for j in idx for i in rows]  # noqa: E731
                n = len(idx) * len(rows)
                torch._fused_adamw_(pick(self._p), pick(gs), pick(self._m), pick(self._v), [], [steps] * n,
                                    lr=lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=wd if decays else 0.0,
                                    eps=EPS, amsgrad=False, maximize=False)


def _prefixed(d: dict) -> dict:
    return {"head." + n: t for n, t in d.items()}


def _autocast(device: torch.device, amp):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


@torch.no_grad()
def _predict(group: _Group, split: SplitData, batch_size: int, amp) -> list[np.ndarray]:
    """Per running configuration, predicted ids in cache order (as trainer.predict)."""
    group.probe.eval()
    outs = [[] for _ in group.rows]
    for b in split.batches(batch_size):
        with _autocast(split.device, amp):
            pred = group.call(b.z, b.mask, "logits").argmax(-1)  # (G, B) or (G, B, T)
        for i in range(len(group.rows)):
            outs[i].append(pred[i][b.mask] if split.task == "token" else pred[i])
    return [torch.cat(o).cpu().numpy() for o in outs]


def _train_epoch(group: _Group, step, split: SplitData, batch_size: int, epoch: int, amp) -> Tensor:
    """One pass of the shuffled training split for the whole group; (G,) mean losses on the host."""
    group.probe.train()
    total, steps = torch.zeros(len(group.rows), device=split.device), 0
    for b in split.batches(batch_size, epoch):
        with _autocast(split.device, amp):
            grads, loss = step(b.z, b.mask, b.y)
        group.adamw(grads)
        total += loss.detach()
        steps += 1
    return total.cpu().double() / max(steps, 1)


def fit_group(heads: list[nn.Module], data: TrainData, cfgs, *, on_epoch=None) -> list[FitResult | TrainingDiverged]:
    """Train ``heads[i]`` with ``cfgs[i]`` (resolved TrainConfigs with one ``group_key``) together.

    ``on_epoch(i, row)`` runs after every epoch of configuration i with the same row as
    ``trainer.fit`` writes; returning True stops that configuration ("pruned"). Returns one
    FitResult per configuration (its heads[i] holds the restored best weights), or a
    TrainingDiverged for a configuration whose loss became non-finite. ``seconds`` is the
    group's wall time divided by G.
    """
    if len({group_key(c) for c in cfgs}) != 1 or len(heads) != len(cfgs) or not heads:
        raise ValueError("fit_group needs one head per config and configs that share group_key")  # a bug
    with _vmap_friendly():
        return _fit_group(heads, data, cfgs, on_epoch)


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


def _fit_group(heads, data: TrainData, cfgs, on_epoch) -> list:
    device, cfg0, G = data.train.device, cfgs[0], len(cfgs)
    torch.manual_seed(cfg0.seed)  # the dropout stream, as trainer.fit
    for h in heads:
        h.to(device)
    amp = amp_dtype(device.type, device.type == "cuda" and torch.cuda.is_bf16_supported())
    amp = amp if amp == torch.bfloat16 else None
    group = _Group(heads, cfgs, device)
    step = group.step_fn(len(data.label_names))
    stand_ins = [torch.optim.SGD([torch.zeros(1)], lr=c.lr) for c in cfgs]
    scheds = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=c.lr_patience)
              for o, c in zip(stand_ins, cfgs)]
    metric = selection_metric(data.task)
    best = [-math.inf] * G
    best_epoch, best_val, best_state = [0] * G, [None] * G, [None] * G
    history, stop, done = [[] for _ in range(G)], [None] * G, [None] * G
    start = time.perf_counter()
    for epoch in range(1, max(c.max_epochs for c in cfgs) + 1):
        t0 = time.perf_counter()
        lrs = {r: stand_ins[r].param_groups[0]["lr"] for r in group.rows}
        lr = torch.tensor([lrs[r] for r in group.rows], dtype=torch.float64)
        group.start_epoch(lr)
        losses = _train_epoch(group, step, data.train, cfg0.batch_size, epoch, amp)
        preds = _predict(group, data.validation, cfg0.batch_size, amp)
        with torch.no_grad():
            weights = group.call(None, None, "weights").float().cpu().numpy()  # (G, L)
        seconds = (time.perf_counter() - t0) / len(group.rows)
        for i, r in enumerate(group.rows):
            loss = float(losses[i])
            if not math.isfinite(loss):
                done[r] = TrainingDiverged(_diverged_message(loss, epoch, lrs[r], best_epoch[r]), epoch,
                                           best_epoch[r] or None)
                stop[r] = "diverged"
                continue
            val = score(preds[i], data.validation, data.label_names)
            scheds[r].step(val[metric])
            row = {"epoch": epoch, "loss": loss, **_scalars(val, "val_"), "lr": lrs[r], "seconds": seconds,
                   **{f"w_{l}": float(v) for l, v in zip(data.layers, weights[i])}}
            history[r].append(row)
            if val[metric] > best[r]:
                best[r], best_epoch[r], best_val[r], best_state[r] = val[metric], epoch, val, group.state(i)
            if on_epoch is not None and on_epoch(r, row):
                stop[r] = "pruned"
            elif epoch - best_epoch[r] >= cfgs[r].patience:
                stop[r] = f"early stop: no better validation {metric} for {cfgs[r].patience} epochs"
            elif epoch >= cfgs[r].max_epochs:
                stop[r] = "max_epochs"
        running = [r for r in group.rows if stop[r] is None]
        if not running:
            break
        if len(running) < len(group.rows):
            group.keep(running)
    ok = [r for r in range(G) if done[r] is None]
    results = {r: FitResult(history[r], best_epoch[r], best_val[r], None, metric, stop[r], 0.0,
                            trainable_params(heads[r])) for r in ok}
    _finish([heads[r] for r in ok], [best_state[r] for r in ok], [cfgs[r] for r in ok],
            [results[r] for r in ok], data, amp)
    seconds = (time.perf_counter() - start) / G
    for r in ok:
        results[r].seconds = seconds
    return [results.get(r, done[r]) for r in range(G)]


def _finish(heads: list, states: list[dict], cfgs: list, results: list[FitResult], data: TrainData, amp) -> None:
    """Restore each head's best weights, score the test split once (one grouped pass), fill the
    final layer weights and active layers."""
    for head, state in zip(heads, states):
        head.load_state_dict(state, strict=False)  # buffers are constant during training
        head.eval()  # stack_module_state wants one mode
    if heads and data.test is not None:
        preds = _predict(_Group(heads, cfgs, data.train.device), data.test, cfgs[0].batch_size, amp)
        for res, pred in zip(results, preds):
            res.test = score(pred, data.test, data.label_names)
    for head, res in zip(heads, results):
        w = head.weights().detach().float().cpu().numpy()
        res.weights, res.active_layers = [float(v) for v in w], [int(i) for i in np.flatnonzero(w > 0)]
