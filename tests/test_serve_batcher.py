"""The dynamic batcher against a fake Predictor, in process; run as a script, the real server around that fake.

The fake is deterministic per text, records every call, can sleep (to hold a request in
flight), raises on any text containing BOOM (a failing batch) and reports a text containing
LONG as cut at max_length. ``python tests/test_serve_batcher.py --port N [--delay S] [...]``
serves it through the real create_app and serve_app, for the server tests that need a slow or
failing backbone.

Fault injection, for tests only: with ``--kill-loop``, the script wraps the batcher's
``_collect`` so that a batch holding a text with KILL raises outside the Predictor call, which
ends the batching loop (the way a bug in the batcher itself would).
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adl.serve.admission import (ClientGone, Limits, LoopDied, Overloaded, ShuttingDown, TimedOut,  # noqa: E402
                                 TooLong)
from adl.serve.batcher import Batcher, Observer  # noqa: E402


@dataclass
class FakeOutput:
    heads: dict
    embeddings: list | None
    logits: dict
    cut: list
    stats: dict


class FakePredictor:
    """Same interface as adl.serve.Predictor: .names, .heads_info(), __call__(texts, heads, ...).
    Like it, it runs a call as backbone batches (of 2 texts, last ones first, as length sorting
    may order them) and reports each to ``on_rows``; ``gate`` (an Event) holds it after the first."""

    names = ["sentiment", "ner"]

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.delay, self.gate, self.calls, self._busy = delay, gate, [], threading.Lock()

    def heads_info(self):
        return [{"name": "sentiment", "task": "sequence", "labels": ["negative", "positive"], "layers": [0, 1, 2],
                 "weights": [0.2, 0.5, 0.3], "metrics": {"accuracy": 0.8}},
                {"name": "ner", "task": "token", "labels": ["O", "B-ORG", "I-ORG"], "layers": [0, 1, 2],
                 "weights": [0.1, 0.1, 0.8], "metrics": {"f1": 0.5}}]

    def __call__(self, texts, heads=None, return_backbone=False, return_embedding=False, on_rows=None):
        if not self._busy.acquire(blocking=False):
            raise AssertionError("Predictor called concurrently")
        try:
            self.calls.append((list(texts), heads, return_embedding))
            time.sleep(self.delay)
            heads = heads or self.names
            out = FakeOutput({h: [None] * len(texts) for h in heads}, [None] * len(texts) if return_embedding else None,
                             {h: [None] * len(texts) for h in heads}, ["LONG" in t for t in texts],
                             {"tokenize_s": 0.0, "forward_s": self.delay, "decode_s": 0.0,
                              "batch_tokens": [8] * ((len(texts) + 1) // 2)})
            for n, start in enumerate(reversed(range(0, len(texts), 2))):
                rows = list(range(start, min(start + 2, len(texts))))
                if any("BOOM" in texts[r] for r in rows):
                    raise RuntimeError("the backbone blew up on BOOM")
                for r in rows:
                    for h in heads:
                        out.heads[h][r] = getattr(self, h)(texts[r])
                        out.logits[h][r] = self.logits(texts[r])
                    if return_embedding:
                        out.embeddings[r] = self.embedding(texts[r])
                if on_rows is not None:
                    on_rows(rows, out)
                if n == 0 and self.gate is not None:
                    assert self.gate.wait(30), "the test never opened the gate"
            return out
        finally:
            self._busy.release()

    @staticmethod
    def sentiment(text):
        p = int(hashlib.sha256(text.encode()).hexdigest()[:4], 16) / 0xFFFF
        return {"label": "positive" if p >= 0.5 else "negative", "probs": {"negative": 1 - p, "positive": p}}

    @staticmethod
    def ner(text):
        ents, at = [], 0
        for word in text.split(" "):
            if word[:1].isupper():
                ents.append({"type": "ORG", "start": at, "end": at + len(word), "text": word})
            at += len(word) + 1
        return {"entities": ents}

    @staticmethod
    def logits(text):
        p = FakePredictor.sentiment(text)["probs"]["positive"]
        return [-p, p]

    @staticmethod
    def embedding(text):
        return [float(len(text)), float(text.count(" "))]


def expected(text, heads=None):
    heads = heads or FakePredictor.names
    return {h: getattr(FakePredictor, h)(text) for h in heads}


def run(coro):
    return asyncio.run(coro)


class Recorder(Observer):
    """The batcher's reports, kept: (texts, requests, seconds, failed) per call, and the retries."""

    def __init__(self):
        self.calls, self.retries, self.waits = [], 0, []

    def batch(self, texts, requests, seconds, failed, out=None):
        self.calls.append((texts, requests, seconds, failed))

    def started(self, waited):
        self.waits.append(waited)

    def retried(self):
        self.retries += 1


async def _with_batcher(fake, fn, max_batch_size=8, max_wait=0.05, limits=Limits(), observer=None):
    observer = observer or Recorder()
    b = Batcher(fake, max_batch_size, max_wait, observer, limits=limits)
    b.start()
    try:
        return await fn(b), getattr(observer, "calls", None)
    finally:
        await b.stop()


def test_concurrent_requests_are_coalesced_and_each_gets_its_own_answer():
    fake = FakePredictor(delay=0.05)
    texts = [f"text {i} from Client{i % 3}" for i in range(20)]

    async def go(b):
        return await asyncio.gather(*(b.submit([t]) for t in texts))

    answers, batches = run(_with_batcher(fake, go))
    assert [a.results for a in answers] == [[expected(t)] for t in texts]
    assert all(a.embeddings is None for a in answers)
    assert max(requests for _, requests, *_ in batches) > 1  # some requests rode together
    assert all(n <= 8 for n, *_ in batches) and sum(n for n, *_ in batches) == 20


def test_heads_and_embeddings_are_per_request_in_a_mixed_batch():
    fake = FakePredictor(delay=0.02)

    async def go(b):
        return await asyncio.gather(b.submit(["a Apple"], ["sentiment"]), b.submit(["b", "c Paris"], ["ner"], True),
                                    b.submit(["d"], None))

    (one, two, three), _ = run(_with_batcher(fake, go))
    assert one.results == [expected("a Apple", ["sentiment"])] and one.embeddings is None
    assert two.results == [expected("b", ["ner"]), expected("c Paris", ["ner"])]
    assert two.embeddings == [FakePredictor.embedding("b"), FakePredictor.embedding("c Paris")]
    assert three.results == [expected("d")]


def test_a_request_larger_than_the_batch_runs_alone_and_is_never_split():
    fake = FakePredictor()

    async def go(b):
        return await asyncio.gather(b.submit([f"t{i}" for i in range(5)]), b.submit(["x"]), b.submit(["y", "z"]))

    answers, batches = run(_with_batcher(fake, go, max_batch_size=3))
    assert [len(a.results) for a in answers] == [5, 1, 2]
    assert [len(texts) for texts, *_ in fake.calls] == [5, 3]


def test_a_request_is_answered_when_its_texts_are_done_not_when_the_call_ends():
    gate = threading.Event()
    fake = FakePredictor(gate=gate)

    async def go(b):
        early, late = asyncio.create_task(b.submit(["c", "d"])), asyncio.create_task(b.submit(["e", "f"]))
        done, _ = await asyncio.wait({late}, timeout=30)  # "e f" is the call's first backbone batch
        assert done == {late} and not early.done()  # the call is held at the gate: "c d" is not run yet
        gate.set()
        return await early, await late

    (early, late), batches = run(_with_batcher(fake, go))
    assert early.results == [expected("c"), expected("d")] and late.results == [expected("e"), expected("f")]
    assert [n for n, *_ in batches] == [4]  # both rode in one call


def test_a_failing_request_fails_alone_and_the_batcher_goes_on():
    fake = FakePredictor(delay=0.02)

    async def go(b):
        first = await asyncio.gather(b.submit(["fine"]), b.submit(["BOOM here"]), b.submit(["also fine"]),
                                     return_exceptions=True)
        return first, await b.submit(["after"])

    recorder = Recorder()
    (first, after), batches = run(_with_batcher(fake, go, observer=recorder))
    assert first[0].results == [expected("fine")] and first[2].results == [expected("also fine")]
    assert isinstance(first[1], RuntimeError) and "BOOM" in str(first[1])
    assert after.results == [expected("after")]
    # the three requests shared one call, which failed; "also fine" was answered from its first
    # backbone batch, and the two left unanswered were each run again alone: one answered, one failed
    assert [texts for texts, *_ in fake.calls] == [["fine", "BOOM here", "also fine"], ["fine"], ["BOOM here"],
                                                   ["after"]]
    assert [(n, r, failed) for n, r, _, failed in batches] == [(3, 3, True), (1, 1, False), (1, 1, True),
                                                               (1, 1, False)]
    assert recorder.retries == 2


def test_a_lone_client_does_not_wait_for_company():
    fake = FakePredictor()

    async def go(b):
        for i in range(3):
            await b.submit([f"t{i}"])

    _, batches = run(_with_batcher(fake, go, max_wait=30.0))  # would hang 30 s per request if it waited
    assert [n for n, *_ in batches] == [1, 1, 1]


def test_a_batch_closes_when_requests_stop_arriving_not_at_max_wait():
    fake = FakePredictor(delay=0.02)

    async def go(b):
        await asyncio.gather(b.submit(["a"]), b.submit(["b"]))  # the next batch will wait for company
        t = asyncio.get_running_loop().time()
        await asyncio.gather(b.submit(["c"]), b.submit(["d"]))  # a burst, then nobody
        return asyncio.get_running_loop().time() - t

    seconds, batches = run(_with_batcher(fake, go, max_wait=30.0))  # waiting out max_wait would take 30 s
    assert seconds < 10
    assert [n for n, *_ in batches][-1] == 2  # the burst still rode together


def test_every_predictor_call_runs_on_the_thread_it_was_loaded_on():
    """One thread runs all torch work (a second OpenMP team made libgomp sleep between regions)."""
    from fastapi.testclient import TestClient

    from adl.serve.model_thread import model_thread
    from adl.serve.server import ServeConfig, create_app

    threads = []

    class Recording(FakePredictor):
        def __init__(self):
            super().__init__()
            threads.append(threading.current_thread())

        def heads_info(self):
            threads.append(threading.current_thread())
            return super().heads_info()

        def __call__(self, texts, *args, **kwargs):
            threads.append(threading.current_thread())
            return super().__call__(texts, *args, **kwargs)

    pool = model_thread()
    fake = pool.submit(Recording).result()
    with TestClient(create_app(fake, ServeConfig(runs=("x",)), pool=pool)) as client:
        assert client.post("/v1/predict", json={"texts": ["a", "b"]}).status_code == 200
        assert client.get("/v1/heads").status_code == 200
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0] is not threading.main_thread()


def test_admission_refuses_at_once_above_the_limit_and_drops_what_waits_too_long():
    gate = threading.Event()
    fake = FakePredictor(gate=gate)

    async def go(b):
        running = asyncio.create_task(b.submit(["a", "b", "c"]))  # held at the gate after its first batch
        while not fake.calls:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(b.submit(["never run"]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # two admitted: the third is refused without waiting
            await b.submit(["refused"])
        assert b.saturated and b.waiting == 1
        with pytest.raises(TimedOut):
            await waiting  # not started within the timeout: dropped
        assert b.waiting == 0 and not b.saturated
        gate.set()
        return await running

    answer, batches = run(_with_batcher(fake, go, limits=Limits(max_requests=2, timeout=0.3)))
    assert answer.results == [expected(t) for t in "abc"]
    assert [texts for texts, *_ in fake.calls] == [["a", "b", "c"]]  # the dropped request was never computed


def test_a_request_whose_client_went_away_is_never_computed():
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    gone = asyncio.Event

    async def go(b):
        left = gone()
        running = asyncio.create_task(b.submit(["a", "b", "c"]))
        while not fake.calls:
            await asyncio.sleep(0.01)
        abandoned = asyncio.create_task(b.submit(["abandoned"], gone=left.wait))
        await asyncio.sleep(0.05)
        left.set()  # the client disconnects while its request waits
        with pytest.raises(ClientGone):
            await abandoned
        gate.set()
        await running
        return await b.submit(["next"])

    answer, _ = run(_with_batcher(fake, go))
    assert answer.results == [expected("next")]
    assert [texts for texts, *_ in fake.calls] == [["a", "b", "c"], ["next"]]


class Faulty(Recorder):
    """An observer that raises: a fault outside the Predictor call, which ends the loop."""

    def batch(self, *args, **kwargs):
        raise RuntimeError("injected fault")


def test_when_the_loop_dies_every_waiting_request_fails_and_none_hangs():
    fake = FakePredictor(delay=0.2)

    async def go(b):
        first = asyncio.create_task(b.submit(["first"]))
        while not fake.calls:
            await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(b.submit([f"w{i}"])) for i in range(3)]
        out = await asyncio.gather(first, *waiting, return_exceptions=True)
        with pytest.raises(LoopDied, match="injected fault"):
            await b.submit(["later"])
        return out, b.alive

    (out, alive), _ = run(_with_batcher(fake, go, observer=Faulty()))
    assert out[0].results == [expected("first")]  # answered from its backbone batch before the fault
    assert all(isinstance(e, LoopDied) and "injected fault" in str(e) for e in out[1:]) and not alive


def test_drain_fails_what_is_not_answered_in_time():
    fake = FakePredictor(gate=threading.Event())  # never opened: a forward that hangs

    async def go(b):
        stuck = asyncio.create_task(b.submit(["a", "b", "c"]))
        while not fake.calls:
            await asyncio.sleep(0.01)
        b.drain(0.1)
        with pytest.raises(ShuttingDown, match="--graceful-timeout-s"):
            await stuck
        fake.gate.set()
        return b.draining

    assert run(_with_batcher(fake, go))[0]


def test_truncation_raw_scores_and_control_jobs_in_queue_order():
    fake = FakePredictor(delay=0.05)
    order = []

    async def go(b):
        first = asyncio.create_task(b.submit(["x"]))
        while not fake.calls:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(b.submit(["queued"]))
        control = asyncio.create_task(b.control(lambda: order.append(len(fake.calls)) or "done"))
        cut = asyncio.create_task(b.submit(["ok", "a LONG one"]))
        refused = asyncio.create_task(b.submit(["a LONG one"], truncate=False))
        raw = asyncio.create_task(b.submit(["good"], ["sentiment"], raw_scores=True))
        return await asyncio.gather(first, queued, control, cut, refused, raw, return_exceptions=True)

    (first, queued, control, cut, refused, raw), _ = run(_with_batcher(fake, go))
    assert control == "done" and order == [2]  # after the two requests queued before it, before the rest
    assert cut.truncated == [1] and cut.results == [expected("ok"), expected("a LONG one")]
    assert isinstance(refused, TooLong) and "truncate" in str(refused)
    assert raw.results == [{"sentiment": {"label": expected("good")["sentiment"]["label"],
                                          "scores": dict(zip(["negative", "positive"], FakePredictor.logits("good")))}}]


def _serve_fake(argv):
    import argparse

    from adl.serve.server import ServeConfig, create_app, serve_app

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--token", default=None)
    ap.add_argument("--max-concurrent-requests", type=int, default=512)
    ap.add_argument("--request-timeout-s", type=float, default=30.0)
    ap.add_argument("--graceful-timeout-s", type=float, default=20.0)
    ap.add_argument("--kill-loop", action="store_true", help="test-only fault: a batch with KILL ends the loop")
    args = ap.parse_args(argv)
    if args.kill_loop:
        collect = Batcher._collect

        async def faulty(self):
            batch = await collect(self)
            if any("KILL" in t for job in batch for t in job.texts):
                raise RuntimeError("injected fault: the batcher broke")
            return batch

        Batcher._collect = faulty
    cfg = ServeConfig(runs=("fake",), port=args.port, max_texts=4, max_chars=100, max_body_kb=2,
                      max_concurrent_requests=args.max_concurrent_requests, request_timeout_s=args.request_timeout_s,
                      graceful_timeout_s=args.graceful_timeout_s)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    serve_app(create_app(FakePredictor(args.delay), cfg, args.token), cfg, log_level="warning")
    restored = all(signal.getsignal(sig) is handler for sig, handler in handlers.items())
    print(f"signal handlers restored: {restored}", flush=True)


if __name__ == "__main__":
    _serve_fake(sys.argv[1:])
