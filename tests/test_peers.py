"""adl finetune and adl compare on tiny random backbones: every method trains a few steps on the
cache's exact examples, writes adl train's run files, and bad input is one line with exit 2."""

import csv
import json
import shutil

import numpy as np
import pytest
from assets import needs
from tiny_backbones import bart_folder, bert_folder, gpt2_folder, write_conll, write_csv
from typer.testing import CliRunner

from adl.cache import open_cache
from adl.cli import app
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
from adl.peers.config import DEFAULTS, FinetuneConfig, resolve
from adl.peers.data import load_peer_data
from adl.train.data import load_data

runner = CliRunner()
FAST = ["--max-epochs", "2", "--max-steps", "2", "--batch-size", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    csv_spec, conll_spec = f"csv:{write_csv(root / 'd.csv', n=80)}", f"conll:{write_conll(root / 'd.conll', n=60)}"

    def extract(model, spec, name, **kw):
        run_extract(ExtractConfig(model=str(model), dataset=spec, out=str(root / name), batch_size=8,
                                  progress=False, **kw))
        return root / name

    bert, gpt2, bart = bert_folder(root / "bert"), gpt2_folder(root / "m-gpt2"), bart_folder(root / "m-bart")
    return {"seq": extract(bert, csv_spec, "seq", views="pooled"), "ner": extract(bert, conll_spec, "ner"),
            "gpt2": extract(gpt2, csv_spec, "gpt2", views="pooled"),
            "bart": extract(bart, csv_spec, "bart", views="pooled"),
            "proj": extract(bert, csv_spec, "proj", views="tokens", project=4), "root": root, "csv": root / "d.csv"}


def test_the_peer_sees_exactly_the_cached_rows_in_cache_order(assets):
    cache = open_cache(assets["seq"])
    data = load_peer_data(cache)
    for name, split in data.splits.items():
        assert np.array_equal(split.raw.ids, cache.ids(name))
        assert np.array_equal(split.labels, cache.labels(name))
    ner = open_cache(assets["ner"])
    data = load_peer_data(ner)
    assert np.array_equal(data.splits["test"].labels, ner.labels("test"))
    assert np.array_equal(data.splits["test"].offsets, ner.offsets("test"))


def test_train_limit_gives_the_peer_the_heads_sample(assets, tmp_path):
    """`adl finetune --train-limit N --seed S` trains on the rows `adl train --train-limit N --seed S` reads."""
    cache = open_cache(assets["seq"])
    heads = load_data(cache, "pooled:mean", device="cpu", seed=3, memory_gb=1.0, train_limit=20)
    peer = load_peer_data(cache, train_limit=20, seed=3).splits["train"]
    assert len(peer) == heads.train.n == 20
    assert np.array_equal(peer.raw.ids, cache.ids("train")[heads.train.rows])
    assert np.array_equal(peer.labels, cache.labels("train")[heads.train.rows])
    assert len(load_peer_data(cache, train_limit=20, seed=4).splits["validation"]) == cache.manifest["splits"][
        "validation"]["n"]
    res = invoke("finetune", "--cache", assets["seq"], "--method", "full", "--train-limit", "20", "--seed", "3",
                 "--out", tmp_path / "run", *FAST)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["train_limit"] == 20


@pytest.mark.parametrize("cache, method", [("seq", "full"), ("seq", "bitfit"), ("seq", "lora"), ("seq", "prompt"),
                                           ("seq", "ptuning-bias"), ("ner", "lora"), ("ner", "ptuning-bias"),
                                           ("gpt2", "prompt"), ("bart", "bitfit")])
def test_finetune_writes_adl_train_run_files(assets, tmp_path, cache, method):
    out = tmp_path / "run"
    res = invoke("finetune", "--cache", assets[cache], "--method", method, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    assert "epoch 1: loss " in res.output and "trainable parameters" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["cache_manifest.json", "config.json", "history.csv",
                                                     "metrics.json"]
    doc = json.loads((out / "metrics.json").read_text())
    m = "f1" if cache == "ner" else "accuracy"
    assert doc["metric"] == m and doc["method"] == method and 0 <= doc["test"][m] <= 1
    assert 0 < doc["seconds_to_best"] <= doc["seconds"] <= doc["seconds_total"] and doc["peak_memory_mb"] > 0
    n = {s: open_cache(assets[cache]).manifest["splits"][s]["n"] for s in ("train", "validation", "test")}
    epochs = doc["epochs"]
    f = doc["forwards"]
    assert f["backward_examples"] == epochs * 2 * 8  # two steps of eight a epoch
    assert f["examples"] == f["backward_examples"] + epochs * n["validation"] + n["test"]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["lr"] == DEFAULTS[method]["lr"] and config["cache_hash"] == open_cache(assets[cache]).hash
    with open(out / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == epochs


def test_trainable_parameters_per_method(assets):
    """full > lora and bitfit > head; prompt tuning trains its tokens and the head only."""
    from adl.extract import models
    from adl.peers.model import build
    from adl.train.trainer import trainable_params

    man = open_cache(assets["seq"]).manifest
    info = models.describe(man["model"]["id"], models.load_config(man["model"]["id"]))
    counts = {}
    for method in ("full", "bitfit", "lora", "prompt", "ptuning-bias"):
        backbone = models.Backbone(info, models.select_device("cpu"))
        counts[method] = trainable_params(build(backbone, resolve(FinetuneConfig(cache="x", method=method)), 2,
                                                "sequence", "mean"))
    head = 32 * 2 + 2
    total = sum(p.numel() for p in backbone.model.parameters()) + head
    assert counts["full"] == total
    assert counts["prompt"] == 20 * 32 + head
    biases = sum(p.numel() for n, p in backbone.model.named_parameters() if n.endswith("bias"))
    assert counts["bitfit"] == biases + head
    assert head < counts["lora"] < counts["full"] and counts["ptuning-bias"] > counts["prompt"]


def test_setfit_on_a_token_cache_is_refused(assets, tmp_path):
    res = invoke("finetune", "--cache", assets["ner"], "--method", "setfit", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "token task" in res.output


@pytest.mark.parametrize("args, says", [
    (["--method", "adapter"], "unknown --method"),
    (["--method", "lora", "--virtual-tokens", "4"], "does not apply"),
    (["--method", "full", "--lr", "-1"], "--lr must be > 0 (got -1.0)"),
])
def test_bad_flags_are_one_line(assets, tmp_path, args, says):
    res = invoke("finetune", "--cache", assets["seq"], "--out", tmp_path / "r", *args)
    assert res.exit_code == 2 and says in res.output and len(res.output.strip().splitlines()) <= 2


def test_a_projected_cache_is_refused(assets, tmp_path):
    res = invoke("finetune", "--cache", assets["proj"], "--method", "full", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "raw text" in res.output


def test_prompt_on_an_encoder_decoder_is_refused(assets, tmp_path):
    res = invoke("finetune", "--cache", assets["bart"], "--method", "prompt", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "encoder-decoder" in res.output


def test_a_model_without_input_embeddings_cannot_take_prompts(assets):
    from adl.extract import models
    from adl.peers.model import build

    man = open_cache(assets["seq"]).manifest
    backbone = models.Backbone(models.describe(man["model"]["id"], models.load_config(man["model"]["id"])),
                               models.select_device("cpu"))
    backbone.model.get_input_embeddings = lambda: None
    with pytest.raises(AdlError, match="no input embeddings"):
        build(backbone, resolve(FinetuneConfig(cache="x", method="prompt")), 2, "sequence", "mean")


def test_a_data_set_that_cannot_be_reread_is_refused(assets, tmp_path):
    root = tmp_path / "moved"
    shutil.copy(assets["csv"], tmp_path / "d.csv")
    run_extract(ExtractConfig(model=str(assets["root"] / "bert"), dataset=f"csv:{tmp_path / 'd.csv'}", out=str(root),
                              views="pooled", batch_size=8, progress=False))
    (tmp_path / "d.csv").unlink()
    res = invoke("finetune", "--cache", root, "--method", "full", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "cannot re-read the data set" in res.output
    write_csv(tmp_path / "d.csv", n=80, seed=5)  # same place, other rows
    res = invoke("finetune", "--cache", root, "--method", "full", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "changed since extraction" in res.output


def test_compare_mixes_adl_runs_and_peers(assets, tmp_path):
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"full{seed}")
        assert invoke("finetune", "--cache", assets["seq"], "--method", "full", "--seed", seed, "--out", runs[-1],
                      *FAST).exit_code == 0
    runs.append(tmp_path / "adl")
    res = invoke("train", "--cache", assets["seq"], "--out", runs[-1], "--head", "adalayers-pooled", "--k", "8",
                 "--heads", "2", "--max-epochs", "2")
    assert res.exit_code == 0, res.output
    res = invoke("compare", *runs, "--out", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "adl adalayers-pooled"} and rows["full"]["seeds"] == "2"
    adl = rows["adl adalayers-pooled"]
    assert float(adl["sweep10_seconds"]) == pytest.approx(float(adl["extraction_seconds"]) + 10 * float(adl["seconds"]))
    assert float(rows["full"]["extraction_seconds"]) == 0
    for f in ("compare.md", "quality_vs_params.png", "quality_vs_time.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0


def test_compare_refuses_other_data(assets, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("finetune", "--cache", assets["seq"], "--method", "bitfit", "--out", a, *FAST).exit_code == 0
    assert invoke("finetune", "--cache", assets["ner"], "--method", "bitfit", "--out", b, *FAST).exit_code == 0
    res = invoke("compare", a, b, "--out", tmp_path / "cmp")
    assert res.exit_code == 2 and "on data set" in res.output and len(res.output.strip().splitlines()) <= 2


@needs("setfit")
def test_setfit_trains_on_a_tiny_body(assets, tmp_path):
    out = tmp_path / "setfit"
    res = invoke("finetune", "--cache", assets["seq"], "--method", "setfit", "--max-steps", "2", "--batch-size", "4",
                 "--out", out)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["method"] == "setfit" and 0 <= doc["test"]["accuracy"] <= 1
    assert "loss nan" not in res.output  # the body's contrastive loss, read from its trainer's log
    n = open_cache(assets["seq"]).manifest["splits"]
    # two steps of four pairs (eight texts) with backward; then train (the head's fit), validation, test embedded
    assert doc["forwards"]["backward_examples"] == 2 * 4 * 2
    assert doc["forwards"]["examples"] == 16 + n["train"]["n"] + n["validation"]["n"] + n["test"]["n"]


def test_compare_reads_a_sweep(assets, tmp_path):
    sweep = tmp_path / "sweep"
    res = invoke("sweep", "--cache", assets["seq"], "--k", "4,8", "--heads", "2", "--max-epochs", "2", "--seeds", "2",
                 "--baselines", "off", "--out", sweep)
    assert res.exit_code == 0, res.output
    peer = tmp_path / "lora"
    assert invoke("finetune", "--cache", assets["seq"], "--method", "lora", "--out", peer, *FAST).exit_code == 0
    res = invoke("compare", sweep, peer, "--out", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    best = json.loads((sweep / "best.json").read_text())["best"]
    row = rows["adl sweep best (adalayers-pooled)"]
    assert row["seeds"] == "2" and float(row["mean"]) == pytest.approx(best["test"])
