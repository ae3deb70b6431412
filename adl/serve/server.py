"""`adl serve`: the backbone and its heads behind a JSON HTTP API, with dynamic batching and a page.

Endpoints (``create_app``):

    POST   /v1/predict  {"texts": [...], "heads": [...]?, "return_embedding": false, "truncate": true,
                         "raw_scores": false}
                        -> {"results": [{head: answer, ...} per text], "embeddings": [[...]]?, "truncated": [i]?}
    POST   /v1/embeddings  OpenAI's embeddings format, heads' answers in an extra field (openai_api.py)
    GET    /v1/heads    name, task, labels, layers, layer weights and test metrics of every head
    POST   /v1/heads    {"name": N}: load the run folder --runs-dir/N onto the running backbone
    DELETE /v1/heads/N  unload head N
    GET    /info        model id and revision, adl version, heads, every limit in force
    GET    /healthz     liveness: 200 while the batching loop lives (the model is loaded before the port opens)
    GET    /readyz      readiness: 200 when the loop lives, the server is not draining and not saturated
    GET    /metrics     Prometheus text (adl/serve/metrics.py)
    GET    /docs        the OpenAPI UI (schema at /openapi.json)
    GET    /            the static page (adl/serve/static/index.html)

Why FastAPI + uvicorn: the request schema is declared once (pydantic) and gives validation,
the OpenAPI document and /docs for free; uvicorn handles SIGTERM gracefully (stop accepting,
finish in-flight requests) and both are widely used and maintained. LitServe would batch for us
but owns the worker processes and the request path, and we need our own batcher to merge head
subsets and isolate failing requests (adl/serve/batcher.py).

Admission and shutdown: at most --max-concurrent-requests in flight (429 with Retry-After above
it), a request not started within --request-timeout-s is dropped (503), one whose client went away
is never computed; SIGTERM drains for at most --graceful-timeout-s, then exits 0.

Security: binds 127.0.0.1 unless --host says otherwise; when $ADL_SERVE_TOKEN is set, /v1/*, /info
and /metrics need ``Authorization: Bearer <token>``; body size, texts per request and characters
per text are capped; no request field is used as a path except a head's folder name, which must be
a plain name inside --runs-dir. Every error is JSON ``{"error": "what is wrong and how to fix it"}``.
"""

from __future__ import annotations

import functools
import hmac
import os
import signal
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from adl import __version__
from adl.checks import INT_GE1, Num, check
from adl.devices import HELP as DEVICE_HELP
from adl.devices import check_device
from adl.errors import AdlError
from adl.serve import Predictor
from adl.serve.admission import ClientGone, Limits, LoopDied, Overloaded, ShuttingDown, TimedOut, TooLong
from adl.serve.batcher import Batcher
from adl.serve.live_heads import LoadRequest, Served
from adl.serve.metrics import Metrics
from adl.serve.middleware import BodyLimit, Counted, access_log, error
from adl.serve.model_thread import model_thread
from adl.serve.openai_api import add_embeddings_route

TOKEN_ENV = "ADL_SERVE_TOKEN"
# On a CPU a forward costs about its padded tokens, so a coalesced batch of requests is cut into
# length-sorted backbone batches of at most this many padded tokens (the extraction's budget is
# larger, for GPUs). Measured on MiniLM, 32 random tweets per call: 154 texts/s at 512 against
# 117 at 4096 (bench/serve.py, docs/serve.md). A GPU keeps the extraction's budget.
CPU_BATCH_TOKENS = 512
PAGE = Path(__file__).parent / "static" / "index.html"
RETRY_AFTER = "1"  # seconds a refused client should wait: a batch or two
# adl's own Prometheus series are the server's metrics; FastAPI's OpenTelemetry hooks would check
# for providers on every request
NO_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}


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
    max_concurrent_requests: int = _opt("requests in flight (waiting or running), at most; above it 429", 512)
    max_batch_tokens: int | None = _opt("padded tokens per backbone batch, at most (default: 512 on a CPU, the "
                                        "extraction's budget on a GPU)", None)
    request_timeout_s: float = _opt("seconds a request may wait to start; then it is dropped with 503", 30.0)
    graceful_timeout_s: float = _opt("seconds SIGTERM lets the requests in flight finish before exiting", 20.0)
    runs_dir: str | None = _opt("the one folder heads may be loaded from while running (POST /v1/heads)", None)

    def __post_init__(self):
        object.__setattr__(self, "runs", tuple(self.runs))
        if not self.runs:
            raise AdlError("no run given: pass --run runs/NAME (a folder written by `adl train`), once per head")
        check(self, {"port": Num(0, 65535, integer=True), "max_wait_ms": Num(0, 10_000),
                     **dict.fromkeys(("request_timeout_s", "graceful_timeout_s"), Num(0, 3600, low_open=True)),
                     **dict.fromkeys(("max_batch_size", "max_body_kb", "max_texts", "max_chars",
                                      "max_concurrent_requests", "max_batch_tokens"), INT_GE1)})
        check_device(self.device)
        if self.runs_dir is not None and not Path(self.runs_dir).is_dir():
            raise AdlError(f"--runs-dir {self.runs_dir} is not a folder: name the folder that holds your run folders")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1, description="the texts to run, one answer each")
    heads: list[StrictStr] | None = Field(None, description="head names to run (default: every head)")
    return_embedding: StrictBool = Field(False, description="also return the backbone's sentence embedding")
    truncate: StrictBool = Field(True, description="cut a text over the model's max_length (and list it in "
                                                   '"truncated"); false: answer 413 instead')
    raw_scores: StrictBool = Field(False, description="sequence heads: the logits (\"scores\") instead of "
                                                      "probabilities")


FIELDS = ", ".join(PredictRequest.model_fields)


class PredictResponse(BaseModel):
    results: list[dict[str, Any]] = Field(description="per text, {head name: that head's answer}")
    embeddings: list[list[float]] | None = Field(None, description="per text, with return_embedding")
    truncated: list[int] | None = Field(None, description="positions of the texts cut at the model's max_length")


# how each way a predict request can fail is answered
FAILURES = {Overloaded: 429, TimedOut: 503, ShuttingDown: 503, ClientGone: 499, TooLong: 413, AdlError: 422,
            LoopDied: 500}


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
            parts.append(f'unknown field "{where}": the fields are {FIELDS}')
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            parts.append('the body must be a JSON object such as {"texts": ["some text"]}')
        else:
            want = {"texts": "a list of strings", "heads": "a list of head names (strings)",
                    "return_embedding": "true or false", "truncate": "true or false",
                    "raw_scores": "true or false"}.get(where.split(".")[0], "")
            parts.append(f'"{where}": {e["msg"].lower()}' + (f" ({want.split(' (')[0]} expected)" if want else ""))
    return "; ".join(parts)


def create_app(predictor, cfg: ServeConfig, token: str | None = None, pool: Executor | None = None) -> FastAPI:
    """The ASGI app around a loaded Predictor (anything with .names, .heads_info() and __call__);
    ``pool``: the model thread it was loaded on (adl.serve.model_thread.model_thread), which runs every call."""
    metrics = Metrics()
    limits = Limits(cfg.max_concurrent_requests, cfg.request_timeout_s)
    batcher = Batcher(predictor, cfg.max_batch_size, cfg.max_wait_ms / 1000, metrics, pool, limits)
    metrics.watch(batcher)
    served = Served(predictor, batcher, cfg.runs_dir)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield  # uvicorn has finished (or, past --graceful-timeout-s, cancelled) every request when it resumes
        await batcher.stop()

    app = FastAPI(title="adl serve", version=__version__, lifespan=lifespan, telemetry=NO_TELEMETRY,
                  description="Side-task heads on a frozen transformer. Every error is "
                              '`{"error": "what is wrong and how to fix it"}`.')
    app.state.batcher = batcher
    bearer = HTTPBearer(auto_error=False, description=f"needed when ${TOKEN_ENV} is set on the server")

    async def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # async: FastAPI runs a plain def dependency in a worker thread, a hop per request
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send the header 'Authorization: Bearer "
                                     f"<token>' with the token set in ${TOKEN_ENV} on the server",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)  # also starlette's own 404/405
    async def http_error(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return error(422, _explain(exc.errors()))

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        if getattr(exc, "detail", "Not Found") != "Not Found":  # ours, with its own message
            return error(404, str(exc.detail))
        return error(404, f"no such endpoint {request.url.path}: see /docs")

    app.add_middleware(Counted, metrics=metrics)
    # the bearer check is a dependency only when there is a token to check: FastAPI resolves each
    # dependency on every request, and /docs shows the lock only on a server that needs the token
    guarded = [Depends(authorised)] if token is not None else []

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True, dependencies=guarded,
              responses={401: {"description": "wrong token"}, 413: {"description": "body or a text too long"},
                         422: {"description": "bad input"}, 429: {"description": "too many requests in flight"},
                         500: {"description": "the batch failed"}, 503: {"description": "not started in time"}})
    async def predict_endpoint(req: PredictRequest, request: Request) -> PredictResponse:
        """Run the texts through the backbone once and every asked head; per text, what Predictor returns."""
        _check_limits(req, cfg, served.names)
        heads = None if req.heads is None else list(dict.fromkeys(req.heads))
        answer = await submit(req.texts, heads, req.return_embedding, raw_scores=req.raw_scores,
                              truncate=req.truncate, gone=_client_gone(request))
        # built from the batcher's own answer, so FastAPI's check of the response against its model
        # (a validation pass over every result, on the event loop) is skipped; the model documents it
        body = PredictResponse.model_construct(results=answer.results, embeddings=answer.embeddings,
                                               truncated=answer.truncated or None)
        return Response(body.model_dump_json(exclude_none=True), media_type="application/json")

    async def submit(texts: list[str], heads: list[str] | None, embedding: bool, **options):
        """One request's share of a batched backbone call; a failed batch fails this request only.
        ``options``: raw_scores, truncate, gone (see Batcher.submit)."""
        try:
            with metrics.in_flight.track_inprogress():
                return await batcher.submit(texts, heads, embedding, **options)
        except Exception as e:  # noqa: BLE001 - this request fails, the server goes on
            raise _failed(e, metrics) from None

    if hasattr(predictor, "manifest"):  # a real Predictor: it knows its backbone and tokenizer
        def check_texts(texts: list[str]) -> None:
            _check_limits(PredictRequest(texts=texts), cfg, served.names)
        add_embeddings_route(app, predictor, submit, check_texts, guarded)

    @app.get("/v1/heads", dependencies=guarded)
    async def heads_endpoint() -> dict:
        """Every head: name, task, labels, layers, layer weights and the run's test metrics."""
        return served.doc

    @app.post("/v1/heads", dependencies=guarded, status_code=201)
    async def load_head(req: LoadRequest) -> dict:
        """Load the head of run folder --runs-dir/NAME onto the running backbone (requests in flight are unaffected)."""
        return await served.load(req.name)

    @app.delete("/v1/heads/{name}", dependencies=guarded)
    async def unload_head(name: str) -> dict:
        """Unload a head (the requests admitted before still get it)."""
        return await served.unload(name)

    @app.get("/info", dependencies=guarded)
    async def info() -> dict:
        """The model, adl's version, the heads and every limit in force."""
        model = getattr(predictor, "manifest", {}).get("model", {})
        return {"model": {"id": model.get("id"), "revision": model.get("revision"),
                          "config_hash": model.get("config_hash")},
                "adl_version": __version__, "heads": served.names,
                "max_length": getattr(predictor, "max_length", None),
                "limits": {**{k: v for k, v in asdict(cfg).items() if k not in ("runs", "host", "port", "device",
                                                                                "runs_dir")},
                           "max_batch_tokens": getattr(predictor, "batch_tokens", cfg.max_batch_tokens)},
                "runs_dir": cfg.runs_dir is not None}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: 200 while the batching loop lives (the model is loaded before the port opens)."""
        if batcher.dead is not None:
            return error(500, f"the batching loop died ({batcher.dead}): restart the server")
        return JSONResponse({"status": "alive", "heads": served.names})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: the loop lives, the server is not shutting down, and it can admit a request."""
        why = [w for bad, w in ((batcher.dead is not None, f"the batching loop died ({batcher.dead})"),
                                (batcher.draining, "shutting down"),
                                (batcher.saturated, f"{len(batcher.admitted)} requests in flight, the limit is "
                                                    f"{limits.max_requests} (--max-concurrent-requests)")) if bad]
        if why:
            return error(503, "not ready: " + "; ".join(why))
        return JSONResponse({"status": "ready", "heads": served.names})

    @app.get("/metrics", dependencies=guarded, response_class=Response)
    async def metrics_endpoint() -> Response:
        """Prometheus text format: adl_requests_total, adl_queue_wait_seconds, adl_batch_tokens, ..."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    return app


def _client_gone(request: Request):
    """-> an awaitable factory that returns once the client has disconnected."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return gone


def _failed(e: Exception, metrics: Metrics) -> HTTPException:
    """A failed predict request as the HTTP error that tells the client what happened."""
    status = next((code for kind, code in FAILURES.items() if isinstance(e, kind)), 500)
    counter = {429: metrics.rejected, 503: metrics.timed_out if isinstance(e, TimedOut) else None,
               499: metrics.abandoned}.get(status)
    if counter is not None:
        counter.inc()
    if status == 429:
        return HTTPException(429, f"too many requests in flight ({e}, --max-concurrent-requests): retry after "
                                  f"{RETRY_AFTER} s", headers={"Retry-After": RETRY_AFTER})
    if status in (413, 422, 499, 503) or isinstance(e, LoopDied):
        return HTTPException(status, str(e), headers={"Retry-After": RETRY_AFTER} if status == 503 else None)
    return HTTPException(500, f"prediction failed: {type(e).__name__}: {e}")


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


# An idle connection is kept longer than clients and load balancers keep theirs (httpx's default and
# the common balancers' idle timeouts are shorter): a server that closes first races the client's next
# request on that connection, which the client sees as a reset (a request the server never saw).
KEEP_ALIVE_S = 75


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the app when a stop signal arrives (``on_exit``)."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.on_exit()
        super().handle_exit(sig, frame)


def serve_app(app: FastAPI, cfg: ServeConfig, log_level: str = "info") -> None:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT; returns (exit 0) once in-flight requests are
    done, or after --graceful-timeout-s: the requests still unanswered then get 503.

    uvicorn drains on the signal, then raises it again with the handler that was installed
    before it started; ours ignores it, so the drained server returns instead of dying by it,
    and the handlers of before are back when this returns.
    """
    batcher, grace = app.state.batcher, cfg.graceful_timeout_s
    # our answers leave before uvicorn's own deadline cancels what is left (it starts after a tick or two)
    on_exit = functools.partial(batcher.drain_soon, max(grace - min(0.5, grace / 2), 0.0))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: None)
    access_log(log_level)
    config = uvicorn.Config(BodyLimit(app, cfg.max_body_kb * 1024), host=cfg.host, port=cfg.port,
                            log_level=log_level, server_header=False, access_log=False,
                            timeout_graceful_shutdown=grace, timeout_keep_alive=KEEP_ALIVE_S)
    server = _Server(config, on_exit)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise AdlError(f"could not listen on {cfg.host}:{cfg.port} (in use? pick another --port)")


def for_serving(predictor: Predictor, max_batch_tokens: int | None = None) -> Predictor:
    """The server's batching: backbone batches of at most ``max_batch_tokens`` padded tokens
    (default: CPU_BATCH_TOKENS on a CPU, the extraction's budget elsewhere)."""
    if max_batch_tokens is not None:
        predictor.batch_tokens = max_batch_tokens
    elif predictor.plan.device == "cpu":
        predictor.batch_tokens = min(predictor.batch_tokens, CPU_BATCH_TOKENS)
    return predictor


def run_serve(cfg: ServeConfig) -> None:
    """Load the heads of ``cfg.runs`` and their backbone, then serve until SIGTERM."""
    pool = model_thread()  # the model is loaded on the thread that will run it (see its docstring)
    predictor = for_serving(pool.submit(Predictor, list(cfg.runs), cfg.device).result(), cfg.max_batch_tokens)
    token = os.environ.get(TOKEN_ENV) or None
    serve_app(create_app(predictor, cfg, token, pool), cfg)
