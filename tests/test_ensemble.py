"""adl train's default beyond one head: the mix of its candidates (adl.train.ensemble) and the
race that stops a candidate once it cannot catch the leader (adl.train.race)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from adl.cache import open_cache
from adl.train.config import TrainConfig, resolve
from adl.train.ensemble import Ensemble, choose_weights, simplex
from adl.train.heads import build_head
from adl.train.race import WINDOW, Race
from adl.train.rundir import load_head, save_head
from adl.train.run import fit_candidate
from synthetic import write_synthetic_cache

NAMES = ["a", "b"]


def test_the_grid_covers_the_simplex():
    grid = simplex(3)
    assert len(grid) == 28 and all(abs(sum(w) - 1) < 1e-12 for w in grid)
    assert (1.0, 0.0, 0.0) in grid and (0.5, 0.5, 0.0) in grid and any(np.allclose(w, 1 / 3) for w in grid)


def test_complementary_members_are_mixed_and_a_tie_goes_to_the_even_mix():
    y = np.array([0, 1, 0, 1])
    split = SimpleNamespace(task="sequence", labels=y)
    # a is sure and right on the first two, unsure and wrong on the last two; b the other way round
    a = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
    b = np.array([[0.4, 0.6], [0.6, 0.4], [0.9, 0.1], [0.1, 0.9]])
    choice = choose_weights([a, b], split, NAMES)
    assert choice.validation["accuracy"] == 1.0 and choice.weights == (0.5, 0.5)
    perfect = np.eye(2)[y]  # both members perfect: every mix ties, the even one is kept
    assert choose_weights([perfect, perfect], split, NAMES).weights == (0.5, 0.5)
    wrong = np.eye(2)[1 - y]  # one member always wrong: it gets no weight
    assert choose_weights([perfect, wrong], split, NAMES).weights == (1.0, 0.0)


def test_an_ensemble_is_one_head_that_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    probe = build_head("concat-probe", n_layers=3, in_dim=4, n_classes=2, task="sequence")
    pooled = build_head("adalayers-pooled", n_layers=3, in_dim=4, n_classes=2, task="sequence", k=8)
    tokens = build_head("adalayers", n_layers=3, in_dim=4, n_classes=2, task="sequence", k=8, heads=2, ff=16)
    mix = Ensemble([probe, pooled, tokens], [1 / 6, 1 / 2, 1 / 3], "sequence").eval()
    z, mask = torch.randn(5, 7, 3, 4), torch.ones(5, 7, dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        want = sum(w * torch.softmax(h.eval()(z, mask), -1) for w, h in zip((1 / 6, 1 / 2, 1 / 3),
                                                                            (probe, pooled, tokens)))
        got = mix(z, mask)
    torch.testing.assert_close(torch.softmax(got, -1), want)  # its logits are log p: decoding sees the mix
    save_head(tmp_path, mix, {"task": "sequence", "view": "tokens", "layers": [0, 1, 2], "label_names": NAMES})
    again, info = load_head(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(z, mask), got)
    assert info["spec"]["name"] == "ensemble" and info["spec"]["weights"] == [1 / 6, 1 / 2, 1 / 3]
    torch.testing.assert_close(mix.weights().sum(), torch.tensor(1.0))


def test_the_race_stops_a_stalled_candidate_and_spares_a_climbing_one():
    stalled = Race(leader=0.8, horizon=10)
    assert [stalled.behind(s) for s in (0.5, 0.52, 0.53, 0.53, 0.535)] == [False] * WINDOW + [True, True]
    climbing = Race(leader=0.8, horizon=10)
    assert not any(climbing.behind(s) for s in (0.4, 0.5, 0.6, 0.7, 0.75))  # +0.05 an epoch for 10 more catches up
    ahead = Race(leader=0.5, horizon=10)
    assert not any(ahead.behind(s) for s in (0.6, 0.6, 0.6, 0.6, 0.6))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("race") / "seq", n=(48, 16, 16))


def test_a_candidate_that_cannot_catch_the_leader_stops(cache):
    c = open_cache(cache)
    cfg = resolve(TrainConfig(cache=str(cache), head="adalayers-pooled", k=8, lr=0.01, alpha=10.0, max_epochs=20,
                              device="cpu"), c)
    t = fit_candidate(cfg, c, Console(quiet=True), None, leader=1.01)  # no score reaches it
    assert t.result.stop_reason == "pruned" and WINDOW < len(t.result.history) < cfg.patience
    free = fit_candidate(cfg, c, Console(quiet=True), None)  # no rival: early stopping alone
    assert free.result.stop_reason != "pruned" and len(free.result.history) > cfg.patience
