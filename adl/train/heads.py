"""Heads that map a frozen model's per-layer hidden states to task logits.

Inputs come from the cache, batched by the trainer:

- tokens view: ``z`` (B, T, L, D) float, zero-padded, with ``mask`` (B, T) bool, True on real tokens;
- pooled view: ``z`` (B, L, D), ``mask`` None.

Every head takes ``forward(z, mask)`` and returns (B, n_classes) for sequence tasks or
(B, T, n_classes) for token tasks. Every head exposes ``weights()`` -> (L,) (the layer weights it
uses, so the trainer logs them uniformly), ``entropy()`` -> scalar (0 where there is no mix) and
``penalties()`` -> {coefficient name: scalar}, the regularisers its training objective adds.
Sequence heads other than ``AdaLayersHead`` mean-pool a tokens view over real tokens first.

A head is rebuilt from ``head.spec`` (JSON-ready: name + constructor kwargs) by ``head_from_spec``.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adl.errors import AdlError

TASKS = ("sequence", "token")


def _spec(name: str, args: dict) -> dict:
    """The constructor arguments (``locals()`` at the top of ``__init__``) as a JSON-ready spec
    (numpy scalars become Python numbers via ``tolist``)."""
    args = {k: getattr(v, "tolist", lambda v=v: v)() for k, v in args.items() if k not in ("self", "__class__")}
    return {"name": name, **args}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise AdlError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _layer_index(layer: int, n_layers: int) -> int:
    """Normalise a layer index in [-L, L) to [0, L)."""
    if not -n_layers <= layer < n_layers:
        raise AdlError(f"layer {layer} is out of range for {n_layers} hidden states; use 0..{n_layers - 1}")
    return int(layer) % n_layers


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, T, ...) averaged over real tokens -> (B, ...). ``where`` keeps padding out even if it is NaN."""
    m = mask.reshape(mask.shape + (1,) * (x.dim() - 2))
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    return total / m.sum(1).clamp_min(1).to(x.dtype)


def task_input(z: Tensor, mask: Tensor | None, task: str) -> Tensor:
    """Sequence task + tokens view -> pooled (B, L, D); token task needs the tokens view."""
    if z.dim() == 4:
        if task == "token":
            return z
        return masked_mean(z, mask) if mask is not None else z.mean(1)
    if z.dim() == 3 and task == "sequence":
        return z
    raise AdlError(f"got hidden states of shape {tuple(z.shape)} for a {task} task; token tasks need the "
                   "tokens view (B, T, L, D), sequence tasks the tokens view or a pooled view (B, L, D)")


def layer_features(z: Tensor, W: Tensor, k: int, *, activation: bool = True, gamma: Tensor | None = None,
                   beta: Tensor | None = None) -> Tensor:
    """f_i = N(a(Z_i) W_i^T) for every layer i and each of G stacked projections, as one GEMM per layer.

    z (..., L, D); W (L, G*k, D), i.e. G projections of width k side by side (G = 1 for one head);
    gamma/beta None or (G, L, k) -> (G, ..., L, k), a view. a = GELU unless ``activation`` is
    False (a cache whose tokens were stored after GELU), N = layer norm over k.
    """
    h = F.gelu(z) if activation else z
    lead, (L, D) = h.shape[:-2], h.shape[-2:]
    f = torch.bmm(h.reshape(-1, L, D).transpose(0, 1), W.transpose(1, 2))  # (L, N, G*k)
    f = F.layer_norm(f.unflatten(-1, (-1, k)), (k,))  # (L, N, G, k)
    if gamma is not None:
        f = f * gamma.transpose(0, 1)[:, None] + beta.transpose(0, 1)[:, None]
    return f.permute(2, 1, 0, 3).unflatten(1, lead)


class LayerMix(nn.Module):
    """f_i = N(a(Z_i) W_i^T), w = cutoff(softmax(alpha*p), c), F = sum_i w_i f_i, with a = GELU.

    Shapes: Z (..., L, D) -> F (..., k). ``W`` is one (L, k, D) parameter without bias; N is a
    layer norm over k (no affine parameters unless ``norm_affine``, then per-layer gamma/beta).
    ``p`` (L,) starts at zeros (uniform mix). ``alpha`` and ``cutoff`` are 0-d buffers, so a
    stack of mixes (a vectorised sweep) carries one value per configuration.
    ``activation=False`` skips a: the cache stored its tokens after GELU already.

    Cutoff: entries of s = softmax(alpha*p) with s_i <= c are dropped and the rest renormalised,
    which equals a softmax of alpha*p over the kept layers only. It is computed that way (the
    pruned logits masked to -inf), with no host sync. If every entry would be cut, the largest is
    kept. Gradients: the renormalised weights of the kept layers do not depend on a pruned p_i
    (the softmax normaliser cancels), so the task loss gives a pruned p_i exactly zero gradient
    and its projection W_i none either. The mask is recomputed from p on every call, so a pruned
    layer comes back as soon as s_i rises above c again: through the entropy term (it acts on the
    pre-cutoff softmax, so every p_i gets gradient), through weight decay on p, or because the
    kept logits move (e.g. become more equal, which lowers their log-sum-exp and raises s_i).

    ``fixed_layer=i`` is the single-layer baseline: w is one-hot on i, p is unused and frozen,
    and ``W`` is (1, k, D), layer i's projection only, which IS trained (the reference code ran
    this under no_grad: a random projection).
    """

    def __init__(self, n_layers: int, in_dim: int, k: int, *, alpha: float = 1.0, cutoff: float = 0.0,
                 norm_affine: bool = False, activation: bool = True, fixed_layer: int | None = None):
        super().__init__()
        if n_layers < 1 or in_dim < 1 or k < 1:
            raise AdlError(f"LayerMix needs n_layers, in_dim and k >= 1 (got {n_layers}, {in_dim}, {k}); fix the head size")
        if not 0.0 <= cutoff < 1.0:
            raise AdlError(f"cutoff must be in [0, 1) (got {cutoff}); e.g. --cutoff 0.005")
        if alpha <= 0:
            raise AdlError(f"alpha must be > 0 (got {alpha}); e.g. --alpha 70")
        self.n_layers, self.in_dim, self.k, self.activation = n_layers, in_dim, k, activation
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)
        self.register_buffer("cutoff", torch.tensor(float(cutoff)), persistent=False)
        self.fixed_layer = None if fixed_layer is None else _layer_index(fixed_layer, n_layers)
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per layer
        W = torch.empty(n_layers, k, in_dim).uniform_(-bound, bound)
        n_proj = n_layers
        if self.fixed_layer is not None:  # keep only layer i's projection (drawn as in the full head)
            W, n_proj = W[self.fixed_layer : self.fixed_layer + 1].clone(), 1
        self.W = nn.Parameter(W)
        self.p = nn.Parameter(torch.zeros(n_layers), requires_grad=fixed_layer is None)
        self.gamma = nn.Parameter(torch.ones(n_proj, k)) if norm_affine else None
        self.beta = nn.Parameter(torch.zeros(n_proj, k)) if norm_affine else None
        if self.fixed_layer is not None:
            self.register_buffer("one_hot", F.one_hot(torch.tensor(self.fixed_layer), n_layers).float(),
                                 persistent=False)

    def raw_weights(self) -> Tensor:
        """(L,) softmax(alpha*p) before the cutoff (the one-hot for a fixed layer)."""
        if self.fixed_layer is not None:
            return self.one_hot
        return torch.softmax(self.alpha * self.p, dim=0)

    def weights(self) -> Tensor:
        """(L,) mixing weights after cutoff + renormalisation; sums to 1, no host sync."""
        if self.fixed_layer is not None:
            return self.one_hot
        logits = self.alpha * self.p
        s = torch.softmax(logits, dim=0)
        keep = (s > self.cutoff) | (s == s.max())
        return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=0)

    def entropy(self) -> Tensor:
        """-sum_i s_i log s_i of the pre-cutoff softmax, SUMMED over layers (in [0, log L]).

        The reference code averaged over layers, i.e. its lambda was effectively divided by L:
        its lambda corresponds to lambda / L here.
        """
        if self.fixed_layer is not None:
            return self.p.new_zeros(())
        log_s = torch.log_softmax(self.alpha * self.p, dim=0)
        return -(log_s.exp() * log_s).sum()

    def active_layers(self) -> list[int]:
        """Indices of layers with nonzero weight (host sync: for reporting and inference plans)."""
        return torch.nonzero(self.weights() > 0).flatten().tolist()

    def activate(self, z: Tensor) -> Tensor:
        """a(Z_i): GELU, or nothing when the cache stored its tokens after GELU."""
        return F.gelu(z) if self.activation else z

    def project(self, z: Tensor, W: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None) -> Tensor:
        """f_i = N(a(Z_i) W_i^T) with G projections side by side: z (..., L', D), W (L', G*k, D),
        gamma/beta None or (G, L', k) -> (G, ..., L', k). ``features`` passes this mix's own
        parameters (G = 1); a vectorised sweep passes its G configurations' (adl.sweep.group)."""
        return layer_features(z, W, self.k, activation=self.activation, gamma=gamma, beta=beta)

    def features(self, z: Tensor) -> Tensor:
        """(..., L, D) -> per-layer features f (..., L', k); L' = 1 for a fixed layer."""
        if self.fixed_layer is not None:  # W holds only the chosen layer's projection
            z = z[..., self.fixed_layer : self.fixed_layer + 1, :]
        gamma, beta = (None, None) if self.gamma is None else (self.gamma[None], self.beta[None])
        return self.project(z, self.W, gamma, beta)[0]

    def layer(self, z: Tensor, i: int, *, weight: float | Tensor | None = None, activated: bool = False) -> Tensor:
        """w_i f_i = w_i N(a(Z_i) W_i^T) for layer i alone: z (..., D) -> (..., k). Summed over the
        layers this is ``forward`` (F = sum_i w_i f_i), so inference can feed layers as they finish.

        ``weight``: w_i as the caller computed it (default ``weights()[i]``); ``activated``: z is
        ``activate(Z_i)`` already (inference activates each stored tensor once for every head)."""
        row = 0 if self.fixed_layer is not None else i  # a fixed-layer mix holds one projection
        gamma = None if self.gamma is None else self.gamma[None, row : row + 1]
        beta = None if self.beta is None else self.beta[None, row : row + 1]
        h = z if activated else self.activate(z)
        f = layer_features(h.unsqueeze(-2), self.W[row : row + 1], self.k, activation=False, gamma=gamma,
                           beta=beta)[0].squeeze(-2)
        return (self.weights()[i] if weight is None else weight) * f

    def forward(self, z: Tensor, feats: Tensor | None = None) -> Tensor:
        """(..., L, D) -> (..., k). ``feats``: this mix's ``features(z)`` computed by the caller
        (a vectorised sweep projects all its configurations in one GEMM)."""
        if tuple(z.shape[-2:]) != (self.n_layers, self.in_dim):
            raise AdlError(f"head expects {self.n_layers} hidden states of width {self.in_dim}, got shape "
                           f"{tuple(z.shape)}; build the head from this cache's manifest")
        f = self.features(z) if feats is None else feats
        if self.fixed_layer is not None:
            return f.squeeze(-2)
        return torch.einsum("...lk,l->...k", f, self.weights())


def sinusoidal_positions(max_len: int, dim: int) -> Tensor:
    """(max_len, dim) fixed sin/cos positional embeddings (Vaswani et al.)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


class _MixHead(nn.Module):
    """Shared reporting for heads built on a ``LayerMix`` (attribute ``mix``)."""

    def weights(self) -> Tensor:
        return self.mix.weights()

    def raw_weights(self) -> Tensor:
        return self.mix.raw_weights()

    def entropy(self) -> Tensor:
        return self.mix.entropy()

    def penalties(self) -> dict[str, Tensor]:
        """The objective's regularisers, by the name of their coefficient (``trainer.objective``):
        lam * entropy of the mix's pre-cutoff softmax."""
        return {"lam": self.mix.entropy()}

    def active_layers(self) -> list[int]:
        return self.mix.active_layers()


class AdaLayersHead(_MixHead):
    """LayerMix -> (+ positional embeddings) -> dropout -> task block -> linear.

    sequence: F (B, T, k) -> MultiheadAttention(k, heads) with key padding mask -> masked mean
      over T -> Linear(k, C).
    token: ``layers_enc`` pre-LN TransformerEncoderLayers (norm_first, final LayerNorm) with the
      padding mask -> Linear(k, C) per token.
    ``pos_emb`` adds fixed sinusoidal positions (T <= max_len). ``post_gelu`` applies the
    reference code's extra GELU after the mix (not in the thesis formula; off by default). The
    reference also ran its attention block twice with GELUs around it; that is not repeated here.
    Padded positions are zeroed after the mix, so their contents never reach real outputs.
    """

    def __init__(self, n_layers: int, in_dim: int, n_classes: int, *, task: str, k: int = 64,
                 alpha: float = 70.0, cutoff: float = 0.005, dropout: float = 0.3, heads: int = 16,
                 pos_emb: bool = False, max_len: int = 512, layers_enc: int = 1, ff: int = 2048,
                 norm_affine: bool = False, post_gelu: bool = False, activation: bool = True,
                 fixed_layer: int | None = None):
        super().__init__()
        self.spec = _spec("adalayers" if fixed_layer is None else "single-layer", locals())
        _check_task(task)
        self.task, self.post_gelu = task, post_gelu
        self.mix = LayerMix(n_layers, in_dim, k, alpha=alpha, cutoff=cutoff, norm_affine=norm_affine,
                            activation=activation, fixed_layer=fixed_layer)
        if heads < 1 or k % heads:
            fix = f"e.g. k={heads * math.ceil(k / heads)}" if heads >= 1 else "heads must be >= 1"
            raise AdlError(f"k={k} is not divisible by heads={heads}; make k a multiple of heads ({fix})")
        if pos_emb:
            self.register_buffer("pos", sinusoidal_positions(max_len, k), persistent=False)
        else:
            self.pos = None
        self.dropout = nn.Dropout(dropout)
        if task == "sequence":
            self.attn = nn.MultiheadAttention(k, heads, dropout=dropout, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(k, heads, ff, dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers_enc, norm=nn.LayerNorm(k),
                                                 enable_nested_tensor=False)
        self.out = nn.Linear(k, n_classes)

    def forward(self, z: Tensor, mask: Tensor | None = None, feats: Tensor | None = None) -> Tensor:
        """z (B, T, L, D), mask (B, T) -> (B, C) for sequence, (B, T, C) for token tasks.
        ``feats``: the mix's per-layer features, when the caller computed them (LayerMix.forward)."""
        if z.dim() != 4:
            raise AdlError(f"adalayers needs the tokens view (B, T, L, D), got shape {tuple(z.shape)}; "
                           "use head adalayers-pooled for a pooled view")
        B, T = z.shape[:2]
        mask = torch.ones(B, T, dtype=torch.bool, device=z.device) if mask is None else mask.bool()
        return self.readout(self.mix(z, feats), mask)

    def readout(self, x: Tensor, mask: Tensor) -> Tensor:
        """The task block after the mix: F (B, T, k), mask (B, T) bool -> logits (inference feeds
        F accumulated layer by layer)."""
        T = x.shape[1]
        if self.post_gelu:
            x = F.gelu(x)
        if self.pos is not None:
            if T > self.pos.shape[0]:
                raise AdlError(f"sequence length {T} exceeds max_len={self.pos.shape[0]}; raise max_len")
            x = x + self.pos[:T]
        x = self.dropout(x.masked_fill(~mask[..., None], 0.0))
        if self.task == "sequence":
            # At inference, key and value as another tensor object than the query: MultiheadAttention's
            # fast path (taken when query is key is value) computes the same values through a masked
            # softmax that is several times slower on CPU than the general path's fused attention
            # (bench/attach.py's encoder-decoder case; the heads then cost a visible part of the pass).
            kv = x if self.training else x.view_as(x)
            a, _ = self.attn(x, kv, kv, key_padding_mask=~mask, need_weights=False)
            return self.out(masked_mean(a, mask))
        return self.out(self.encoder(x, src_key_padding_mask=~mask))


class PooledHead(_MixHead):
    """"adalayers-pooled": LayerMix on (B, L, D) -> Linear(k, hidden) -> GELU -> dropout -> Linear(hidden, C).

    Sequence tasks only; a tokens view is mean-pooled over real tokens before the mix.
    """

    def __init__(self, n_layers: int, in_dim: int, n_classes: int, *, task: str = "sequence", k: int = 64,
                 alpha: float = 70.0, cutoff: float = 0.005, hidden: int = 256, dropout: float = 0.3,
                 norm_affine: bool = False, post_gelu: bool = False, activation: bool = True,
                 fixed_layer: int | None = None):
        super().__init__()
        self.spec = _spec("adalayers-pooled", locals())
        _check_task(task)
        if task != "sequence":
            raise AdlError("adalayers-pooled handles sequence tasks only; use head adalayers for token tasks")
        self.task, self.post_gelu = task, post_gelu
        self.mix = LayerMix(n_layers, in_dim, k, alpha=alpha, cutoff=cutoff, norm_affine=norm_affine,
                            activation=activation, fixed_layer=fixed_layer)
        self.mlp = nn.Sequential(nn.Linear(k, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, z: Tensor, mask: Tensor | None = None, feats: Tensor | None = None) -> Tensor:
        """(B, L, D) or (B, T, L, D) + mask -> (B, C); ``feats`` as in AdaLayersHead."""
        return self.readout(self.mix(task_input(z, mask, self.task), feats))

    def readout(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The MLP after the mix: F (B, k) -> logits (B, C)."""
        return self.mlp(F.gelu(x) if self.post_gelu else x)


class ScalarMix(nn.Module):
    """ELMo scalar mix: gamma * sum_i softmax(s)_i z_i (no projection), then Linear(D, C).

    (..., L, D) -> (..., D) -> (..., C); sequence tasks pool a tokens view first.
    """

    def __init__(self, n_layers: int, in_dim: int, n_classes: int, *, task: str, dropout: float = 0.0):
        super().__init__()
        self.spec = _spec("scalar-mix", locals())
        _check_task(task)
        self.task, self.n_layers = task, n_layers
        self.s = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(()))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(in_dim, n_classes)

    def weights(self) -> Tensor:
        return torch.softmax(self.s, dim=0)

    def entropy(self) -> Tensor:
        log_w = torch.log_softmax(self.s, dim=0)
        return -(log_w.exp() * log_w).sum()

    def penalties(self) -> dict[str, Tensor]:
        return {}  # the ELMo mix is not pushed towards one layer

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        z = task_input(z, mask, self.task)
        mixed = self.gamma * torch.einsum("...ld,l->...d", z, self.weights())
        return self.out(self.dropout(mixed))


class LinearProbe(nn.Module):
    """Linear probe on one layer, or on all layers concatenated (``layer=None``, "concat-probe"):
    z[..., layer, :] (B, D) or (B, T, D), or z flattened over layers (..., L*D) -> Linear -> C.

    ``adl train`` fits it in closed form (``probe.fit_probe``: logistic regression, C chosen on
    validation); the module is what predicts with the result.
    """

    def __init__(self, n_layers: int, in_dim: int, n_classes: int, *, task: str, layer: int | None = -1,
                 dropout: float = 0.0):
        layer = None if layer is None else _layer_index(layer, n_layers)
        super().__init__()
        name = "concat-probe" if layer is None else "last-layer" if layer == n_layers - 1 else "linear-probe"
        self.spec = _spec(name, locals())
        _check_task(task)
        self.task, self.layer = task, layer
        w = torch.full((n_layers,), 1.0 / n_layers) if layer is None else F.one_hot(torch.tensor(layer), n_layers).float()
        self.register_buffer("layer_weights", w, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(in_dim * (n_layers if layer is None else 1), n_classes)

    def weights(self) -> Tensor:
        return self.layer_weights

    def entropy(self) -> Tensor:
        return self.layer_weights.new_zeros(())

    def penalties(self) -> dict[str, Tensor]:
        return {}

    def inputs(self, x: Tensor) -> Tensor:
        """(..., L, D) task inputs -> the probe's features: (..., D) or (..., L*D)."""
        return x.flatten(-2) if self.layer is None else x[..., self.layer, :]

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.out(self.dropout(self.inputs(task_input(z, mask, self.task))))


class Head2Toe(nn.Module):
    """Head2Toe: Linear over concatenated per-layer-normalised features (..., L'*D) -> (..., C).

    Each layer's (pooled, for sequence tasks) vector is layer-normalised over D without affine
    parameters so layers of different scale compete fairly in the group lasso
    ``group_lasso() = sum_l ||W[:, group l]||_2``. Selection: train with the lasso, take
    ``select_layers(fraction)``, retrain a new Head2Toe with ``layers=`` that subset.
    """

    def __init__(self, n_layers: int, in_dim: int, n_classes: int, *, task: str,
                 layers: list[int] | None = None):
        if layers is not None:
            layers = sorted({_layer_index(i, n_layers) for i in layers})
            if not layers:
                raise AdlError("head2toe layers= is empty; give at least one layer index or omit it")
        super().__init__()
        self.spec = _spec("head2toe", locals())
        _check_task(task)
        self.task, self.n_layers, self.in_dim = task, n_layers, in_dim
        self.layers = list(range(n_layers)) if layers is None else layers
        self.register_buffer("index", torch.tensor(self.layers), persistent=False)
        self.out = nn.Linear(len(self.layers) * in_dim, n_classes)

    def group_norms(self) -> Tensor:
        """(L,) Frobenius norm of each layer's block of W (zero for layers not used)."""
        w = self.out.weight.reshape(self.out.out_features, len(self.layers), self.in_dim)
        norms = w.square().sum(dim=(0, 2)).add(1e-12).sqrt()  # eps keeps the gradient finite at 0
        return torch.zeros(self.n_layers, dtype=norms.dtype, device=norms.device).index_put((self.index,), norms)

    def group_lasso(self) -> Tensor:
        return self.group_norms().sum()

    def weights(self) -> Tensor:
        g = self.group_norms()
        return g / g.sum()

    def entropy(self) -> Tensor:
        return self.out.weight.new_zeros(())

    def penalties(self) -> dict[str, Tensor]:
        """lasso * the group lasso over layers (``trainer.objective``)."""
        return {"lasso": self.group_lasso()}

    def select_layers(self, fraction: float) -> list[int]:
        """The top ceil(fraction * L') layers by group norm, sorted (host sync)."""
        if not 0.0 < fraction <= 1.0:
            raise AdlError(f"head2toe keep fraction must be in (0, 1] (got {fraction})")
        n = max(1, math.ceil(fraction * len(self.layers)))
        return sorted(torch.topk(self.group_norms(), n).indices.tolist())

    def forward(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        z = task_input(z, mask, self.task)
        feats = F.layer_norm(z.index_select(-2, self.index), (self.in_dim,))  # (..., L', D)
        return self.out(feats.flatten(-2))


_CLASSES = {"adalayers": AdaLayersHead, "single-layer": AdaLayersHead, "adalayers-pooled": PooledHead,
            "last-layer": LinearProbe, "linear-probe": LinearProbe, "concat-probe": LinearProbe,
            "scalar-mix": ScalarMix, "head2toe": Head2Toe}
HEAD_NAMES = tuple(_CLASSES)
PROBE_NAMES = tuple(name for name, cls in _CLASSES.items() if cls is LinearProbe)  # fitted, not trained
_SHAPE_ARGS = ("n_layers", "in_dim", "n_classes", "task")
_SET_BY_NAME = {"single-layer": "fixed_layer", "last-layer": "layer", "concat-probe": "layer"}  # set by the factory


def head_hparams(name: str) -> tuple[str, ...]:
    """The hyperparameters ``build_head(name, ...)`` accepts (besides n_layers, in_dim, n_classes, task)."""
    if name not in _CLASSES:
        raise AdlError(f"unknown head {name!r}; use one of {', '.join(HEAD_NAMES)}")
    params = [p for p in inspect.signature(_CLASSES[name]).parameters if p not in _SHAPE_ARGS]
    params = [p for p in params if p != _SET_BY_NAME.get(name)]
    if name == "adalayers":
        params.remove("fixed_layer")  # that is the single-layer head
    return tuple(params) + (("layer",) if name == "single-layer" else ())


def build_head(name: str, *, n_layers: int, in_dim: int, n_classes: int, task: str, **hparams) -> nn.Module:
    """Build head ``name`` for a cache with ``n_layers`` hidden states of width ``in_dim``.

    "single-layer" and "linear-probe" need ``layer=i``; "last-layer" probes layer L-1.
    """
    accepted = head_hparams(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise AdlError(f"head {name} does not take {', '.join(unknown)}; it accepts: {', '.join(accepted)}")
    if name in ("single-layer", "linear-probe") and "layer" not in hparams:
        raise AdlError(f"head {name} needs layer=<index in 0..{n_layers - 1}> (e.g. --layer {n_layers - 1})")
    if name == "single-layer":
        hparams["fixed_layer"] = hparams.pop("layer")
    if name == "last-layer":
        hparams["layer"] = n_layers - 1
    if name == "concat-probe":
        hparams["layer"] = None
    return _CLASSES[name](n_layers, in_dim, n_classes, task=task, **hparams)


def head_spec(head: nn.Module) -> dict:
    """The JSON-ready dict (name + constructor kwargs) that rebuilds ``head``."""
    if not isinstance(getattr(head, "spec", None), dict):
        raise AdlError(f"{type(head).__name__} has no spec; build heads with adl.train.heads.build_head")
    return dict(head.spec)


def head_from_spec(spec: dict) -> nn.Module:
    """Rebuild a head (fresh parameters) from ``head_spec(head)``; load its state_dict afterwards."""
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name not in _CLASSES:
        raise AdlError(f"head spec names unknown head {name!r}; expected one of {', '.join(HEAD_NAMES)}")
    try:
        return _CLASSES[name](**kwargs)
    except TypeError as e:
        raise AdlError(f"head spec for {name} does not match this adl version ({e}); retrain the head") from None
