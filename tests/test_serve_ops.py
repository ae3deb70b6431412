"""`adl serve` in production, as an operator meets it: overload, failures, shutdown, a long run,
heads loaded while clients send requests, per-request options and concurrent Predictor calls.

Real server processes on loopback (tiny BERT runs, or the fake Predictor of
test_serve_batcher.py when a backbone must hang, fail or be slow on demand), called with httpx.
Counts and times are bounded; nothing asserts a speed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from test_predict_cli import runs  # noqa: F401 - the fixture: tiny sentiment and ner runs on one BERT
from test_serve import AUTH, TEXTS, TOKEN, Server, fake_server, same, unbatched

from adl.serve import Predictor


def metric(url: str, name: str, headers=None) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(url + "/metrics", headers=headers).text, re.M)
    return float(found.group(1)) if found else 0.0


def serve_runs(runs, *flags, names=("sentiment", "ner"), env=None) -> Server:
    argv = ["-m", "adl", "serve", "--device", "cpu", *[a for n in names for a in ("--run", str(runs[n]))], *flags]
    return Server(argv, env)


@pytest.fixture(scope="module")
def predictor(runs):
    return Predictor([str(runs["sentiment"]), str(runs["ner"])], device="cpu")


@pytest.fixture(scope="module")
def expected(predictor):
    return {t: unbatched(predictor, t) for t in TEXTS}


async def _hammer(url, bodies, concurrency, headers=None, timeout=120.0):
    """Send ``bodies`` with ``concurrency`` clients at once -> [(status, seconds, response)] in order."""
    out = [None] * len(bodies)
    todo = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        async def one_client():
            for i in todo:
                t = time.perf_counter()
                r = await client.post("/v1/predict", json=bodies[i])
                out[i] = (r.status_code, time.perf_counter() - t, r)
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return out


def test_overload_is_refused_at_once_and_the_admitted_are_answered_right(runs, expected):
    """2,000 requests from 256 clients at once against --max-concurrent-requests 64."""
    timeout = 30
    s = serve_runs(runs, "--max-concurrent-requests", "64", "--request-timeout-s", str(timeout))
    try:
        bodies = [{"texts": [TEXTS[i % len(TEXTS)]]} for i in range(2000)]
        got = asyncio.run(_hammer(s.url, bodies, 256, timeout=timeout + 60))
        statuses = [status for status, *_ in got]
        assert set(statuses) <= {200, 429}, {st for st in statuses if st not in (200, 429)}  # all answered
        refused = [(sec, r) for status, sec, r in got if status == 429]
        admitted = [(sec, r, body) for (status, sec, r), body in zip(got, bodies) if status == 200]
        assert refused and len(admitted) >= 64
        assert all(r.headers["retry-after"] == "1" and "--max-concurrent-requests" in r.json()["error"]
                   for _, r in refused)
        for _, r, body in admitted:
            assert same(r.json()["results"], [expected[body["texts"][0]]])
        # refused at once: a refusal takes less than an admitted request does
        assert np.median([sec for sec, _ in refused]) < np.median([sec for sec, *_ in admitted])
        assert metric(s.url, "adl_rejected_total") == len(refused)
        # nothing waited past the timeout to start (the server's own clock)
        assert metric(s.url, f'adl_queue_wait_seconds_bucket{{le="{float(timeout)}"}}') == \
            metric(s.url, "adl_queue_wait_seconds_count") == len(admitted)
        assert httpx.get(s.url + "/readyz").status_code == 200
    finally:
        assert s.stop() == 0


def test_a_dead_batching_loop_fails_every_waiting_request_and_readiness():
    s = fake_server("--delay", "1", "--kill-loop")
    try:
        async def go():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
                first = asyncio.create_task(client.post("/v1/predict", json={"texts": ["first"]}))
                while metric(s.url, "adl_predict_in_flight") < 1:
                    await asyncio.sleep(0.02)
                rest = [client.post("/v1/predict", json={"texts": [t]}) for t in ("KILL", "waiting", "too")]
                return await asyncio.gather(first, *rest)

        first, *failed = asyncio.run(go())
        assert first.status_code == 200
        for r in failed:
            assert r.status_code == 500 and "batching loop died" in r.json()["error"]
            assert "injected fault" in r.json()["error"]
        later = httpx.post(s.url + "/v1/predict", json={"texts": ["later"]})
        assert later.status_code == 500 and "restart the server" in later.json()["error"]
        assert httpx.get(s.url + "/readyz").status_code == 503
        assert httpx.get(s.url + "/healthz").status_code == 500
    finally:
        assert s.stop() == 0


def test_a_client_that_goes_away_is_never_computed():
    s = fake_server("--delay", "2")
    try:
        busy = threading.Thread(target=lambda: httpx.post(s.url + "/v1/predict", json={"texts": ["busy"]}, timeout=60))
        busy.start()
        while metric(s.url, "adl_predict_in_flight") < 1:
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection while queued
            httpx.post(s.url + "/v1/predict", json={"texts": ["gone", "away"]}, timeout=0.5)
        busy.join(60)
        while metric(s.url, "adl_predict_in_flight") > 0:
            time.sleep(0.02)
        assert metric(s.url, "adl_abandoned_total") == 1
        assert metric(s.url, "adl_batch_texts_sum") == 1  # only "busy" was ever computed
        assert httpx.post(s.url + "/v1/predict", json={"texts": ["after"]}, timeout=60).status_code == 200
        assert metric(s.url, "adl_batch_texts_sum") == 2
    finally:
        assert s.stop() == 0


def test_sigterm_with_a_hanging_forward_exits_0_within_the_graceful_timeout():
    s = fake_server("--delay", "3600", "--graceful-timeout-s", "2")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(s.url + "/v1/predict", json={"texts": ["x"]},
                                                                   timeout=120)))
    t.start()
    while metric(s.url, "adl_predict_in_flight") < 1:
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=60) == 0  # a bound on the wait, not on speed: without the timeout it never exits
    t.join(60)
    assert result["r"].status_code == 503 and "--graceful-timeout-s" in result["r"].json()["error"]
    assert "signal handlers restored: True" in s.output()


def test_soak_memory_stays_flat(runs):
    """5,000 requests: the server's resident memory at the end is within 10% of after the first 500."""
    s = serve_runs(runs)
    try:
        def rss() -> int:
            status = open(f"/proc/{s.proc.pid}/status").read()
            return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))

        bodies = [{"texts": [TEXTS[i % len(TEXTS)], TEXTS[(i * 3) % len(TEXTS)]][: 1 + i % 2]} for i in range(5000)]
        first = asyncio.run(_hammer(s.url, bodies[:500], 16))
        after_500 = rss()
        rest = asyncio.run(_hammer(s.url, bodies[500:], 16))
        at_end = rss()
        print(f"soak: RSS {after_500} kB after 500 requests, {at_end} kB after 5000 ({at_end / after_500:.3f}x)")
        assert all(status == 200 for status, *_ in first + rest)
        assert at_end <= 1.10 * after_500
    finally:
        assert s.stop() == 0


def test_heads_loaded_and_unloaded_while_clients_send_requests(runs, predictor, tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    for name in ("sentiment", "ner"):
        (folder / name).symlink_to(runs[name], target_is_directory=True)
    other = shutil.copytree(runs["sentiment"], folder / "other")  # a run on another backbone
    manifest = json.loads((other / "cache_manifest.json").read_text())
    manifest["model"]["config_hash"] = "0" * 64
    (other / "cache_manifest.json").write_text(json.dumps(manifest))
    s = Server(["-m", "adl", "serve", "--device", "cpu", "--run", str(folder / "sentiment"), "--runs-dir",
                str(folder)], env={"ADL_SERVE_TOKEN": TOKEN})
    try:
        async def go():
            stop, statuses = asyncio.Event(), []
            async with httpx.AsyncClient(base_url=s.url, headers=AUTH, timeout=60) as client:
                async def sender(i):
                    while not stop.is_set():
                        r = await client.post("/v1/predict", json={"texts": [TEXTS[i % len(TEXTS)]]})
                        statuses.append(r.status_code)
                senders = [asyncio.create_task(sender(i)) for i in range(32)]
                while len(statuses) < 64:
                    await asyncio.sleep(0.02)
                loaded = await client.post("/v1/heads", json={"name": "ner"})
                count = len(statuses)
                while len(statuses) < count + 64:  # requests keep flowing after the load
                    await asyncio.sleep(0.02)
                ner = await client.post("/v1/predict", json={"texts": ["john sat in london"], "heads": ["ner"]})
                stop.set()
                await asyncio.gather(*senders)
                return loaded, ner, statuses

        loaded, ner, statuses = asyncio.run(go())
        assert loaded.status_code == 201 and loaded.json()["name"] == "ner", loaded.text
        assert set(statuses) == {200}  # no request failed while the head was loaded
        assert ner.json()["results"] == [unbatched(predictor, "john sat in london", ["ner"])]
        assert [h["name"] for h in httpx.get(s.url + "/v1/heads", headers=AUTH).json()["heads"]] == ["sentiment", "ner"]
        for name, status, fragment in (("../ner", 422, "plain folder name"), ("a/b", 422, "plain folder name"),
                                       ("..", 422, "plain folder name"), ("nope", 404, "no run folder 'nope'"),
                                       ("other", 409, "config hash"), ("ner", 409, "loaded already")):
            r = httpx.post(s.url + "/v1/heads", json={"name": name}, headers=AUTH)
            assert r.status_code == status and fragment in r.json()["error"], (name, r.text)
        assert httpx.post(s.url + "/v1/heads", json={"name": "ner"}).status_code == 401
        assert httpx.delete(s.url + "/v1/heads/ner").status_code == 401
        assert httpx.delete(s.url + "/v1/heads/nope", headers=AUTH).status_code == 404
        gone = httpx.delete(s.url + "/v1/heads/ner", headers=AUTH)
        assert gone.status_code == 200 and gone.json()["heads"] == ["sentiment"]
        r = httpx.post(s.url + "/v1/predict", json={"texts": ["a"], "heads": ["ner"]}, headers=AUTH)
        assert r.status_code == 422 and "unknown head 'ner'" in r.json()["error"]
        assert httpx.get(s.url + "/info", headers=AUTH).json()["heads"] == ["sentiment"]
    finally:
        assert s.stop() == 0


def test_truncate_raw_scores_request_ids_info_and_readiness(runs, predictor):
    s = serve_runs(runs, "--max-concurrent-requests", "8", "--request-timeout-s", "7")
    try:
        long = " ".join(["good"] * 80)  # over the tiny model's 64 tokens
        cut = httpx.post(s.url + "/v1/predict", json={"texts": ["good movie", long]})
        assert cut.status_code == 200 and cut.json()["truncated"] == [1]
        assert same([cut.json()["results"][1]], [unbatched(predictor, long)])  # batched beside a shorter text
        refused = httpx.post(s.url + "/v1/predict", json={"texts": ["good movie", long], "truncate": False})
        assert refused.status_code == 413 and "texts[1]" in refused.json()["error"]
        raw = httpx.post(s.url + "/v1/predict", json={"texts": ["good movie"], "raw_scores": True}).json()
        logits = predictor(["good movie"]).logits["sentiment"][0]
        assert list(raw["results"][0]["sentiment"]["scores"].values()) == pytest.approx(logits.tolist(), abs=1e-5)
        assert "probs" not in raw["results"][0]["sentiment"] and "entities" in raw["results"][0]["ner"]
        mine = httpx.post(s.url + "/v1/predict", json={"texts": ["a"]}, headers={"X-Request-Id": "req-42"})
        assert mine.headers["x-request-id"] == "req-42"
        forged = httpx.get(s.url + "/readyz", headers={"X-Request-Id": "x y\tz"}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", forged)
        info = httpx.get(s.url + "/info").json()
        assert info["heads"] == ["sentiment", "ner"] and info["max_length"] == 64
        assert info["model"]["id"] and info["adl_version"]
        assert info["limits"] == {"max_batch_size": 64, "max_wait_ms": 10.0, "max_body_kb": 1024, "max_texts": 64,
                                  "max_chars": 10000, "max_concurrent_requests": 8, "max_batch_tokens": 512,
                                  "request_timeout_s": 7.0, "graceful_timeout_s": 20.0}
        for series in ("adl_queue_wait_seconds_bucket", "adl_tokenize_seconds_bucket", "adl_forward_seconds_bucket",
                       "adl_decode_seconds_bucket", "adl_batch_tokens_bucket", "adl_queue_depth",
                       "adl_timed_out_total", "adl_batch_retries_total"):
            assert series in httpx.get(s.url + "/metrics").text, series
    finally:
        assert s.stop() == 0
    assert "request_id=req-42" in s.output()


def test_predictor_called_from_8_threads_gives_the_serial_answers(runs):
    p = Predictor([str(runs["sentiment"]), str(runs["ner"])], device="cpu")
    calls = [TEXTS, *[[t] for t in TEXTS], TEXTS[::-1]]
    serial = [p(texts) for texts in calls]
    errors, results = [], {}

    def work(k):
        try:
            for j in range(3):
                for i, texts in enumerate(calls):
                    results[(k, j, i)] = p(texts)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 8 * 3 * len(calls)
    for (_, _, i), out in results.items():
        assert out.heads == serial[i].heads
        for name in out.logits:
            for a, b in zip(out.logits[name], serial[i].logits[name]):
                np.testing.assert_array_equal(a, b)
