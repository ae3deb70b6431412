"""`adl serve` as a user runs it: the real server in a subprocess on a free loopback port, called over HTTP.

The heads are tiny BERT runs (a sentiment head and an NER head on one backbone); answers are
checked against an unbatched in-process Predictor. The failing-batch and SIGTERM tests serve
the fake Predictor of test_serve_batcher.py (slow or failing on demand) through the same
create_app/serve_app.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_predict_cli import runs  # noqa: F401 - the fixture: tiny sentiment and ner runs on one BERT
from typer.testing import CliRunner

from adl.cli import app
from adl.serve import Predictor

TESTS = Path(__file__).resolve().parent
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["good movie", "john sat in london", "the bad plot was awful", "mary is not a good actor",
         "google film on monday", "a cat", "the dog sat on the mat and the movie was really very fun",
         "paris london john mary google"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess: started, waited for on /healthz, stopped with SIGTERM. Its output goes
    to a file (a pipe nobody reads would block a server that logs thousands of requests)."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, *argv, "--port", str(self.port)], cwd=TESTS.parent,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180  # a bound on start-up, not an assertion on speed
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /healthz")
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


@pytest.fixture(scope="module")
def predictor(runs):
    return Predictor([str(runs["sentiment"]), str(runs["ner"])], device="cpu")


@pytest.fixture(scope="module")
def server(runs):
    s = Server(["-m", "adl", "serve", "--run", str(runs["sentiment"]), "--run", str(runs["ner"]), "--device", "cpu",
                "--max-batch-size", "16", "--max-wait-ms", "20", "--max-texts", "8", "--max-chars", "200",
                "--max-body-kb", "4"], env={"ADL_SERVE_TOKEN": TOKEN})
    yield s
    assert s.stop() == 0


def post(server, body, headers=AUTH, **kw):
    return httpx.post(server.url + "/v1/predict", json=body, headers=headers, timeout=60, **kw)


def unbatched(predictor, text, heads=None):
    out = predictor([text], heads=heads)
    return {name: answers[0] for name, answers in out.heads.items()}


def same(got: list[dict], want: list[dict]) -> bool:
    """Labels and entities exactly; probabilities to 1e-6 (a text padded in a batch moves the last bits)."""
    assert [{h: {k: v for k, v in a.items() if k != "probs"} for h, a in r.items()} for r in got] == \
        [{h: {k: v for k, v in a.items() if k != "probs"} for h, a in r.items()} for r in want]
    for g, w in zip(got, want):
        for head in w:
            if "probs" in w[head]:
                assert g[head]["probs"] == pytest.approx(w[head]["probs"], abs=1e-6)
    return True


def test_one_text_alone_is_bit_identical_to_an_unbatched_predictor(server, predictor):
    for text in TEXTS[:4]:
        r = post(server, {"texts": [text]})
        assert r.status_code == 200, r.text
        assert r.json() == {"results": [unbatched(predictor, text)]}
    r = post(server, {"texts": ["john sat in london"], "heads": ["ner"], "return_embedding": True})
    body = r.json()
    assert body["results"] == [unbatched(predictor, "john sat in london", ["ner"])]
    expected = predictor(["john sat in london"], return_embedding=True).embeddings
    assert len(body["embeddings"][0]) == 32 and body["embeddings"] == expected


def test_several_texts_are_what_the_predictor_says_for_each(server, predictor):
    r = post(server, {"texts": TEXTS})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [unbatched(predictor, t) for t in TEXTS] or \
        same(r.json()["results"], [unbatched(predictor, t) for t in TEXTS])


def test_concurrent_requests_each_get_their_own_unbatched_answer(server, predictor):
    """48 requests at once (single texts, pairs, head subsets) coalesce in the server's batcher."""
    jobs = []
    for i in range(48):
        texts = [TEXTS[i % len(TEXTS)]] if i % 3 else [TEXTS[i % len(TEXTS)], TEXTS[(i * 5 + 1) % len(TEXTS)]]
        heads = [None, ["sentiment"], ["ner"]][i % 3]
        jobs.append({"texts": texts, **({"heads": heads} if heads else {})})

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json=j) for j in jobs))

    responses = asyncio.run(go())
    for job, r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert same(r.json()["results"], [unbatched(predictor, t, job.get("heads")) for t in job["texts"]])
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert "adl_batch_requests_count" in metrics and "adl_batch_texts_bucket" in metrics


def test_heads_health_docs_metrics_and_page(server, runs):
    heads = httpx.get(server.url + "/v1/heads", headers=AUTH).json()["heads"]
    assert [h["name"] for h in heads] == ["sentiment", "ner"]
    assert [h["task"] for h in heads] == ["sequence", "token"]
    for h in heads:
        run = runs[h["name"]]
        assert h["labels"] == json.loads((run / "head.json").read_text())["label_names"]
        assert h["metrics"] == json.loads((run / "metrics.json").read_text())["test"]
        assert len(h["weights"]) == len(h["layers"]) and abs(sum(h["weights"]) - 1) < 1e-5
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive", "heads": ["sentiment", "ner"]}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready", "heads": ["sentiment", "ner"]}
    assert "swagger" in httpx.get(server.url + "/docs").text.lower()
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/predict", "/v1/heads", "/healthz", "/readyz", "/info", "/metrics"} <= set(schema["paths"])
    metrics = httpx.get(server.url + "/metrics", headers=AUTH)
    assert metrics.headers["content-type"].startswith("text/plain")
    for series in ("adl_requests_total{", "adl_request_seconds_bucket{", "adl_batch_texts_bucket{",
                   "adl_batch_seconds_count", "adl_predict_in_flight"):
        assert series in metrics.text, series
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/predict" in page.text and "<textarea" in page.text


BAD = {  # name: (body or raw bytes, headers, status, a fragment of the message)
    "malformed JSON": (b'{"texts": ["a",', {}, 422, "not valid JSON"),
    "not an object": ([1, 2], {}, 422, "must be a JSON object"),
    "missing texts": ({"heads": ["ner"]}, {}, 422, '"texts" is missing'),
    "texts a string": ({"texts": "good movie"}, {}, 422, "texts"),
    "texts of numbers": ({"texts": ["ok", 3]}, {}, 422, "texts.1"),
    "empty list": ({"texts": []}, {}, 422, '"texts" is empty'),
    "empty text": ({"texts": ["ok", "  "]}, {}, 422, "texts[1] is empty"),
    "too many texts": ({"texts": ["a"] * 9}, {}, 422, "limit is 8 (--max-texts)"),
    "too long a text": ({"texts": ["a" * 201]}, {}, 422, "limit is 200 (--max-chars)"),
    "body too large": ({"texts": ["a" * 150] * 30}, {}, 413, "4 KiB limit (--max-body-kb)"),
    "unknown head": ({"texts": ["a"], "heads": ["sentiment", "pos"]}, {}, 422, "unknown head 'pos'"),
    "a path as head": ({"texts": ["a"], "heads": ["../../etc/passwd"]}, {}, 422, "unknown head"),
    "unknown field": ({"texts": ["a"], "head": ["ner"]}, {}, 422, 'unknown field "head"'),
    "truncate not a bool": ({"texts": ["a"], "truncate": "no"}, {}, 422, "truncate"),
    "embedding not a bool": ({"texts": ["a"], "return_embedding": "yes"}, {}, 422, "return_embedding"),
    "wrong token": ({"texts": ["a"]}, {"Authorization": "Bearer nope"}, 401, "ADL_SERVE_TOKEN"),
    "no token": ({"texts": ["a"]}, {"Authorization": ""}, 401, "Authorization: Bearer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_json_error_and_the_server_goes_on(server, predictor, case):
    body, headers, status, fragment = BAD[case]
    headers = {**AUTH, **headers, "Content-Type": "application/json"}
    headers = {k: v for k, v in headers.items() if v}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/predict", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert fragment in r.json()["error"], r.json()
    ok = post(server, {"texts": ["good movie"]})
    assert ok.status_code == 200 and same(ok.json()["results"], [unbatched(predictor, "good movie")])


def test_token_guards_heads_and_metrics_but_not_health(server):
    assert httpx.get(server.url + "/v1/heads").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/healthz").status_code == 200
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and "/docs" in r.json()["error"]
    r = httpx.get(server.url + "/v1/predict", headers=AUTH)
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}


def test_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(10):
            yield b" " * 1024

    r = httpx.post(server.url + "/v1/predict", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "--max-body-kb" in r.json()["error"]


def fake_server(*args):
    return Server([str(TESTS / "test_serve_batcher.py"), *args])


def test_a_failing_batch_answers_500_and_the_server_goes_on():
    s = fake_server("--delay", "0.05")
    try:
        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/predict", json={"texts": [t]})
                                              for t in ["fine", "BOOM now", "also fine", "Apple"]))

        fine, boom, also, apple = asyncio.run(go())
        assert boom.status_code == 500 and "the backbone blew up on BOOM" in boom.json()["error"]
        assert fine.status_code == also.status_code == apple.status_code == 200
        assert apple.json()["results"][0]["ner"]["entities"][0]["text"] == "Apple"
        assert httpx.post(s.url + "/v1/predict", json={"texts": ["later"]}).status_code == 200
        failures = re.search(r"^adl_batch_failures_total (\S+)$", httpx.get(s.url + "/metrics").text, re.M)
        assert float(failures.group(1)) >= 1
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_the_request_in_flight_then_exits_0():
    s = fake_server("--delay", "3")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(s.url + "/v1/predict", json={"texts": ["x"]},
                                                                   timeout=60)))
    t.start()
    while "adl_predict_in_flight 1.0" not in httpx.get(s.url + "/metrics").text:
        time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["results"][0]["sentiment"]["label"]
    assert s.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/healthz")


@pytest.mark.parametrize("args, fragment", [
    ([], "Missing option '--run'"),
    (["--run", "nowhere", "--port", "70000"], "--port must be an integer in [0, 65535] (got 70000)"),
    (["--run", "nowhere", "--max-texts", "0"], "--max-texts must be an integer >= 1 (got 0)"),
    (["--run", "nowhere/such-run"], "nowhere/such-run"),
])
def test_serve_flag_errors_are_one_line_and_exit_2(args, fragment):
    res = CliRunner().invoke(app, ["serve", *args])
    assert res.exit_code == 2 and fragment in res.output, res.output
