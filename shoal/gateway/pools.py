"""Model pools behind the gateway: an ASGI app in this process (the served model, or another local
model) or an OpenAI-compatible upstream reached with httpx. Both answer a request whole
(:meth:`Pool.complete`) or relay its stream to the client as it comes (:meth:`Pool.relay`); an
upstream's failures become OpenAI error replies, never exceptions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Awaitable, Callable

import httpx

from shoal.gateway.config import PoolConfig

Headers = list[tuple[bytes, bytes]]
Tee = Callable[[bytes], None]  # sees each body chunk relayed to the client


@dataclass
class Reply:
    """A whole HTTP answer."""

    status: int
    headers: Headers
    body: bytes

    def json(self) -> dict | None:
        try:
            data = json.loads(self.body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


def error_reply(status: int, message: str, type_: str) -> Reply:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return Reply(status, [(b"content-type", b"application/json")], json.dumps(body).encode())


def request_scope(scope: dict, path: str, body: bytes) -> dict:
    """A POST of ``body`` to ``path`` carrying the client request's headers and state (its tenant)."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {**scope, "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers, "state": dict(scope.get("state", {}))}


class Pool:
    """One pool: its config and how to reach it."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.name = config.name

    def model_for(self, body: dict) -> dict:
        """``body`` with ``model`` set to the name this pool knows its model by."""
        return {**body, "model": self.model_id}

    @property
    def model_id(self) -> str | None:
        raise NotImplementedError

    async def complete(self, path: str, body: dict, scope: dict, receive) -> Reply:
        raise NotImplementedError

    async def relay(self, path: str, body: dict, scope: dict, receive, send, extra_headers: Headers,
                    tee: Tee | None) -> None:
        raise NotImplementedError


class LocalPool(Pool):
    """A model served by an ASGI app in this process (its own middlewares, no key check)."""

    def __init__(self, config: PoolConfig, app, model_id: str | None) -> None:
        super().__init__(config)
        self.app, self._model_id = app, model_id

    @property
    def model_id(self) -> str | None:
        return self._model_id

    def _call(self, path: str, body: dict, scope: dict, receive, send) -> Awaitable[None]:
        return self.call_raw(path, json.dumps(self.model_for(body)).encode(), scope, receive, send)

    def call_raw(self, path: str, data: bytes, scope: dict, receive, send) -> Awaitable[None]:
        """The app's answer to a POST of ``data`` (as read from the client), sent to ``send``."""
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # a client that goes away still reaches the app

        return self.app(request_scope(scope, path, data), replay, send)

    async def complete(self, path: str, body: dict, scope: dict, receive) -> Reply:
        status, headers, chunks = 500, [], []

        async def collect(message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._call(path, {**body, "stream": False}, scope, receive, collect)
        return Reply(status, headers, b"".join(chunks))

    async def relay(self, path, body, scope, receive, send, extra_headers, tee) -> None:
        async def forward(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra_headers}
            elif message["type"] == "http.response.body" and tee is not None:
                tee(message.get("body", b""))
            await send(message)

        await self._call(path, body, scope, receive, forward)


class UpstreamPool(Pool):
    """An OpenAI-compatible server elsewhere; its key comes from the environment per request."""

    def __init__(self, config: PoolConfig, client: httpx.AsyncClient | None = None) -> None:
        super().__init__(config)
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s, connect=10.0))

    @property
    def model_id(self) -> str:
        return self.config.upstream_model or self.config.name

    def _request(self, path: str, body: dict, scope: dict) -> httpx.Request:
        headers = {"content-type": "application/json"}
        if key := self.config.api_key():
            headers["authorization"] = f"Bearer {key}"
        for k, v in scope["headers"]:
            if k == b"x-request-id":  # the client's id, so the upstream's logs name the same request
                headers["x-request-id"] = v.decode("latin-1")
        url = self.config.url.rstrip("/") + path.removeprefix("/v1")
        return self.client.build_request("POST", url, content=json.dumps(self.model_for(body)), headers=headers)

    def _failure(self, exc: Exception) -> Reply:
        if isinstance(exc, httpx.TimeoutException):
            return error_reply(504, f"pool {self.name!r}: the upstream did not answer within "
                                    f"{self.config.timeout_s:g} s", "GatewayTimeoutError")
        return error_reply(502, f"pool {self.name!r}: cannot reach the upstream ({type(exc).__name__})", "BadGatewayError")

    def _checked(self, status: int, body: bytes) -> Reply | None:
        """The upstream's own error, said as the gateway's (a bad key is the operator's, not the client's)."""
        if status < 400:
            return None
        detail = ""
        try:
            detail = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        if status in (401, 403):
            return error_reply(502, f"pool {self.name!r}: the upstream refused the gateway's key", "BadGatewayError")
        if status >= 500:
            return error_reply(502, f"pool {self.name!r}: upstream error {status}: {detail[:200]}", "BadGatewayError")
        return Reply(status, [(b"content-type", b"application/json")], body)  # the client's own 4xx

    async def complete(self, path, body, scope, receive) -> Reply:
        try:
            response = await self.client.send(self._request(path, {**body, "stream": False}, scope))
        except httpx.HTTPError as exc:
            return self._failure(exc)
        return self._checked(response.status_code, response.content) or \
            Reply(200, [(b"content-type", b"application/json")], self._renamed(response.content))

    def _renamed(self, body: bytes) -> bytes:
        """An upstream answer with ``model`` naming this pool (the client asked the gateway)."""
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, dict) and "model" in data:
            data["model"] = self.name
            return json.dumps(data).encode()
        return body

    async def relay(self, path, body, scope, receive, send, extra_headers, tee) -> None:
        try:
            response = await self.client.send(self._request(path, body, scope), stream=True)
        except httpx.HTTPError as exc:
            await send_reply(self._failure(exc), send, extra_headers)
            return
        try:
            if response.status_code >= 400:
                failure = self._checked(response.status_code, await response.aread())
                await send_reply(failure, send, extra_headers)
                return
            content_type = response.headers.get("content-type", "text/event-stream").encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type)] + extra_headers})
            try:
                async for line in response.aiter_lines():
                    chunk = (_renamed_event(line, self.name) + "\n").encode()
                    if tee is not None:
                        tee(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                error = {"error": {"message": f"pool {self.name!r}: the upstream stream broke ({type(exc).__name__})",
                                   "type": "BadGatewayError", "code": 502}}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def _renamed_event(line: str, name: str) -> str:
    if not line.startswith("data: {"):
        return line
    try:
        data = json.loads(line[6:])
    except ValueError:
        return line
    if "model" in data:
        data["model"] = name
    return "data: " + json.dumps(data)


async def send_reply(reply: Reply, send, extra_headers: Headers = ()) -> None:
    """Answer with ``reply`` (plus ``extra_headers``)."""
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers + list(extra_headers)})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})
