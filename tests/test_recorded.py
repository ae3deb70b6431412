"""The recorded backbone is found and checked in one place (adl.extract.recorded) for every path
that runs it after extraction: the Predictor (adl predict, adl serve) and adl finetune."""

import shutil

import pytest
from tiny_backbones import bert_folder, write_csv
from typer.testing import CliRunner

from adl.cli import app
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.recorded import recorded_backbone
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.rundir import load_run
from adl.train.run import run_train


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    model = bert_folder(root / "model")
    cache, run = root / "cache", root / "run"
    run_extract(ExtractConfig(model=str(model), dataset=f"csv:{write_csv(root / 'd.csv', n=40)}", out=str(cache),
                              views="pooled", batch_size=8, progress=False))
    run_train(TrainConfig(cache=str(cache), out=str(run), head="adalayers-pooled", device="cpu", k=8,
                          max_epochs=1))
    return {"model": model, "cache": cache, "run": run}


def test_the_recorded_model_is_found_with_its_stack_and_tokenizer(made):
    manifest = load_run(made["run"]).manifest
    rec = recorded_backbone(manifest, "run R")
    assert rec.model_id == str(made["model"]) and rec.trust_remote_code is False
    assert rec.info.config_hash == manifest["model"]["config_hash"] and rec.info.states == "encoder"
    assert rec.tokenizer("sequence")("good movie")["input_ids"]


def test_another_model_in_the_recorded_place_is_one_line_for_predict_and_finetune(made, tmp_path):
    """The model folder now holds a different model: both paths refuse it with the same line."""
    shutil.rmtree(made["model"])
    bert_folder(made["model"], hidden_size=16)  # another config at the recorded path
    with pytest.raises(AdlError, match=r"not the one run .* was made with \(its config hash differs\)"):
        Predictor([made["run"]], device="cpu")
    out = CliRunner().invoke(app, ["finetune", "--cache", str(made["cache"]), "--method", "bitfit",
                                   "--out", str(tmp_path / "peer"), "--max-epochs", "1"])
    assert out.exit_code == 2, out.output
    assert "not the one cache" in out.output and "its config hash differs" in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
