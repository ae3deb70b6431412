"""The backbone the heads run on is the one the cache was extracted from: loaded at the recorded hub
revision, with the recorded tokenizer (its fingerprint checked, one line naming the field)."""

import json
import shutil

import pytest
import transformers
from tiny_backbones import bert_folder, write_csv
from typer.testing import CliRunner

from adl.cli import app
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.models import load_tokenizer, tokenizer_hash
from adl.extract.recorded import check_tokenizer
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.run import run_train

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def made(tmp_path):
    """A model folder of the test's own (it gets edited), a cache and a run extracted from it."""
    model = bert_folder(tmp_path / "bert")
    run_extract(ExtractConfig(model=str(model), dataset=f"csv:{write_csv(tmp_path / 'd.csv')}",
                              out=str(tmp_path / "c"), views="pooled", batch_size=8, progress=False))
    run_train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "r"), head="adalayers-pooled", max_epochs=1,
                          device="cpu"))
    return model, tmp_path / "c", tmp_path / "r"


def test_the_manifest_records_the_tokenizers_fingerprint(made):
    model, cache, _ = made
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == tokenizer_hash(load_tokenizer(str(model), "sequence"))


def test_config_tokenizer_and_weights_load_at_the_recorded_revision(made, monkeypatch):
    _, _, run = made
    manifest = json.loads((run / "cache_manifest.json").read_text())
    manifest["model"]["revision"] = COMMIT  # as a hub model records it (a local folder has none)
    (run / "cache_manifest.json").write_text(json.dumps(manifest))
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModel):
        def spy(*args, _load=cls.from_pretrained, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("revision")))
            return _load(*args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", spy)
    Predictor([run], device="cpu")
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModel"}
    assert all(revision == COMMIT for _, revision in seen), seen


def test_another_tokenizer_at_the_recorded_place_is_one_line(made):
    model, cache, run = made
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": not cfg.get("do_lower_case", True)}))
    with pytest.raises(AdlError, match=r"the tokenizer of .* is not the one run .* was extracted with "
                                       r"\(tokenizer.sha256 differs"):
        Predictor([run], device="cpu")
    res = CliRunner().invoke(app, ["predict", "--run", str(run), "--text", "good movie"])
    assert res.exit_code == 2 and "tokenizer.sha256 differs" in res.output
    assert len(res.output.strip().splitlines()) <= 2  # one line (rich may wrap it)
    # what attach calls with the user's own tokenizer
    manifest = json.loads((cache / "manifest.json").read_text())
    with pytest.raises(AdlError, match="tokenizer.sha256 differs"):
        check_tokenizer(manifest, tokenizer_hash(load_tokenizer(str(model), "sequence")), "cache c")
    shutil.copy(model / "tokenizer_config.json", model / "changed.json")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    check_tokenizer(manifest, tokenizer_hash(load_tokenizer(str(model), "sequence")), "cache c")  # the same one passes
