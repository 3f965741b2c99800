"""Asyncio plumbing shared by every serving backend (one engine in a thread, or the Ray cluster)."""

from __future__ import annotations

import asyncio
from typing import Callable

from shoal.engine.outputs import RequestOutput


class QueueFull(RuntimeError):
    """The waiting queue is over its bound; the caller should retry later."""


class RequestStream:
    """Async iterator over one request's outputs. Closing it before the request finished (the
    client went away) aborts the request, which frees its KV blocks at once."""

    def __init__(self, abort: Callable[[str], None], req_id: str, outputs: "asyncio.Queue[RequestOutput]") -> None:
        self._abort, self.req_id, self._outputs = abort, req_id, outputs
        self.finished = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._outputs.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        self.finished = out.finished
        return out

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.req_id)
