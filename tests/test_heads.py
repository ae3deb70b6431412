"""Heads: LayerMix against an independent numpy computation, cutoff/entropy/gradients, shapes, masks,
the factory and spec round trip."""

import json
import math

import numpy as np
import pytest
import torch

from adl.errors import AdlError
from adl.train.heads import (
    HEAD_NAMES,
    AdaLayersHead,
    Head2Toe,
    LayerMix,
    PooledHead,
    build_head,
    head_from_spec,
    head_hparams,
    head_spec,
)

L, D = 4, 6


def _np_layer_mix(z, W, p, alpha, cutoff):
    """The equations of docs/method.md in numpy: f_i = N(GELU(Z_i) W_i^T), w = cutoff(softmax(alpha p)), F = sum w_i f_i."""
    erf = np.vectorize(math.erf)
    h = 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    f = np.einsum("...ld,lkd->...lk", h, W)
    f = (f - f.mean(-1, keepdims=True)) / np.sqrt(f.var(-1, keepdims=True) + 1e-5)
    e = np.exp(alpha * p - (alpha * p).max())
    s = e / e.sum()
    w = np.where(s > cutoff, s, 0.0)
    w = w / w.sum()
    return np.einsum("...lk,l->...k", f, w), w


def _mix(k=5, **kw):
    torch.manual_seed(0)
    return LayerMix(L, D, k, **kw).double()


def test_layer_mix_matches_numpy():
    m = _mix(alpha=3.0, cutoff=0.1)
    with torch.no_grad():
        m.p.copy_(torch.tensor([0.3, -0.4, 0.1, 0.5], dtype=torch.float64))
    z = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, L, D)))
    expected, w = _np_layer_mix(z.numpy(), m.W.detach().numpy(), m.p.detach().numpy(), 3.0, 0.1)
    assert (w == 0).sum() == 1  # the cutoff is exercised: layer 1 is pruned
    np.testing.assert_allclose(m.weights().detach().numpy(), w, atol=1e-12)
    np.testing.assert_allclose(m(z).detach().numpy(), expected, atol=1e-5)
    assert m(z[:, 0]).shape == (2, 5)  # pooled view (B, L, D) works too


def test_cutoff_renormalises_and_keeps_argmax():
    m = _mix(alpha=1.0, cutoff=0.2)
    with torch.no_grad():
        m.p.copy_(torch.tensor([2.0, 0.0, -1.0, 1.0], dtype=torch.float64))
    raw, w = m.raw_weights(), m.weights()
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(w[raw <= 0.2] == 0) and torch.all(w[raw > 0.2] > 0)
    assert m.active_layers() == [0, 3]
    everything_cut = _mix(alpha=1.0, cutoff=0.9)  # uniform 0.25 <= 0.9 everywhere
    with torch.no_grad():
        everything_cut.p.copy_(torch.tensor([0.0, 0.3, 0.1, 0.2], dtype=torch.float64))
    assert everything_cut.weights().tolist() == [0.0, 1.0, 0.0, 0.0]


def test_entropy_uniform_is_log_L_and_summed():
    m = _mix(alpha=70.0)
    assert torch.isclose(m.entropy(), torch.tensor(math.log(L), dtype=torch.float64))
    with torch.no_grad():
        m.p.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert m.entropy() < 1e-6  # alpha=70 makes it one-hot


def test_pruned_layer_gradient_and_revival():
    """Task loss gives a pruned p_i (and W_i) zero gradient; entropy still reaches p_i; the layer
    comes back once the kept logits move so that its softmax weight exceeds the cutoff."""
    m = _mix(alpha=1.0, cutoff=0.008)
    with torch.no_grad():
        m.p.copy_(torch.tensor([3.0, 1.0, -2.0, -2.0], dtype=torch.float64))  # s_2 = s_3 ~ 0.0059
    z = torch.randn(3, L, D, dtype=torch.float64)
    m(z).square().sum().backward()
    assert torch.isfinite(m.p.grad).all()
    assert m.p.grad[2] == 0 and m.p.grad[3] == 0 and m.p.grad[0] != 0
    assert torch.all(m.W.grad[2:] == 0) and torch.any(m.W.grad[0] != 0)
    m.zero_grad()
    m.entropy().backward()
    assert m.p.grad[2] != 0

    opt = torch.optim.SGD([m.p], lr=2.0)
    revived = []
    for _ in range(300):  # a task that wants layers 0 and 1 equally: their logits converge
        opt.zero_grad()
        (m.weights()[0] - 0.5).square().backward()
        assert m.p.grad[2] == 0 or m.weights()[2] > 0
        opt.step()
        revived.append(bool(m.weights()[2] > 0))
    assert not revived[0] and revived[-1]
    assert m.weights()[2] > 0.008


def test_weights_have_no_host_sync():
    """symbolic_trace fails on .item() or Python branching on tensor values, so tracing proves neither."""
    m = _mix(alpha=2.0, cutoff=0.1)

    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self):
            return self.m.weights()

    traced = torch.fx.symbolic_trace(Weights())
    torch.testing.assert_close(traced(), m.weights())
    loss = m(torch.randn(2, L, D, dtype=torch.float64)).square().sum() + 0.1 * m.entropy()
    loss.backward()
    assert torch.isfinite(m.p.grad).all()


def test_single_layer_baseline_trains_its_projection():
    torch.manual_seed(0)
    m = LayerMix(L, D, 5, fixed_layer=2)
    assert m.weights().tolist() == [0.0, 0.0, 1.0, 0.0] and m.active_layers() == [2]
    assert not m.p.requires_grad and m.entropy() == 0
    z = torch.randn(3, 2, L, D)
    (m(z)[..., 0] ** 3).sum().backward()
    assert m.W.shape == (1, 5, D) and m.W.grad.abs().sum() > 0  # only layer 2's projection exists
    torch.manual_seed(0)
    expected = LayerMix(L, D, 5)  # same layer through the full path with a one-hot mix
    torch.testing.assert_close(expected.W[2:3], m.W)  # drawn as in the full head
    with torch.no_grad():
        expected.p.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    torch.testing.assert_close(m(z), expected(z))


def test_layer_mix_errors():
    for kw, word in [(dict(k=0), "k"), (dict(cutoff=1.0), "cutoff"), (dict(cutoff=-0.1), "cutoff"),
                     (dict(alpha=0.0), "alpha"), (dict(fixed_layer=L), "layer")]:
        args = dict(k=4) | kw
        with pytest.raises(AdlError, match=word):
            LayerMix(L, D, args.pop("k"), **args)
    with pytest.raises(AdlError, match="hidden states"):
        LayerMix(L, D, 4)(torch.randn(2, L - 1, D))


def _batch(B=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, L, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return z, mask


@pytest.mark.parametrize("task", ["sequence", "token"])
@pytest.mark.parametrize("pos_emb", [False, True])
def test_adalayers_shapes_and_mask(task, pos_emb):
    torch.manual_seed(0)
    head = AdaLayersHead(L, D, 3, task=task, k=8, heads=2, ff=16, pos_emb=pos_emb, cutoff=0.0).eval()
    z, mask = _batch()
    out = head(z, mask)
    assert out.shape == ((3, 3) if task == "sequence" else (3, 5, 3))
    z2 = z.clone()
    z2[~mask] = torch.randn(int((~mask).sum()), L, D) * 100
    out2 = head(z2, mask)
    if task == "token":
        out, out2 = out[mask], out2[mask]
    torch.testing.assert_close(out, out2)
    assert head.weights().shape == (L,)


def test_adalayers_options_and_errors():
    z, mask = _batch()
    for kw in [dict(post_gelu=True), dict(norm_affine=True), dict(fixed_layer=1), dict(activation=False)]:
        head = AdaLayersHead(L, D, 2, task="sequence", k=4, heads=2, **kw)
        assert head(z, mask).shape == (3, 2)
    with pytest.raises(AdlError, match="multiple of heads"):
        AdaLayersHead(L, D, 2, task="sequence", k=10, heads=4)
    with pytest.raises(AdlError, match="max_len"):
        AdaLayersHead(L, D, 2, task="token", k=4, heads=2, pos_emb=True, max_len=3)(z, mask)
    with pytest.raises(AdlError, match="tokens view"):
        AdaLayersHead(L, D, 2, task="sequence", k=4, heads=2)(z[:, 0], None)
    with pytest.raises(AdlError, match="task"):
        AdaLayersHead(L, D, 2, task="ner", k=4, heads=2)


NAME_HPARAMS = {"adalayers": dict(k=4, heads=2, ff=8), "adalayers-pooled": dict(k=4, hidden=8),
                "single-layer": dict(layer=1, k=4, heads=2, ff=8), "last-layer": {},
                "linear-probe": dict(layer=0), "concat-probe": {}, "scalar-mix": {}, "head2toe": {}}


@pytest.mark.parametrize("name", HEAD_NAMES)
@pytest.mark.parametrize("task", ["sequence", "token"])
def test_factory_and_spec_round_trip(name, task):
    if name == "adalayers-pooled" and task == "token":
        with pytest.raises(AdlError, match="sequence"):
            build_head(name, n_layers=L, in_dim=D, n_classes=3, task=task, **NAME_HPARAMS[name])
        return
    torch.manual_seed(0)
    head = build_head(name, n_layers=L, in_dim=D, n_classes=3, task=task, **NAME_HPARAMS[name]).eval()
    z, mask = _batch()
    out = head(z, mask)
    assert out.shape == ((3, 3) if task == "sequence" else (3, 5, 3))
    if task == "sequence" and name != "adalayers" and name != "single-layer":
        assert head(z[:, 0]).shape == (3, 3)  # pooled view
    w = head.weights()
    assert w.shape == (L,) and torch.isclose(w.sum(), torch.tensor(1.0))
    assert head.entropy().shape == ()
    spec = json.loads(json.dumps(head_spec(head)))
    assert spec["name"] == name
    rebuilt = head_from_spec(spec).eval()
    rebuilt.load_state_dict(head.state_dict())
    torch.testing.assert_close(rebuilt(z, mask), out)


def test_factory_errors():
    kw = dict(n_layers=L, in_dim=D, n_classes=2, task="sequence")
    with pytest.raises(AdlError, match="adalayers-pooled"):
        build_head("nope", **kw)
    with pytest.raises(AdlError, match="needs layer"):
        build_head("single-layer", **kw)
    with pytest.raises(AdlError, match="accepts"):
        build_head("last-layer", alpha=3.0, **kw)
    assert "layer" in head_hparams("single-layer") and "fixed_layer" not in head_hparams("adalayers")
    with pytest.raises(AdlError, match="unknown head"):
        head_from_spec({"name": "nope"})
    with pytest.raises(AdlError, match="retrain"):
        head_from_spec({"name": "scalar-mix", "n_layers": L, "bogus": 1})
    with pytest.raises(AdlError, match="token tasks need"):
        build_head("scalar-mix", **(kw | dict(task="token")))(torch.randn(2, L, D))


def test_head2toe_group_lasso_and_selection():
    torch.manual_seed(0)
    head = Head2Toe(L, D, 3, task="sequence")
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.weight[:, 2 * D:3 * D] = 1.0  # only layer 2's block is nonzero
    norms = head.group_norms()
    assert torch.allclose(norms, torch.tensor([0, 0, math.sqrt(3 * D), 0]), atol=1e-5)
    assert torch.isclose(head.group_lasso(), norms.sum())
    assert head.weights().argmax() == 2 and head.select_layers(0.25) == [2]
    head.group_lasso().backward()
    assert torch.isfinite(head.out.weight.grad).all()
    sub = Head2Toe(L, D, 3, task="sequence", layers=[2, 0])
    assert sub.layers == [0, 2] and sub.out.in_features == 2 * D
    assert sub.weights()[[1, 3]].tolist() == [0.0, 0.0]


def _twins(**kw):
    """Two heads with identical weights, the second with options ``kw``."""
    torch.manual_seed(0)
    a = PooledHead(L, D, 2, k=4, hidden=8, dropout=0.0).eval()
    torch.manual_seed(0)
    return a, PooledHead(L, D, 2, k=4, hidden=8, dropout=0.0, **kw).eval()


def _mlp_input(head, z):
    seen = []
    hook = head.mlp[0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    head(z)
    hook.remove()
    return seen[0]


def test_post_gelu_bounds_the_mixed_features_below_by_gelus_minimum():
    plain, gelu = _twins(post_gelu=True)
    z = torch.randn(64, L, D)
    x_plain, x_gelu = _mlp_input(plain, z), _mlp_input(gelu, z)
    assert x_plain.min() < -0.5  # layer-normed features are centred
    assert x_gelu.min() >= -0.1701  # GELU's minimum is -0.16997
    torch.testing.assert_close(x_gelu, torch.nn.functional.gelu(x_plain))


def test_norm_affine_scales_and_shifts_the_mix():
    plain, affine = _twins(norm_affine=True)
    with torch.no_grad():
        affine.mix.gamma.fill_(2.0)
        affine.mix.beta.fill_(1.0)
    z = torch.randn(16, L, D)
    # the weights sum to 1, so a per-layer affine map with equal gamma/beta maps F to 2F + 1
    torch.testing.assert_close(affine.mix(z), 2 * plain.mix(z) + 1)
    with torch.no_grad():
        affine.mix.gamma[0].fill_(0.0)
        affine.mix.beta[0].fill_(0.0)
    w = plain.mix.weights()
    torch.testing.assert_close(affine.mix(z), 2 * plain.mix(z) + 1 - w[0] * (2 * plain.mix.features(z)[:, 0] + 1))


def test_activation_off_expects_states_stored_after_gelu():
    plain, stored = _twins(activation=False)
    z = torch.randn(16, L, D)
    torch.testing.assert_close(stored(torch.nn.functional.gelu(z)), plain(z))
    assert not torch.allclose(stored(z), plain(z))
    assert head_from_spec(stored.spec).mix.activation is False  # the spec alone rebuilds it


@pytest.mark.parametrize("kw", [dict(cutoff=0.1), dict(norm_affine=True), dict(activation=False), dict(fixed_layer=2)])
def test_layer_by_layer_sums_to_the_mix(kw):
    """The per-layer method (what inference feeds as each layer finishes) is the mix itself:
    sum_i w_i f_i over the layers equals forward, with GELU, projection, norm and weight."""
    m = _mix(alpha=3.0, **kw)
    with torch.no_grad():
        if m.p.requires_grad:
            m.p.copy_(torch.tensor([0.3, -0.4, 0.1, 0.5], dtype=torch.float64))
        if m.gamma is not None:
            m.gamma.copy_(torch.rand_like(m.gamma) + 0.5)
            m.beta.copy_(torch.randn_like(m.beta))
    z = torch.randn(2, 3, L, D, dtype=torch.float64)
    parts = [m.layer(z[..., i, :], i) for i in range(L)]
    torch.testing.assert_close(sum(parts), m(z))
    w = m.weights()
    activated = [m.layer(m.activate(z[..., i, :]), i, weight=w[i], activated=True) for i in range(L)]
    torch.testing.assert_close(sum(activated), m(z))


def test_penalties_name_the_objective_terms():
    from adl.train.trainer import coefficients, objective

    mixing, probe = build_head("adalayers", n_layers=L, n_classes=2, in_dim=D, task="sequence", k=4, heads=2), \
        build_head("concat-probe", n_layers=L, n_classes=2, in_dim=D, task="sequence")
    h2t = build_head("head2toe", n_layers=L, n_classes=2, in_dim=D, task="sequence")
    assert mixing.penalties().keys() == {"lam"} and torch.equal(mixing.penalties()["lam"], mixing.entropy())
    assert h2t.penalties().keys() == {"lasso"} and torch.equal(h2t.penalties()["lasso"], h2t.group_lasso())
    assert probe.penalties() == {}
    logits, y = torch.randn(5, 2), torch.tensor([0, 1, 1, -100, 0])
    ce = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100)
    cfg = type("Cfg", (), {"lam": 0.5, "lasso": None})()
    torch.testing.assert_close(objective(logits, y, mixing.penalties(), coefficients(cfg)),
                               ce + 0.5 * mixing.entropy())
    torch.testing.assert_close(objective(logits, y, h2t.penalties(), coefficients(cfg)), ce)  # lasso None: off
