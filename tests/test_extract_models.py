"""End to end on tiny random backbones of every family: the cache holds exactly what the model
computes on each example alone (so batching, padding, pooling and offsets are right)."""

import numpy as np
import pytest
import torch
from tiny_backbones import bart_folder, bert_folder, direct_states, gpt2_folder, roberta_folder, write_conll, write_csv

from adl.cache import open_cache
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.datasets import load_dataset
from adl.extract.run import run_extract

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": bert_folder(root / "bert"), "roberta": roberta_folder(root / "roberta"),
        "bart": bart_folder(root / "bart"), "gpt2": gpt2_folder(root / "gpt2"),
        "csv": f"csv:{write_csv(root / 'd.csv')}", "conll": f"conll:{write_conll(root / 'd.conll')}",
    }


def by_id(spec: str) -> dict:
    ds = load_dataset(spec)
    return {name: dict(zip(s.ids.tolist(), s.texts or s.words)) for name, s in ds.splits.items()}, ds


def hand_pool(kind: str, states: np.ndarray) -> np.ndarray:
    """states (L, T, H) of one example -> (L, H)."""
    return {"mean": states.mean(1), "cls": states[:, 0], "last": states[:, -1], "max": states.max(1)}[kind]


def extract(assets, name, out, **kw):
    cfg = ExtractConfig(model=str(assets[name]), dataset=kw.pop("dataset", assets["csv"]), out=str(out),
                        dtype=kw.pop("dtype", "float32"), batch_size=kw.pop("batch_size", 8), progress=False, **kw)
    return run_extract(cfg), open_cache(out)


@pytest.mark.parametrize("name, decoder, pools, family, states, n_states", [
    ("bert", False, "mean,cls,last,max", "encoder", "encoder", 3),
    ("roberta", False, "mean,max", "encoder", "encoder", 3),
    ("bart", False, None, "encoder-decoder", "encoder", 3),
    ("bart", True, None, "encoder-decoder", "decoder", 4),
    ("gpt2", False, None, "decoder", "decoder", 3),
])
def test_cache_matches_direct_computation(assets, tmp_path, name, decoder, pools, family, states, n_states):
    manifest, c = extract(assets, name, tmp_path / "c", views="pooled,tokens", pool=pools, decoder=decoder)
    expected_pools = pools.split(",") if pools else ["last" if states == "decoder" else "mean"]
    assert manifest["model"]["family"] == family and manifest["model"]["states"] == states
    assert manifest["layers"] == list(range(n_states)) and manifest["hidden_size"] == 32
    assert c.views == [f"pooled:{p}" for p in expected_pools] + ["tokens"]
    texts, _ = by_id(assets["csv"])
    for split in ("train", "test"):
        rows = [texts[split][i] for i in c.ids(split)]
        direct = direct_states(assets[name], rows, decoder=decoder)
        for kind in expected_pools:
            pooled = c.read(split, f"pooled:{kind}")
            assert pooled.shape == (len(rows), n_states, 32) and pooled.dtype == np.float32
            np.testing.assert_allclose(pooled, np.stack([hand_pool(kind, d) for d in direct]), **TOL)
        values, offsets = c.read(split, "tokens")
        assert offsets.tolist() == np.concatenate([[0], np.cumsum([d.shape[1] for d in direct])]).tolist()
        for i in (0, len(rows) // 2, len(rows) - 1):
            np.testing.assert_allclose(values[offsets[i]:offsets[i + 1]], direct[i].transpose(1, 0, 2), **TOL)
        lengths = np.diff(offsets)
        assert (np.diff(lengths) <= 0).all()  # extraction order: longest first
    assert c.labels("train").dtype == np.int64 and set(c.labels("train")) <= {0, 1}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_formats_layer_subset_and_float16(assets, tmp_path, fmt):
    manifest, c = extract(assets, "bert", tmp_path / fmt, format=fmt, layers="-1", dtype="float16", views="pooled")
    assert manifest["format"] == fmt and manifest["layers"] == [2] and c.views == ["pooled:mean"]
    _, f32 = extract(assets, "bert", tmp_path / "full", views="pooled", dtype="float32")
    x = c.read("train", "pooled:mean")
    assert x.shape == (48, 1, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], f32.read("train", "pooled:mean")[:, 2], rtol=1e-3, atol=1e-3)
    assert np.dtype(c._stores[0].array("train/pooled_mean").dtype) == np.float16  # stored half, read float32
    np.testing.assert_array_equal(np.sort(c.ids("train")), np.sort(f32.ids("train")))


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_ner_tokens_word_ids_and_first_subtoken_labels(assets, tmp_path, name):
    manifest, c = extract(assets, name, tmp_path / "c", dataset=assets["conll"])
    assert manifest["task"] == "token" and "tokens" in c.views and "pooled:mean" in c.views  # default views
    words, ds = by_id(assets["conll"])
    split = "train"
    ids, offsets = c.ids(split), c.offsets(split)
    word_ids, labels = c.word_ids(split), c.labels(split)
    assert len(word_ids) == len(labels) == offsets[-1]
    tags = {int(i): t for i, t in zip(ds.splits[split].ids, ds.splits[split].labels)}
    for i, row in enumerate(ids):
        w = word_ids[offsets[i]:offsets[i + 1]]
        lab = labels[offsets[i]:offsets[i + 1]]
        assert w[0] == -1 and w[-1] == -1  # specials
        first = np.flatnonzero((w >= 0) & np.concatenate([[True], w[1:] != w[:-1]]))
        assert w[first].tolist() == list(range(len(words[split][row])))  # every word kept (short rows)
        assert lab[first].tolist() == tags[int(row)]
        assert (np.delete(lab, first) == -100).all()
    direct = direct_states(assets[name], [words[split][ids[0]]], words=True)[0]
    values, _ = c.read(split, "tokens")
    np.testing.assert_allclose(values[offsets[0]:offsets[1]], direct.transpose(1, 0, 2), rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("method", ["pca", "random"])
def test_projection_is_applied_after_gelu_and_saved(assets, tmp_path, method):
    manifest, c = extract(assets, "bert", tmp_path / "c", views="tokens", project=4, project_method=method)
    proj = c.projection()
    assert manifest["projection"]["activation"] == "gelu" and manifest["projection"]["method"] == method
    assert manifest["token_dim"] == 4 and proj["matrix"].shape == (3, 32, 4) and proj["mean"].shape == (3, 32)
    if method == "pca":
        gram = np.einsum("lhd,lhe->lde", proj["matrix"], proj["matrix"])
        np.testing.assert_allclose(gram, np.broadcast_to(np.eye(4), gram.shape), atol=1e-5)
        assert manifest["projection"]["sample_tokens"] >= 600  # all train tokens of the tiny set
    texts, _ = by_id(assets["csv"])
    ids = c.ids("test")
    direct = direct_states(assets["bert"], [texts["test"][i] for i in ids[:2]])
    values, offsets = c.read("test", "tokens")
    for i in range(2):
        act = torch.nn.functional.gelu(torch.tensor(direct[i])).numpy()  # (L, T, H)
        expected = np.einsum("lth,lhd->tld", act - proj["mean"][:, None], proj["matrix"])
        np.testing.assert_allclose(values[offsets[i]:offsets[i + 1]], expected, rtol=1e-4, atol=1e-4)


def test_float16_overflow_is_a_clear_error(assets, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["bert"])
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.mul_(1e6)
    folder = tmp_path / "loud"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((assets["bert"] / f).read_bytes())
    with pytest.raises(AdlError, match="overflow float16 .* rerun with --dtype float32"):
        run_extract(ExtractConfig(model=str(folder), dataset=assets["csv"], out=str(tmp_path / "c"),
                                  views="pooled", progress=False))
