"""Plain ASGI middlewares of the OpenAI app: request ids and the access log, API key, body-size
limit, and the admission gate.

Plain ASGI rather than ``@app.middleware("http")`` (Starlette's BaseHTTPMiddleware), which would
hide client disconnects from ``request.is_disconnected()``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Callable

from fastapi.responses import JSONResponse

from shoal.server.lifecycle import Lifecycle
from shoal.server.tenants import KeyRing

log = logging.getLogger(__name__)
access_log = logging.getLogger("shoal.access")

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, as a log line and a header can carry it


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class BearerAuth:
    """Require exactly one ``Authorization: Bearer <key>`` header (scheme case-insensitive, keys
    compared in constant time) on ``/v1/*``, ``/tokenize``, ``/detokenize`` and, unless
    ``open_metrics``, ``/metrics`` and ``/dashboard/state`` (the dashboard page itself is public);
    a 401 says ``WWW-Authenticate: Bearer``. The key's tenant rides on the request as
    ``request.state.tenant``."""

    PROTECTED = ("/v1", "/tokenize", "/detokenize")

    def __init__(self, app, keys: KeyRing, open_metrics: bool = False) -> None:
        self.app, self.keys = app, keys
        self.protected = self.PROTECTED + (() if open_metrics else ("/metrics", "/dashboard/state"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.protected):
            given = [v for k, v in scope["headers"] if k == b"authorization"]
            tenant = self.keys.lookup(given[0]) if len(given) == 1 else None
            if tenant is None:
                message = "Invalid or missing API key." if len(given) < 2 else "More than one Authorization header."
                response = error_response(401, message, "AuthenticationError", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """A request body over the limit (raised while it is read, for bodies without Content-Length)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


class BodyLimit:
    """Answer 413 to a body over ``max_bytes``: at once from its Content-Length, or as soon as a
    chunked body grows past the limit (the app's BodyTooLarge handler answers)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large_response(BodyTooLarge(self.max_bytes))(scope, receive, send)
            return
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def too_large_response(exc: BodyTooLarge) -> JSONResponse:
    return error_response(413, str(exc), "RequestTooLargeError")


class AdmissionGate:
    """Counts the ``/v1`` POSTs in flight (until their last byte is sent) and, once the server
    drains for shutdown, answers new ones 503 with ``Retry-After``."""

    def __init__(self, app, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        if not self.lifecycle.accepting:
            response = error_response(503, "The server is shutting down; retry on another replica.",
                                      "ServiceUnavailableError", headers={"Retry-After": "5"})
            await response(scope, receive, send)
            return
        self.lifecycle.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.inflight -= 1


class InternalErrors:
    """A bug while handling a request answers 500 in OpenAI's shape and is logged, and the
    keep-alive connection survives: Starlette's own handler re-raises, after which uvicorn closes
    the connection."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise  # mid-response: nothing valid can be sent any more
            response = error_response(500, f"internal error: {type(exc).__name__}", "InternalServerError")
            await response(scope, receive, send)


class RequestLog:
    """Every HTTP request gets an id: its ``X-Request-Id`` header if it sent a valid one (1-128
    visible ASCII characters; otherwise a 400), else a fresh one. The id is echoed in the response's
    ``X-Request-Id`` and kept as ``request.state.request_id``. With ``access_log``, one line per
    request on the ``shoal.access`` logger when its last byte is sent: method, path (no query
    string), status, milliseconds, request id; never a body, a prompt or a key. ``observe(scope,
    status, seconds)`` is told of every request as it ends (the HTTP metrics; status 0: none sent)."""

    def __init__(self, app, access_log: bool = True,
                 observe: Callable[[dict, int, float], None] | None = None) -> None:
        self.app, self.access_log, self.observe = app, access_log, observe

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope["headers"] if k == b"x-request-id"]
        request_id = given[0].decode("latin-1") if len(given) == 1 else uuid.uuid4().hex
        start, status = time.perf_counter(), 0

        async def with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            if len(given) > 1 or not REQUEST_ID.fullmatch(request_id):
                request_id = uuid.uuid4().hex
                message = ("X-Request-Id must be one header of 1-128 visible ASCII characters." if len(given) < 2
                           else "More than one X-Request-Id header.")
                await error_response(400, message, "BadRequestError", "X-Request-Id")(scope, receive, with_id)
                return
            scope.setdefault("state", {})["request_id"] = request_id
            await self.app(scope, receive, with_id)
        finally:
            seconds = time.perf_counter() - start
            if self.observe is not None:
                self.observe(scope, status, seconds)
            if self.access_log:
                ms = seconds * 1e3
                access_log.info("%s %s %d %.1f ms id=%s", scope["method"], scope["path"], status, ms, request_id,
                                extra={"method": scope["method"], "path": scope["path"], "status": status,
                                       "duration_ms": round(ms, 1), "request_id": request_id})
