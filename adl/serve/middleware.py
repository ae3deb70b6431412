"""The server's ASGI middleware: the body-size cap, and per request its id, access-log line and metrics.

Plain ASGI wrappers: starlette's BaseHTTPMiddleware costs a task and a stream per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi.responses import JSONResponse

from adl.serve.metrics import Metrics

ACCESS = logging.getLogger("adl.serve.access")
REQUEST_ID = b"x-request-id"
# a client's id is kept when it is a plain token; anything else (too long, spaces, control
# characters) would let a client forge access-log lines, and is replaced by a generated one
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error the server sends: ``{"error": "what is wrong and how to fix it"}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """A body over ``max_bytes`` is answered 413 before the app reads any of it.

    The body is read here (at most max_bytes + one chunk held) and replayed to the app, so a
    chunked upload without Content-Length is capped too. After the replay, ``receive`` is the
    server's own: the app can still learn that the client went away.
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
            response = error(413, f"the request body is over the {kb} KiB limit (--max-body-kb): send fewer "
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
    """Per request: its id (the client's ``X-Request-Id``, or a new one), echoed in the response
    and written in the access-log line; its route, status and latency into ``metrics``."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [499]  # 499: the client went away before an answer
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID), b"")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex.encode()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, rid)]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException:
            status[0] = 500 if status[0] == 499 else status[0]
            raise
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")  # set by the router on the scope it was given
            path = route.path if route is not None else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(seconds)
            if ACCESS.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                ACCESS.info('%s:%s "%s %s HTTP/%s" %d %.1fms request_id=%s', client[0], client[1], scope["method"],
                            scope["path"], scope.get("http_version", "1.1"), status[0], 1000 * seconds, rid.decode())


def access_log(level: str) -> None:
    """Access lines on stderr (uvicorn's own access log is off: it cannot show the request id)."""
    if not ACCESS.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        ACCESS.addHandler(handler)
        ACCESS.propagate = False
    ACCESS.setLevel(level.upper())
