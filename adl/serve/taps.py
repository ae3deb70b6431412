"""Heads fed from the backbone's own forward pass, layer by layer.

Hidden state Z_i (i < L-1) is the input of the stack's layer i, read by a forward pre-hook;
Z_{L-1} is the stack's output (after a final norm, as in GPT-2), read by a forward hook on
the stack. This is exactly transformers' ``output_hidden_states`` tuple, without keeping it.

Each head sees what its cache stored, computed the way extraction computed it:

    pooled view   z_i = pool(Z_i, mask).to(dtype).float()                      (B, H)
    tokens view   z_i = P_i(Z_i).to(dtype).float()  (P_i: the stored projection, if any)  (B, T, D)

Heads that read the same view (and pool, dtype, projection) share one z_i per batch, and
its GELU. A mixing head (adalayers on tokens, adalayers-pooled on a pooled view) adds
w_i N(a(z_i) W_i^T) into one accumulator (B, [T,] k) and only for its layers with w_i > 0;
the task block reads the accumulator once the last such layer is done. Other heads (probes,
scalar mix, head2toe) keep their layers' z_i and run whole at the end (layers of weight 0
are zeros: they never reach the output).

Early exit: when the caller needs neither the backbone's output nor the last layer, the
pre-hook of the highest layer any head needs raises ``_Stop`` once it has fed the heads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from adl.errors import AdlError
from adl.extract.pooling import pool
from adl.train.rundir import Run
from adl.train.heads import AdaLayersHead, PooledHead


class _Stop(Exception):
    """Every head has its layers: the rest of the forward is not needed."""


class HeadFeed:
    """One head's per-batch state: the accumulator (mixing heads) or the kept inputs (others)."""

    def __init__(self, run: Run, device: str):
        self.run = run
        self.head = run.head.to(device)
        self.view, self.task = run.info["view"], run.task
        self.pool = run.info.get("pool")
        self.dtype = getattr(torch, run.manifest.get("dtype", "float32"))
        self.projection = run.projection.to(device) if run.projection is not None else None
        weights = self.head.weights().detach().float().cpu().tolist()
        self.layers = run.layers
        mixing = (isinstance(self.head, AdaLayersHead) and self.view == "tokens") or \
                 (isinstance(self.head, PooledHead) and self.view.startswith("pooled:"))
        self.mix = self.head.mix if mixing else None
        # absolute layer -> (position in the head's layers, weight); only layers of nonzero weight
        self.active = {self.layers[i]: (i, w) for i, w in enumerate(weights) if w > 0}
        self.acc: Tensor | None = None
        self.kept: dict[int, Tensor] = {}

    def start(self) -> None:
        self.acc, self.kept = None, {}

    def stored(self, layer: int, h: Tensor, mask: Tensor) -> Tensor:
        """What the cache holds for this layer and batch, as the head reads it (float32)."""
        if self.view.startswith("pooled:"):
            return pool(self.pool, h, mask).to(self.dtype).float()  # (B, H)
        if self.projection is not None:
            h = self.projection.apply_layer(h, self.projection.layers.index(layer))
        return h.float().to(self.dtype).float()  # (B, T, D)

    def feed(self, layer: int, h: Tensor, mask: Tensor, memo: dict) -> None:
        """Add this layer to the head. ``memo`` holds the layer's stored states (and their GELU) for
        the batch, shared by the heads that read the same view, pool, dtype and projection."""
        i, w = self.active[layer]
        key = (self.view, self.pool, self.dtype, id(self.projection))
        if key not in memo:
            memo[key] = self.stored(layer, h, mask)
        z = memo[key]
        if self.mix is None:
            self.kept[i] = z
            return
        key += ("activated", self.mix.activation)  # GELU once per stored tensor, not once per head
        if key not in memo:
            memo[key] = self.mix.activate(z)
        f = self.mix.layer(memo[key], i, weight=w, activated=True)  # w_i f_i (B, [T,] k)
        self.acc = f if self.acc is None else self.acc + f

    def finish(self, mask: Tensor) -> Tensor:
        """-> logits (B, C) or (B, T, C)."""
        bmask = mask.bool()
        if self.mix is not None:
            return self.head.readout(self.acc, bmask)
        first = next(iter(self.kept.values()))
        z = first.new_zeros(*first.shape[:-1], len(self.layers), first.shape[-1])  # (B, [T,] L, D)
        for i, zi in self.kept.items():
            z[..., i, :] = zi
        return self.head(z, bmask if z.dim() == 4 else None)


def feed_layer(feeds: list[HeadFeed], layer: int, h: Tensor, mask: Tensor) -> None:
    """Layer ``layer``'s hidden state h (B, T, H) into the heads that read it, outside the
    caller's autocast and autograd: pooling, projection and heads compute in float32 what
    extraction computed, whatever precision the backbone ran in."""
    memo: dict = {}
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        for feed in feeds:
            feed.feed(layer, h, mask, memo)


def finish_heads(feeds: list[HeadFeed], mask: Tensor) -> dict[str, np.ndarray]:
    """Every head's logits for the batch, outside autocast: name -> (B, C) or (B, T, C) float32."""
    with torch.no_grad(), torch.autocast(mask.device.type, enabled=False):
        return {f.run.name: f.finish(mask).float().cpu().numpy() for f in feeds}


def layer_lists(stack: nn.Module, n_layers: int) -> list[nn.ModuleList]:
    """Every ModuleList of ``n_layers`` modules in the stack, in module order: the candidates for its layers."""
    return [m for m in stack.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]


def matching_layers(stack: nn.Module, n_states: int, forward, expected) -> nn.ModuleList | None:
    """The first list of ``n_states - 1`` modules of ``stack`` whose hooked states (each one's input,
    then the stack's output) equal ``expected`` (the model's own ``output_hidden_states``) while
    ``forward()`` runs the same batch; None when no list does. Matching by length alone is a guess (a
    wrapper may hold adapters or heads in another list of that length); a wrong guess would feed the
    heads other tensors than the cache holds, silently."""
    for layers in layer_lists(stack, n_states - 1):
        got = hooked_states(stack, layers, n_states, forward)
        if len(got) == n_states and all(a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3,
                                                                              atol=1e-4)
                                        for a, b in zip(got, expected)):
            return layers
    return None


def hooked_states(stack: nn.Module, layers: nn.ModuleList, n_states: int, forward) -> list[Tensor]:
    """The states the hooks read with ``layers`` as the stack's layers while ``forward()`` runs."""
    got: dict[int, Tensor] = {}

    def pre_hook(i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, Tensor):
                got.setdefault(i, h)
        return hook

    def out_hook(module, args, output):
        got[n_states - 1] = output[0]

    hooks = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks.append(stack.register_forward_hook(out_hook))
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in range(n_states) if i in got]


class LayerTaps:
    """The backbone with heads attached: ``run(ids, mask, feeds, ...)`` is one forward pass."""

    def __init__(self, backbone):
        self.backbone = backbone
        info, model = backbone.info, backbone.model
        if info.family == "encoder-decoder":
            self.stack = model.get_encoder() if info.states == "encoder" else model.get_decoder()
        else:
            self.stack = model
        self.L = info.num_hidden_states
        self.layers = self._find_layers()

    def _find_layers(self) -> nn.ModuleList:
        """The stack's transformer layers, checked on a short dummy batch (``matching_layers``)."""
        device = self.backbone.plan.device
        vocab = int(getattr(self.backbone.model.config, "vocab_size", 0) or 8)
        ids = (torch.arange(2, 10, device=device) % vocab)[None]  # (1, 8): any ids; the states only need to agree
        mask = torch.ones_like(ids)

        def forward():
            with self.backbone.plan.autocast_context():
                self._forward(ids, mask, False)

        with torch.inference_mode():
            layers = matching_layers(self.stack, self.L, forward, self.backbone.hidden_states(ids, mask))
        if layers is None:
            raise AdlError(f"cannot attach heads to {self.backbone.info.id}: none of its "
                           f"{len(layer_lists(self.stack, self.L - 1))} list(s) of {self.L - 1} modules takes the "
                           "hidden states output_hidden_states returns (checked on a dummy batch), so the live "
                           "states would not be the cached ones; use a standard transformers model")
        return layers

    def run(self, ids: Tensor, mask: Tensor, feeds: list[HeadFeed], *, full: bool, last: bool):
        """One batch. full: run the model's own forward and return its output (else None);
        last: the stack's last hidden state is needed (returned). -> (model output, last state)."""
        need: dict[int, list[HeadFeed]] = {}
        for feed in feeds:
            feed.start()
            for layer in feed.active:
                need.setdefault(layer, []).append(feed)
        top = max(need, default=-1)
        stop_at = top if not (full or last) and top < self.L - 1 else None
        got: dict[str, Tensor] = {}

        def deliver(layer: int, h: Tensor) -> None:
            feed_layer(need.get(layer, []), layer, h, mask)
            if layer == stop_at:
                raise _Stop

        def pre_hook(layer):
            def hook(module, args, kwargs):
                deliver(layer, args[0] if args else kwargs["hidden_states"])
            return hook

        def out_hook(module, args, output):
            got["last"] = output[0]
            if self.L - 1 in need:
                deliver(self.L - 1, output[0])

        hooks = [self.layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                 for i in sorted(need) if i < self.L - 1]
        hooks.append(self.stack.register_forward_hook(out_hook))
        output = None
        try:
            with self.backbone.plan.autocast_context():
                output = self._forward(ids, mask, full)
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        return (output if full else None), got.get("last")

    def _forward(self, ids: Tensor, mask: Tensor, full: bool):
        """The same call as extraction (``Backbone.hidden_states``) without ``output_hidden_states``;
        encoder states of an encoder-decoder run the encoder alone unless the model's output is wanted."""
        bb = self.backbone
        # a decoder builds its key/value cache for generation; only the model's own output keeps it
        kw = {"use_cache": False} if not full and getattr(bb.model.config, "use_cache", False) else {}
        if bb.info.family == "encoder-decoder" and bb.info.states == "decoder":
            return bb.model(input_ids=ids, attention_mask=mask, decoder_input_ids=bb.shift_right(ids),
                            decoder_attention_mask=mask, **kw)
        if bb.info.family == "encoder-decoder" and not full:
            return self.stack(input_ids=ids, attention_mask=mask)
        return bb.model(input_ids=ids, attention_mask=mask, **kw)
