"""adl.checks: the one validator behind every command's config (train, extract, finetune, sweep,
predict, serve): the rule in words, the flag and the value given, on one line."""

import math

import pytest

from adl.checks import FRACTION, INT_GE1, Num, check, choice, flag_of
from adl.errors import AdlError


class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize("rule, good, bad, words", [
    (INT_GE1, [1, 7], [0, -1, 2.0, True, None and 0], "an integer >= 1"),
    (FRACTION, [0, 0.5, 0.999], [1, 1.0, -0.1, math.nan, "0.5"], "in [0, 1)"),
    (Num(0, low_open=True, example="70"), [1e-9, 3], [0, -1, math.inf, math.nan], "> 0, e.g. 70"),
    (Num(0, 1, low_open=True), [1, 0.5], [0, 1.5], "in (0, 1]"),
    (Num(0, 65535, integer=True), [0, 65535], [65536, -1, 8000.0], "an integer in [0, 65535]"),
    (Num(integer=True), [-3, 0], [1.5, False], "an integer"),
])
def test_rules_accept_and_refuse_with_their_words(rule, good, bad, words):
    assert rule.want() == words
    for v in good:
        check(Cfg(x=v), {"x": rule})
    check(Cfg(x=None), {"x": rule})  # not given
    for v in bad:
        if v is None:
            continue
        with pytest.raises(AdlError) as e:
            check(Cfg(some_field=v), {"some_field": rule})
        assert str(e.value) == f"--some-field must be {words} (got {v!r})"


def test_choice_and_flags():
    choice("--pool", None, ("mean",))
    choice("--pool", "mean", ("mean", "last"))
    with pytest.raises(AdlError, match=r"^unknown --pool 'max'; use one of mean, last$"):
        choice("--pool", "max", ("mean", "last"))
    assert flag_of("max_wait_ms") == "--max-wait-ms"
    with pytest.raises(AdlError, match=r"^--lambda must be >= 0 \(got -1\)$"):
        check(Cfg(lam=-1), {"lam": Num(0)}, flag=lambda n: "--lambda")


@pytest.mark.parametrize("build, says", [
    (lambda: __import__("adl.train.config", fromlist=["x"]).TrainConfig(cache="c", k=0), "--k must be an integer >= 1 (got 0)"),
    (lambda: __import__("adl.extract.config", fromlist=["x"]).ExtractConfig(model="m", dataset="d", seed=-1),
     "--seed must be an integer >= 0 (got -1)"),
    (lambda: __import__("adl.peers.config", fromlist=["x"]).FinetuneConfig(cache="c", method="full", dropout=1.0),
     "--dropout must be in [0, 1) (got 1.0)"),
    (lambda: __import__("adl.serve.predict_cmd", fromlist=["x"]).PredictConfig(runs=["r"], texts=["a"], batch_size=0),
     "--batch-size must be an integer >= 1 (got 0)"),
])
def test_every_command_config_speaks_the_same_line(build, says):
    with pytest.raises(AdlError) as e:
        build()
    assert str(e.value) == says
