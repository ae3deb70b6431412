"""TrainConfig validation, task presets and resolution of head / view against a cache."""

import dataclasses

import pytest

from adl.cache import open_cache
from adl.errors import AdlError
from adl.train.config import PRESET_FIELDS, PRESETS, TrainConfig, resolve, view_for
from synthetic import write_synthetic_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("caches")
    small = dict(n=(8, 4, 4))
    return {
        "seq": write_synthetic_cache(d / "seq", **small),
        "cola": write_synthetic_cache(d / "cola", dataset="cola", **small),
        "pooled": write_synthetic_cache(d / "pooled", views=("pooled:mean",), **small),
        "tokens": write_synthetic_cache(d / "tokens", views=("tokens",), **small),
        "ner": write_synthetic_cache(d / "ner", task="token", **small),
        "ner_pooled": write_synthetic_cache(d / "ner_pooled", task="token", views=("pooled:mean",), **small),
    }


@pytest.mark.parametrize("field, value, message", [
    ("k", 0, "--k must be an integer >= 1"),
    ("k", 2.5, "--k must be an integer"),
    ("cutoff", 1.0, r"--cutoff must be in \[0, 1\)"),
    ("cutoff", -0.1, r"--cutoff must be in \[0, 1\)"),
    ("alpha", 0.0, "--alpha must be > 0"),
    ("lam", -1e-3, "--lambda must be >= 0"),
    ("dropout", 1.0, r"--dropout must be in \[0, 1\)"),
    ("lr", 0.0, "--lr must be > 0"),
    ("lr", float("nan"), "--lr must be > 0"),
    ("weight_decay", -1.0, "--weight-decay must be >= 0"),
    ("batch_size", 0, "--batch-size must be an integer >= 1"),
    ("max_epochs", 0, "--max-epochs must be an integer >= 1"),
    ("patience", 0, "--patience must be an integer >= 1"),
    ("lr_patience", -1, "--lr-patience must be an integer >= 0"),
    ("heads", 0, "--heads must be an integer >= 1"),
    ("keep", 0.0, r"--keep must be in \(0, 1\]"),
    ("memory_gb", 0.0, "--memory-gb must be > 0"),
    ("head", "mlp", "unknown --head 'mlp'"),
    ("preset", "sst", "unknown --preset 'sst'"),
    ("device", "tpu", "--device 'tpu' is not a device"),
    ("cache", "", "no cache given"),
])
def test_out_of_range_values_are_refused(field, value, message):
    with pytest.raises(AdlError, match=message):
        TrainConfig(**{"cache": "c", field: value})
    with pytest.raises(AdlError, match=message):  # sweeps: replace() validates too
        dataclasses.replace(TrainConfig(cache="c"), **{field: value})


def test_layer_only_for_layer_heads():
    with pytest.raises(AdlError, match="--layer applies to --head single-layer"):
        TrainConfig(cache="c", head="adalayers", layer=1)
    assert TrainConfig(cache="c", head="single-layer", layer=1).layer == 1


def test_presets_follow_the_task(caches):
    for name, preset in (("seq", "imdb"), ("cola", "cola"), ("ner", "conll")):
        cfg = resolve(TrainConfig(cache=str(caches[name])), open_cache(caches[name]))
        assert cfg.preset == preset
        assert {f: getattr(cfg, f) for f in PRESET_FIELDS} == PRESETS[preset]
    assert PRESETS["cola"]["dropout"] == 0.3 and PRESETS["conll"]["k"] == 128
    assert all(p["patience"] > p["lr_patience"] for p in PRESETS.values())


def test_user_values_win_and_resolution_fills_the_rest(caches):
    cache = open_cache(caches["ner"])
    cfg = resolve(TrainConfig(cache=str(caches["ner"]), alpha=3.0, lam=0.0, preset="imdb"), cache)
    assert (cfg.alpha, cfg.lam, cfg.k, cfg.head, cfg.device) == (3.0, 0.0, 64, "adalayers", "cpu")
    assert cfg.out.startswith("runs/ner-adalayers-")
    assert resolve(cfg, cache) == cfg  # resolving twice changes nothing


def test_auto_head_and_views(caches):
    def head_view(name, head=None):
        cache = open_cache(caches[name])
        cfg = resolve(TrainConfig(cache=str(caches[name]), head=head, layer=0 if head == "single-layer" else None),
                      cache)
        return cfg.head, view_for(cfg.head, cache)

    assert head_view("seq") == ("adalayers", "tokens")
    assert head_view("pooled") == ("adalayers-pooled", "pooled:mean")
    assert head_view("tokens", "scalar-mix") == ("scalar-mix", "tokens")  # pooled heads pool tokens
    assert head_view("seq", "last-layer") == ("last-layer", "pooled:mean")
    assert head_view("pooled", "single-layer") == ("single-layer", "pooled:mean")
    assert head_view("ner", "head2toe") == ("head2toe", "tokens")


@pytest.mark.parametrize("name, kw, message", [
    ("pooled", dict(head="adalayers"), r"no 'tokens' view.*`adl extract \.\.\. --views tokens`"),
    ("ner", dict(head="adalayers-pooled"), "adalayers-pooled is a sequence-task head"),
    ("ner_pooled", {}, r"no 'tokens' view, which token tasks need.*--views tokens"),
    ("seq", dict(pool="cls"), r"no 'pooled:cls' view.*--views pooled --pool cls"),
    ("seq", dict(head="single-layer"), "needs --layer"),
    ("seq", dict(head="single-layer", layer=4), "--layer 4 is out of range: the cache has 4 layers"),
    ("seq", dict(layer=1), "--layer applies to --head single-layer"),
])
def test_head_that_does_not_fit_the_cache(caches, name, kw, message):
    with pytest.raises(AdlError, match=message):
        resolve(TrainConfig(cache=str(caches[name]), **kw), open_cache(caches[name]))
