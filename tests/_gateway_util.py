"""A scripted OpenAI-compatible upstream for the gateway's tests: it answers each chat request with
the text a function of the request gives (whole or streamed), records what it was sent, and can be
told to fail (a status code), stall (a delay) or want a key."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class FakeUpstream:
    def __init__(self, answer: Callable[[dict], str] = lambda body: "ok", key: str | None = None) -> None:
        self.answer, self.key = answer, key
        self.requests: list[dict] = []
        self.fail_status: int | None = None
        self.delay_s = 0.0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.key is not None and request.headers.get("authorization") != f"Bearer {self.key}":
                return JSONResponse({"error": {"message": "bad key", "type": "AuthenticationError"}}, status_code=401)
            if self.fail_status is not None:
                return JSONResponse({"error": {"message": "upstream broke", "type": "InternalError"}},
                                    status_code=self.fail_status)
            await asyncio.sleep(self.delay_s)
            text = self.answer(body)
            usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
            if body.get("stream"):
                async def events():
                    for piece in (text[: len(text) // 2], text[len(text) // 2:]):
                        chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                                 "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    done = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                    yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self._sock = sock
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> "FakeUpstream":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()
