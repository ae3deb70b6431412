"""`adl serve`: the backbone and its heads behind a JSON HTTP API, with dynamic batching and a page.

Endpoints (``create_app``):

    POST /v1/predict  {"texts": [...], "heads": [...]?, "return_embedding": false}
                      -> {"results": [{head: answer, ...} per text], "embeddings": [[...]]?}
    POST /v1/embeddings  OpenAI's embeddings format, heads' answers in an extra field (openai_api.py)
    GET  /v1/heads    name, task, labels, layers, layer weights and test metrics of every head
    GET  /healthz     200 once the model is loaded (it is loaded before the port opens)
    GET  /metrics     Prometheus text: requests, latency, batch sizes
    GET  /docs        the OpenAPI UI (schema at /openapi.json)
    GET  /            the static page (adl/serve/static/index.html)

Why FastAPI + uvicorn: the request schema is declared once (pydantic) and gives validation,
the OpenAPI document and /docs for free; uvicorn handles SIGTERM gracefully (stop accepting,
finish in-flight requests) and both are widely used and maintained. LitServe would batch for us
but owns the worker processes and the request path, and we need our own batcher to merge head
subsets and isolate failing requests (adl/serve/batcher.py).

Security: binds 127.0.0.1 unless --host says otherwise; when $ADL_SERVE_TOKEN is set, /v1/* and
/metrics need ``Authorization: Bearer <token>``; body size, texts per request and characters per
text are capped; no request field is ever used as a path (heads are names checked against the
loaded ones). Every error is JSON ``{"error": "what is wrong and how to fix it"}``.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from adl import __version__
from adl.checks import INT_GE1, Num, check
from adl.devices import HELP as DEVICE_HELP
from adl.devices import check_device
from adl.errors import AdlError
from adl.serve.batcher import Batcher, model_thread
from adl.serve import Predictor
from adl.serve.openai_api import add_embeddings_route

TOKEN_ENV = "ADL_SERVE_TOKEN"
# On a CPU a forward costs about its padded tokens, so a coalesced batch of requests is cut into
# length-sorted backbone batches of at most this many padded tokens (the extraction's budget is
# larger, for GPUs). Measured on MiniLM, 32 random tweets per call: 154 texts/s at 512 against
# 117 at 4096 (bench/serve.py, docs/serve.md). A GPU keeps the extraction's budget.
CPU_BATCH_TOKENS = 512
PAGE = Path(__file__).parent / "static" / "index.html"


def _opt(help_: str, default=None):
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True)
class ServeConfig:
    runs: tuple[str, ...] = _opt("run folders written by `adl train`; each head is named after its folder", ())
    host: str = _opt("address to bind; 127.0.0.1 serves this machine only", "127.0.0.1")
    port: int = _opt("TCP port", 8000)
    max_batch_size: int = _opt("texts per backbone call, at most", 64)
    max_wait_ms: float = _opt("how long a batch waits, at most, for more requests when the server is busy "
                              "(it closes sooner once they stop arriving)", 10.0)
    device: str = _opt(DEVICE_HELP, "auto")
    max_body_kb: int = _opt("request body size limit in KiB", 1024)
    max_texts: int = _opt("texts per request, at most", 64)
    max_chars: int = _opt("characters per text, at most", 10_000)

    def __post_init__(self):
        object.__setattr__(self, "runs", tuple(self.runs))
        if not self.runs:
            raise AdlError("no run given: pass --run runs/NAME (a folder written by `adl train`), once per head")
        check(self, {"port": Num(0, 65535, integer=True), "max_wait_ms": Num(0, 10_000),
                     **dict.fromkeys(("max_batch_size", "max_body_kb", "max_texts", "max_chars"), INT_GE1)})
        check_device(self.device)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1, description="the texts to run, one answer each")
    heads: list[StrictStr] | None = Field(None, description="head names to run (default: every head)")
    return_embedding: StrictBool = Field(False, description="also return the backbone's sentence embedding")


class PredictResponse(BaseModel):
    results: list[dict[str, Any]] = Field(description="per text, {head name: that head's answer}")
    embeddings: list[list[float]] | None = Field(None, description="per text, with return_embedding")


class Metrics:
    """Prometheus series, in a registry of their own (one app, one registry)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("adl_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("adl_request_seconds", "request latency (seconds) by route", ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_texts = Histogram("adl_batch_texts", "texts per backbone call", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("adl_batch_requests", "requests per backbone call", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("adl_batch_seconds", "seconds per backbone call", registry=r,
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_failures = Counter("adl_batch_failures", "backbone calls that raised", registry=r)
        self.in_flight = Gauge("adl_predict_in_flight", "predict requests being answered", registry=r)

    def on_batch(self, texts: int, requests: int, seconds: float, failed: bool) -> None:
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)
        if failed:
            self.batch_failures.inc()


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _explain(errors) -> str:
    """pydantic's errors as one sentence a user can act on."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        if e["type"] == "json_invalid":
            return (f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')}); send "
                    '{"texts": ["..."]} with Content-Type: application/json')
        if e["type"] == "missing" and where in ("", "texts"):
            parts.append('"texts" is missing: send {"texts": ["some text", ...]}')
        elif e["type"] == "too_short" and where == "texts":
            parts.append('"texts" is empty: send at least one text')
        elif e["type"] == "extra_forbidden":
            parts.append(f'unknown field "{where}": the fields are texts, heads, return_embedding')
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            parts.append('the body must be a JSON object such as {"texts": ["some text"]}')
        else:
            want = {"texts": "a list of strings", "heads": "a list of head names (strings)",
                    "return_embedding": "true or false"}.get(where.split(".")[0], "")
            parts.append(f'"{where}": {e["msg"].lower()}' + (f" ({want.split(' (')[0]} expected)" if want else ""))
    return "; ".join(parts)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is answered 413 before the app reads any of it.

    The body is read here (at most max_bytes + one chunk held) and replayed to the app, so a
    chunked upload without Content-Length is capped too.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").decode()
        chunks, size, more = [], 0, True
        if declared.isdigit() and int(declared) > self.max_bytes:
            more = False
            size = int(declared)
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False) and size <= self.max_bytes
        if size > self.max_bytes:
            kb = self.max_bytes // 1024
            response = _error(413, f"the request body is over the {kb} KiB limit (--max-body-kb): send fewer "
                                   "or shorter texts per request")
            return await response(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class Counted:
    """ASGI middleware: requests by route and status, and their latency, into ``metrics`` (a plain
    ASGI wrapper: starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router on the scope it was given
            path = route.path if route is not None else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def create_app(predictor, cfg: ServeConfig, token: str | None = None, pool: ThreadPoolExecutor | None = None) -> FastAPI:
    """The ASGI app around a loaded Predictor (anything with .names, .heads_info() and __call__);
    ``pool``: the model thread it was loaded on (adl.serve.batcher.model_thread), which runs every call."""
    metrics = Metrics()
    names = list(predictor.names)

    batcher = Batcher(predictor, cfg.max_batch_size, cfg.max_wait_ms / 1000, metrics.on_batch, pool)
    heads_doc = {"heads": _jsonable(batcher.call(predictor.heads_info))}  # fixed once loaded

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield  # uvicorn has finished every in-flight request when it resumes here
        await batcher.stop()

    app = FastAPI(title="adl serve", version=__version__, lifespan=lifespan,
                  description="Side-task heads on a frozen transformer. Every error is "
                              '`{"error": "what is wrong and how to fix it"}`.')
    bearer = HTTPBearer(auto_error=False, description=f"needed when ${TOKEN_ENV} is set on the server")

    async def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # async: FastAPI runs a plain def dependency in a worker thread, a hop per request
        if token is None:
            return
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send the header 'Authorization: Bearer "
                                     f"<token>' with the token set in ${TOKEN_ENV} on the server",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)  # also starlette's own 404/405
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return _error(422, _explain(exc.errors()))

    @app.exception_handler(404)
    async def not_found(request: Request, _exc):
        return _error(404, f"no such endpoint {request.url.path}: see /docs")


    app.add_middleware(Counted, metrics=metrics)

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              dependencies=[Depends(authorised)],
              responses={401: {"description": "wrong token"}, 413: {"description": "body too large"},
                         422: {"description": "bad input"}, 500: {"description": "the batch failed"}})
    async def predict_endpoint(req: PredictRequest) -> PredictResponse:
        """Run the texts through the backbone once and every asked head; per text, what Predictor returns."""
        _check_limits(req, cfg, names)
        heads = None if req.heads is None else list(dict.fromkeys(req.heads))
        answer = await submit(req.texts, heads, req.return_embedding)
        return PredictResponse(results=answer.results, embeddings=answer.embeddings)

    async def submit(texts: list[str], heads: list[str] | None, embedding: bool):
        """One request's share of a batched backbone call; a failed batch fails this request only."""
        try:
            with metrics.in_flight.track_inprogress():
                return await batcher.submit(texts, heads, embedding)
        except AdlError as e:
            raise HTTPException(422, str(e)) from None
        except Exception as e:  # noqa: BLE001 - the batch failed: this request fails, the server goes on
            raise HTTPException(500, f"prediction failed: {type(e).__name__}: {e}") from None

    if hasattr(predictor, "manifest"):  # a real Predictor: it knows its backbone and tokenizer
        def check_texts(texts: list[str]) -> None:
            _check_limits(PredictRequest(texts=texts), cfg, names)
        add_embeddings_route(app, predictor, submit, check_texts, authorised)

    @app.get("/v1/heads", dependencies=[Depends(authorised)])
    async def heads_endpoint() -> dict:
        """Every head: name, task, labels, layers, layer weights and the run's test metrics."""
        return heads_doc

    @app.get("/healthz")
    async def healthz() -> dict:
        """Ready: the model is loaded before the port opens, so answering means ready."""
        return {"status": "ready", "heads": names}

    @app.get("/metrics", dependencies=[Depends(authorised)], response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus text format: adl_requests_total, adl_request_seconds, adl_batch_texts, ..."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    return app


def _check_limits(req: PredictRequest, cfg: ServeConfig, names: list[str]) -> None:
    if len(req.texts) > cfg.max_texts:
        raise HTTPException(422, f"{len(req.texts)} texts in one request, the limit is {cfg.max_texts} "
                                 "(--max-texts): split them over several requests")
    for i, text in enumerate(req.texts):
        if len(text) > cfg.max_chars:
            raise HTTPException(422, f"texts[{i}] has {len(text)} characters, the limit is {cfg.max_chars} "
                                     "(--max-chars): shorten or split it")
        if not text.strip():
            raise HTTPException(422, f"texts[{i}] is empty: send some text")
    unknown = [h for h in req.heads or [] if h not in names]
    if unknown:
        raise HTTPException(422, f"unknown head {', '.join(map(repr, unknown))}: this server has "
                                 f"{', '.join(names)} (GET /v1/heads)")
    if req.heads is not None and not req.heads:
        raise HTTPException(422, '"heads" is empty: leave it out for every head, or name some')


def _jsonable(value):
    """heads_info() may hold numpy or torch scalars: JSON them through float/int/str."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def serve_app(app: FastAPI, cfg: ServeConfig, log_level: str = "info") -> None:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT; returns (exit 0) once in-flight requests are done.

    uvicorn drains on the signal, then raises it again with the handler that was installed
    before it started; ours ignores it, so the drained server returns instead of dying by it.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(BodyLimit(app, cfg.max_body_kb * 1024), host=cfg.host, port=cfg.port,
                            log_level=log_level, server_header=False, timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise AdlError(f"could not listen on {cfg.host}:{cfg.port} (in use? pick another --port)")


def for_serving(predictor: Predictor) -> Predictor:
    """The server's batching: on a CPU, backbone batches of at most CPU_BATCH_TOKENS padded tokens."""
    if predictor.plan.device == "cpu":
        predictor.batch_tokens = min(predictor.batch_tokens, CPU_BATCH_TOKENS)
    return predictor


def run_serve(cfg: ServeConfig) -> None:
    """Load the heads of ``cfg.runs`` and their backbone, then serve until SIGTERM."""
    pool = model_thread()  # the model is loaded on the thread that will run it (see its docstring)
    predictor = for_serving(pool.submit(Predictor, list(cfg.runs), cfg.device).result())
    token = os.environ.get(TOKEN_ENV) or None
    serve_app(create_app(predictor, cfg, token, pool), cfg)
