"""The server's own work per predict request, in process (not a test).

    .venv/bin/python bench/serve_overhead.py [--n 30] [--reps 8]

Why: the event loop's Python work waits for the GIL beside the model thread's Python (the
forward's module calls, the decoding), so every microsecond of it per request is taken from the
backbone at concurrency 32 (docs/serve.md, Speed).

The app of ``adl serve`` (adl.serve.server.create_app behind its body cap, the access log on as
the CLI runs it, its lines thrown away) is driven as ASGI, with no sockets, by 32 concurrent clients
sending one text each, --n requests per client per repetition, against a predictor that answers
at once (the work measured is the server's, none of the model's). Printed, and saved to
bench/results/serve_overhead.json:

- Python function calls per request on the event loop (cProfile's count over one repetition:
  the same on any machine, so comparable across commits on a shared one);
- CPU microseconds per request, the best of --reps repetitions (this process; the loaded
  machine's noise is in it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

import uvloop

from adl.serve.middleware import ACCESS, BodyLimit, access_log
from adl.serve.predictor import Prediction
from adl.serve.server import ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 32
ANSWER = {"label": "negative", "probs": {"negative": 0.9273517967498284, "positive": 0.07264820325017167}}


class Instant:
    """A predictor that answers at once: one head, the same answer for every text."""

    names = ["sentiment"]

    def heads_info(self) -> list[dict]:
        return [{"name": "sentiment", "task": "sequence", "labels": ["negative", "positive"], "layers": [0],
                 "weights": [1.0], "metrics": {}}]

    def __call__(self, texts, heads=None, return_backbone=False, return_embedding=False, on_rows=None):
        n = len(texts)
        out = Prediction({"sentiment": [ANSWER] * n}, logits={"sentiment": [None] * n}, cut=[False] * n)
        if on_rows is not None:
            on_rows(list(range(n)), out)
        return out


def scope(body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}


async def request(app, body: bytes) -> None:
    """One POST /v1/predict; the client stays connected until its answer is sent."""
    sent, answered, first = [], asyncio.Event(), [True]

    async def receive():
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope(body), receive, send)
    answered.set()
    if sent[0]["status"] != 200:
        raise SystemExit(f"the server answered {sent[0]['status']}: {sent[1:]}")


async def measure(n: int, reps: int) -> dict:
    cfg = ServeConfig(runs=("instant",))
    app = create_app(Instant(), cfg, None)
    asgi = BodyLimit(app, cfg.max_body_kb * 1024)
    texts = [f"text number {i}, a tweet-sized sentence to classify" for i in range(64)]
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]

    async def client(k: int) -> None:
        for i in range(n):
            await request(asgi, bodies[(k * n + i) % len(bodies)])

    async def round_() -> float:
        start = time.process_time()
        await asyncio.gather(*(client(k) for k in range(CLIENTS)))
        return (time.process_time() - start) / (CLIENTS * n)

    async with app.router.lifespan_context(app):
        await round_()  # warm-up
        profile = cProfile.Profile()
        profile.enable()
        await round_()
        profile.disable()
        cpu = [await round_() for _ in range(reps)]
    calls = pstats.Stats(profile).total_calls / (CLIENTS * n)
    return {"python_calls_per_request": calls, "cpu_us_per_request_best": 1e6 * min(cpu),
            "cpu_us_per_request": [1e6 * c for c in cpu], "clients": CLIENTS, "requests_per_client": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30, help="requests per client per repetition")
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    access_log("info")
    ACCESS.handlers[0].setStream(open(os.devnull, "w"))  # formatted and written as by the server, then dropped
    result = uvloop.run(measure(args.n, args.reps))  # uvicorn's event loop (uvicorn[standard])
    result["command"] = "bench/serve_overhead.py " + " ".join(sys.argv[1:])
    result["load_average_1min"] = os.getloadavg()[0]
    out = ROOT / "bench" / "results" / "serve_overhead.json"
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"{result['python_calls_per_request']:.0f} Python calls per request on the event loop; "
          f"{result['cpu_us_per_request_best']:.0f} us CPU per request (best of {args.reps}); wrote {out}")


if __name__ == "__main__":
    main()
