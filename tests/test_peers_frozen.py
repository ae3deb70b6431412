"""The peers train what their method says and nothing else: after lora, prompt and bitfit training
the frozen backbone's weights are bit-identical (bitfit: every weight but the biases), and on a set a
linear rule separates, each beats chance by far."""

import csv

import numpy as np
import pytest
import torch
from tiny_backbones import WORDS, bert_folder

from adl.cache import open_cache
from adl.extract import models
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
from adl.peers.config import FinetuneConfig, resolve
from adl.peers.data import load_peer_data
from adl.peers.loop import fit_peer
from adl.peers.model import build


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """200 short texts of filler words, each with one 'good' (pos) or one 'bad' (neg): the label is one word."""
    root = tmp_path_factory.mktemp("separable")
    rng = np.random.default_rng(0)
    filler = [w for w in WORDS if w not in ("good", "bad", "not", "great", "awful")]
    path = root / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(200):
            words = list(rng.choice(filler, size=int(rng.integers(1, 5))))
            words.insert(int(rng.integers(0, len(words) + 1)), "good" if i % 2 else "bad")
            w.writerow([" ".join(words), "pos" if i % 2 else "neg"])
    run_extract(ExtractConfig(model=str(bert_folder(root / "bert")), dataset=f"csv:{path}", out=str(root / "c"),
                              views="pooled", batch_size=8, progress=False))
    return root / "c"


@pytest.mark.parametrize("method", ["lora", "prompt", "bitfit"])
def test_the_backbone_stays_frozen_and_a_separable_set_is_learnt(separable, method):
    cache = open_cache(separable)
    man = cache.manifest
    plan = models.select_device("cpu")
    backbone = models.Backbone(models.describe(man["model"]["id"], models.load_config(man["model"]["id"])), plan)
    before = {name: (p, p.detach().clone()) for name, p in backbone.model.named_parameters()}
    cfg = resolve(FinetuneConfig(cache=str(separable), method=method, lr=5e-3, max_epochs=10, patience=10,
                                 batch_size=8,
                                 progress=False))
    torch.manual_seed(0)
    model = build(backbone, cfg, len(man["label_names"]), man["task"], "mean")
    result = fit_peer(model, load_peer_data(cache), cfg, plan)
    changed = sorted(name for name, (p, old) in before.items() if not torch.equal(p, old))
    if method == "bitfit":
        assert changed and all(name.endswith("bias") for name in changed), changed  # only biases moved
    else:
        assert changed == [], changed
    test_n = man["splits"]["test"]["n"]
    assert test_n >= 10 and result.test["accuracy"] >= 0.8, result.test  # chance is 0.5
