"""`adl train` and `adl baselines` end to end through the real typer app on synthetic caches."""

import csv
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from adl.cache import open_cache
from adl.cli import app
from adl.train.data import load_data
from adl.train.rundir import load_head
from adl.train.trainer import predict, score
from synthetic import write_synthetic_cache

FAST = ["--k", "8", "--heads", "2", "--ff", "16", "--lr", "0.01", "--alpha", "10", "--max-epochs", "3"]
runner = CliRunner()


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {"seq": write_synthetic_cache(d / "seq", n=(48, 16, 16)),
            "ner": write_synthetic_cache(d / "ner", task="token", n=(48, 16, 16)),
            "pooled": write_synthetic_cache(d / "pooled", views=("pooled:mean",), n=(16, 8, 8))}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", ["seq", "ner"])
def test_train_writes_a_run_that_rebuilds_without_the_cache(caches, tmp_path, name):
    out = tmp_path / "run"
    res = invoke("train", "--cache", caches[name], "--out", out, "--lambda", "0.02", *FAST)
    assert res.exit_code == 0, res.output
    assert "trainable parameters" in res.output
    assert "epoch 1: loss " in res.output  # not a terminal (a log file): one plain line per epoch
    for f in ("config.json", "metrics.json", "history.csv", "head.safetensors", "head.json",
              "layer_weights.png", "layer_weights_final.png"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    m = "f1" if name == "ner" else "accuracy"
    # no --head: every default head the cache allows, cheapest first, mixed with weights chosen on validation
    heads = {"seq": ["concat-probe", "adalayers-pooled", "adalayers"], "ner": ["concat-probe", "adalayers"]}[name]
    assert "head: a mix, chosen on validation, of adalayers (tokens)" in res.output
    tried, mix = metrics["candidates"], metrics["mix"]
    assert set(tried) == set(heads)  # trained in this order: the cheapest first
    assert abs(sum(mm["weight"] for mm in mix["members"]) - 1) < 1e-9 and all(mm["weight"] > 0 for mm in mix["members"])
    kept = "ensemble" if len(mix["members"]) > 1 else mix["members"][0]["head"]
    assert metrics["head"] == kept and f"kept {kept} " in res.output
    assert set(mix["variants"]) >= {"best single", "mix"}
    assert config["config"]["lam"] == 0.02
    assert config["cache_hash"] == open_cache(caches[name]).hash and "adl_version" in config
    assert metrics["metric"] == m and set(metrics) >= {"validation", "test", "active_layers", "params"}
    assert ("per_type" if name == "ner" else "per_class") in metrics["test"]
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    best = max(tried, key=lambda h: (tried[h][f"validation_{m}"], -heads.index(h)))  # the history is the best's
    assert len(rows) == (6 if best == "concat-probe" else tried[best]["epochs"])  # a probe: one row per C tried
    assert {"loss", f"val_{m}", "seconds", "w_0", "w_3"} <= set(rows[0])
    assert abs(sum(float(rows[-1][f"w_{i}"]) for i in range(4)) - 1) < 1e-5
    # the saved head alone reproduces the test metrics
    head, info = load_head(out)
    assert info["label_names"] == open_cache(caches[name]).label_names and info["layers"] == [0, 1, 2, 3]
    assert info["view"] == config["view"]
    data = load_data(open_cache(caches[name]), info["view"], device="cpu", seed=0, memory_gb=1.0)
    assert score(predict(head, data.test, 8), data.test, info["label_names"]) == metrics["test"]


def test_baselines_write_csv_and_chart(caches, tmp_path):
    out = tmp_path / "base"
    res = invoke("baselines", "--cache", caches["seq"], "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    with open(out / "baselines.csv") as f:
        rows = list(csv.DictReader(f))
    names = [r["name"] for r in rows]
    assert names == (["adalayers"] + ["single-layer"] * 4 + ["linear-probe"] * 4 +
                     ["concat-probe", "scalar-mix", "head2toe-lasso", "head2toe"] + ["hsv"] * 4)
    assert list(rows[0]) == ["name", "layer", "val_accuracy", "test_accuracy", "params", "seconds", "hsv"]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows if r["name"] != "hsv")
    hsv = [float(r["hsv"]) for r in rows if r["name"] == "hsv"]
    assert int(np.argmin(hsv)) == 2  # the signal layer is the best separated
    assert (out / "baselines.png").is_file()


@pytest.mark.parametrize("name", ["seq", "ner"])
def test_train_limit_trains_on_a_sample(caches, tmp_path, name):
    out = tmp_path / "run"
    res = invoke("train", "--cache", caches[name], "--out", out, "--train-limit", "5", *FAST)
    assert res.exit_code == 0, res.output
    assert "| 5 training examples |" in res.output
    assert json.loads((out / "config.json").read_text())["config"]["train_limit"] == 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_examples"] == 5 and metrics["test"] is not None


def test_pooled_only_cache_tries_the_pooled_head_and_the_probe(caches, tmp_path):
    res = invoke("train", "--cache", caches["pooled"], "--out", tmp_path / "r", *FAST)
    assert res.exit_code == 0, res.output
    assert "head: a mix, chosen on validation, of adalayers-pooled and concat-probe" in res.output
    assert set(json.loads((tmp_path / "r" / "metrics.json").read_text())["candidates"]) == {"concat-probe",
                                                                                           "adalayers-pooled"}


def test_a_given_head_is_the_only_one_trained(caches, tmp_path):
    res = invoke("train", "--cache", caches["seq"], "--out", tmp_path / "r", "--head", "adalayers", *FAST)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "candidates" not in metrics and metrics["head"] == "adalayers" and "a mix" not in res.output


def _one_error_line(res, fragment):
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert fragment in res.output, res.output


def test_bad_inputs_get_one_clear_line(caches, tmp_path):
    _one_error_line(invoke("train", "--cache", caches["pooled"], "--head", "adalayers", "--out", tmp_path / "a"),
                    "re-extract with `adl extract ... --views tokens`")
    _one_error_line(invoke("train", "--cache", caches["ner"], "--head", "adalayers-pooled"),
                    "adalayers-pooled is a sequence-task head")
    _one_error_line(invoke("train", "--cache", caches["seq"], "--cutoff", "1.5"), "--cutoff must be in [0, 1)")
    _one_error_line(invoke("train", "--cache", caches["seq"], "--k", "0"), "--k must be an integer >= 1")
    _one_error_line(invoke("train", "--cache", caches["seq"], "--alpha", "-1"), "--alpha must be > 0")
    _one_error_line(invoke("train", "--cache", caches["seq"], "--train-limit", "0"),
                    "--train-limit must be an integer >= 1 (got 0)")
    _one_error_line(invoke("baselines", "--cache", caches["seq"], "--train-limit", "-3"),
                    "--train-limit must be an integer >= 1")
    _one_error_line(invoke("sweep", "--cache", caches["seq"], "--alpha", "1,2", "--train-limit", "5,10"),
                    "--train-limit takes one value in a sweep")
    _one_error_line(invoke("train", "--cache", tmp_path / "nowhere"), "no cache at")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.json").write_text("{}")
    _one_error_line(invoke("train", "--cache", caches["seq"], "--out", tmp_path / "taken"), "pass --overwrite")
    broken = tmp_path / "broken"
    shutil.copytree(caches["pooled"], broken)
    (broken / "manifest.json").unlink()
    _one_error_line(invoke("baselines", "--cache", broken), "is not a complete adl cache")
    assert invoke("train", "--cache", caches["seq"], "--bogus", "1").exit_code == 2  # typer's usage error


def test_projected_cache_head_skips_its_gelu(tmp_path):
    """Tokens stored as P gelu(Z) (adl extract --project): the head must not apply GELU again."""
    root = write_synthetic_cache(tmp_path / "proj", n=(16, 8, 8), projection={"method": "random", "dim": 8,
                                                                              "activation": "gelu"})
    res = invoke("train", "--cache", root, "--head", "adalayers", "--out", tmp_path / "r", *FAST[:-1], "1")
    assert res.exit_code == 0, res.output
    head, info = load_head(tmp_path / "r")
    assert info["spec"]["activation"] is False and head.mix.activation is False


def test_newer_schema_cache_is_refused(caches, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(caches["pooled"], newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    _one_error_line(invoke("train", "--cache", newer), "written by a newer adl")


def test_run_folders_adl_did_not_write_are_never_replaced(caches, tmp_path, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text("my own config")
    (user / "notes.txt").write_text("keep me")
    res = invoke("train", "--cache", caches["seq"], "--out", user, "--overwrite", *FAST)
    assert res.exit_code == 2 and "holds files adl did not write" in res.output
    assert (user / "config.json").read_text() == "my own config" and not (tmp_path / "mine.partial").exists()
    monkeypatch.chdir(tmp_path)
    res = invoke("train", "--cache", caches["seq"], "--out", ".", "--overwrite", *FAST)
    assert res.exit_code == 2 and "is the current folder" in res.output
    link = tmp_path / "link"
    link.symlink_to(user)
    res = invoke("train", "--cache", caches["seq"], "--out", link, "--overwrite", *FAST)
    assert res.exit_code == 2 and "is a symlink" in res.output and (user / "notes.txt").is_file()


@pytest.mark.parametrize("files", [
    {"config.json": '{"model_type": "bert"}'},  # nothing but a file named as adl names its own
    {"config.json": '{"model_type": "bert"}', "metrics.json": "{}", "history.csv": "epoch\n1\n"},
    {"config.json": "[1, 2]"},
])
def test_a_users_folder_of_run_file_names_is_never_replaced(caches, tmp_path, files):
    """adl knows its run folders by the marker in their config.json, not by file names."""
    user = tmp_path / "mine"
    user.mkdir()
    for name, text in files.items():
        (user / name).write_text(text)
    res = invoke("train", "--cache", caches["seq"], "--out", user, "--overwrite", *FAST)
    _one_error_line(res, "holds files adl did not write (config.json without adl's marker)")
    assert {p.name: p.read_text() for p in user.iterdir()} == files
    partial = tmp_path / "run.partial"  # a user's folder where adl would write aside is not cleared either
    partial.mkdir()
    (partial / "config.json").write_text('{"model_type": "bert"}')
    res = invoke("train", "--cache", caches["seq"], "--out", tmp_path / "run", *FAST)
    _one_error_line(res, "is not an unfinished adl run")
    assert (partial / "config.json").read_text() == '{"model_type": "bert"}'


def test_a_rerun_replaces_the_whole_run(caches, tmp_path):
    out = tmp_path / "run"
    assert invoke("train", "--cache", caches["seq"], "--out", out, *FAST).exit_code == 0
    (out / "layer_weights.png").unlink()  # a file the first run wrote, gone before the rerun
    res = invoke("train", "--cache", caches["seq"], "--out", out, "--overwrite", *FAST)
    assert res.exit_code == 0, res.output
    assert (out / "layer_weights.png").is_file() and not (tmp_path / "run.partial").exists()
    assert not (tmp_path / "run.replaced").exists()
    assert json.loads((out / "config.json").read_text())["adl_run"] == "train"  # the marker
