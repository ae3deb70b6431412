"""GPU precision, exercised on the CPU: the backbone runs under bf16 autocast at extraction and at
predict time (the CUDA plan's path, on CPU), while pooling, the stored projection and the heads
compute in float32 outside it, as extraction does. The live logits then equal the cache path's;
a predict-time plan other than the extraction's is warned about."""

import warnings

import pytest
import torch
from test_predict import assert_live_equals_cache
from tiny_backbones import bert_folder, write_conll, write_csv
from typer.testing import CliRunner

from adl.cli import app
from adl.extract import models
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.run import run_train

BF16 = models.DevicePlan("cpu", torch.bfloat16, False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Caches extracted under CPU bf16 autocast, heads trained on them: (cache, run) per case."""
    root = tmp_path_factory.mktemp("autocast")
    bert = bert_folder(root / "bert")
    cases = {"pooled": ("csv", dict(views="pooled"), "adalayers-pooled"),
             "tokens": ("csv", dict(views="tokens"), "adalayers"),
             "projected": ("conll", dict(project=4), "adalayers")}
    data = {"csv": f"csv:{write_csv(root / 'd.csv')}", "conll": f"conll:{write_conll(root / 'd.conll')}"}
    out = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(models, "select_device", lambda requested="auto": BF16)
        for name, (kind, extract, head) in cases.items():
            cache, run = root / f"c-{name}", root / name
            run_extract(ExtractConfig(model=str(bert), dataset=data[kind], out=str(cache), batch_size=8,
                                      progress=False, **extract))
            run_train(TrainConfig(cache=str(cache), out=str(run), head=head, k=8, heads=2, ff=16, max_epochs=2,
                                  device="cpu"))
            out[name] = (cache, run)
    return out


@pytest.mark.parametrize("name", ["pooled", "tokens", "projected"])
def test_live_logits_under_bf16_autocast_equal_the_cache_path(runs, monkeypatch, name):
    cache, run = runs[name]
    monkeypatch.setattr(models, "select_device", lambda requested="auto": BF16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = Predictor([run], device="cpu")
    assert p.manifest["compute"] == {"device": "cpu", "autocast": "bfloat16"} and p.compute_warning is None
    assert not [w for w in caught if "backbone runs on" in str(w.message)]
    assert_live_equals_cache(p, cache, run)


def test_another_compute_plan_is_warned_about(runs):
    _, run = runs["pooled"]
    with pytest.warns(UserWarning, match="the backbone runs on cpu in float32, but the heads' cache was extracted on "
                                         "cpu under bfloat16 autocast"):
        Predictor([run], device="cpu")
    res = CliRunner().invoke(app, ["predict", "--run", str(run), "--text", "good movie"])
    assert res.exit_code == 0, res.output
    assert "warning: the backbone runs on cpu in float32" in res.stderr

