"""`adl extract` and `adl info` through typer's runner: the happy path, reruns, and every bad
input of the issue as one clear line with exit code 2 (never a traceback)."""

import json

import pytest
from tiny_backbones import bert_folder, write_conll, write_csv
from typer.testing import CliRunner

from adl.cache import open_cache
from adl.cli import app
from adl.extract import plan

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"bert": str(bert_folder(root / "bert")), "csv": f"csv:{write_csv(root / 'd.csv')}",
            "conll": f"conll:{write_conll(root / 'd.conll')}", "root": root}


def adl(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def test_extract_info_and_reruns(assets, tmp_path):
    out = tmp_path / "c"
    base = ["extract", "--model", assets["bert"], "--dataset", assets["csv"], "--out", out, "--batch-size", 8]
    result = adl(*base, "--pool", "mean,max")
    assert result.exit_code == 0, result.output
    assert "size estimate: pooled (mean, max)" in result.stderr and "cache complete" in result.stderr
    assert open_cache(out).views == ["pooled:mean", "pooled:max", "tokens"]

    info = adl("info", out)
    assert info.exit_code == 0, info.output
    for text in ("pooled:max", "48 x 3 x 32", "tokens", "train", "sequence: 2 labels (neg, pos)", "total"):
        assert text in info.stdout
    manifest = json.loads(adl("info", out, "--json").stdout)
    assert manifest["model"]["id"] == assets["bert"] and manifest["task"] == "sequence"
    assert manifest["splits"]["train"] == {"n": 48, "tokens": manifest["splits"]["train"]["tokens"], "labeled": True}

    again = adl(*base, "--pool", "mean,max")
    assert again.exit_code == 0 and "already complete" in again.stderr

    other = adl(*base, "--pool", "cls")
    assert_user_error(other, "already holds another extraction (differs in request.pool)", "--overwrite")
    replaced = adl(*base, "--pool", "cls", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert open_cache(out).views == ["pooled:cls", "tokens"]


def test_max_length_over_the_limit_is_clamped_with_a_warning(assets, tmp_path):
    result = adl("extract", "--model", assets["bert"], "--dataset", assets["csv"], "--out", tmp_path / "c",
                 "--max-length", 1000, "--views", "pooled")
    assert result.exit_code == 0, result.output
    assert "warning: --max-length 1000 exceeds the model's limit of 64 tokens: using 64" in result.stderr
    assert open_cache(tmp_path / "c").manifest["tokenizer"]["max_length"] == 64


def test_truncation_is_counted(assets, tmp_path):
    result = adl("extract", "--model", assets["bert"], "--dataset", assets["csv"], "--out", tmp_path / "c",
                 "--max-length", 6, "--views", "pooled")
    assert result.exit_code == 0, result.output
    m = open_cache(tmp_path / "c").manifest
    assert m["tokenizer"]["truncated"]["train"] > 0 and m["splits"]["train"]["tokens"] <= 6 * 48


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["no-folder", "hub-offline", "no-config", "text-column", "label-column", "layers",
                                  "empty-text", "bad-csv", "bad-conll", "views", "cuda", "project-too-wide"])
def test_bad_input_is_one_clear_line(assets, tmp_path, monkeypatch, case):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, data, extra = assets["bert"], assets["csv"], []
    expect = {
        "no-folder": "no model folder ./no/such/model",
        "hub-offline": "model 'someone/no-such-model' is not in the local hub cache and HF_HUB_OFFLINE=1",
        "no-config": "has no config.json",
        "text-column": "text column 'body' not found; the columns are: text, label",
        "label-column": "label column 'stars' not found; the columns are: text, label",
        "layers": "layer 5 is out of range; the model has 3 hidden states: valid indices are 0..2",
        "empty-text": "empty or missing input(s) in column 'text' at row id(s) 1",
        "bad-csv": "bad.csv:3: expected 2 fields, found 3",
        "bad-conll": "bad.conll:2: expected 'word<TAB>tag'",
        "views": "unknown --views 'words'; use one of pooled, tokens",
        "cuda": "--device cuda, but torch",
        "project-too-wide": "--project 64 is wider than the model's hidden size 32",
    }[case]
    if case == "no-folder":
        model = "./no/such/model"
    elif case == "hub-offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time otherwise
        model = "someone/no-such-model"
    elif case == "no-config":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "text-column":
        extra = ["--text-column", "body"]
    elif case == "label-column":
        extra = ["--label-column", "stars"]
    elif case == "layers":
        extra = ["--layers", "0,5"]
    elif case == "empty-text":
        data = f"csv:{write(tmp_path / 'e.csv', 'text,label' + chr(10) + 'a cat,pos' + chr(10) + ',neg' + chr(10))}"
    elif case == "bad-csv":
        data = f"csv:{write(tmp_path / 'bad.csv', 'text,label' + chr(10) + 'a cat,pos' + chr(10) + 'a,b,c' + chr(10))}"
    elif case == "bad-conll":
        data = f"conll:{write(tmp_path / 'bad.conll', 'john' + chr(9) + 'B-per' + chr(10) + 'runs' + chr(10))}"
    elif case == "views":
        extra = ["--views", "words"]
    elif case == "cuda":
        extra = ["--device", "cuda"]
    elif case == "project-too-wide":
        extra = ["--project", "64"]
    result = adl("extract", "--model", model, "--dataset", data, "--out", tmp_path / "c", *extra)
    assert_user_error(result, expect)


def test_views_that_do_not_fit_the_disk(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "free_bytes", lambda root: 30_000)  # pooled ~12 KB fits, tokens ~160 KB do not
    base = ["extract", "--model", assets["bert"], "--dataset", assets["csv"]]
    explicit = adl(*base, "--out", tmp_path / "a", "--views", "pooled,tokens")
    assert_user_error(explicit, "but only 30.0 KB is free", "--project 64", "--views pooled", "--layers")
    auto = adl(*base, "--out", tmp_path / "b")
    assert auto.exit_code == 0, auto.output
    assert "tokens view skipped" in auto.stderr and open_cache(tmp_path / "b").views == ["pooled:mean"]
    ner = adl("extract", "--model", assets["bert"], "--dataset", assets["conll"], "--out", tmp_path / "n")
    assert_user_error(ner, "the cache needs about")


def test_info_on_an_unfinished_or_missing_cache(tmp_path):
    assert_user_error(adl("info", tmp_path / "nowhere"), "no cache at")
    (tmp_path / "half").mkdir()
    assert_user_error(adl("info", tmp_path / "half"), "not a complete adl cache")
