"""The server's life: graceful shutdown (drain) on SIGTERM / SIGINT, and exit if the engine dies.

On the first signal the server stops taking requests (503 with ``Retry-After``; ``/health`` 503),
lets those in flight finish for up to ``drain_timeout_s``, ends the rest with an error, and exits 0.
A second signal exits at once. If the engine cannot be restarted after a crash the server exits
with code 1, so that a supervisor starts a new one, rather than answering 503 for ever.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Callable, Protocol

import uvicorn

log = logging.getLogger(__name__)

SHUTDOWN_ERROR = "the server is shutting down"


class Backend(Protocol):
    dead: str | None

    def fail_all(self, error: str) -> None: ...


class Lifecycle:
    """Whether the server takes new requests, and how many it is still serving."""

    def __init__(self, drain_timeout_s: float = 30.0) -> None:
        self.drain_timeout_s = drain_timeout_s
        self.accepting = True
        self.inflight = 0  # /v1 POSTs whose response is not complete (AdmissionGate counts them)
        self.exit_code = 0

    async def drain(self, backend: Backend) -> int:
        """Stop accepting, wait for the requests in flight, then end the rest with an error.
        Returns how many were ended that way."""
        self.accepting = False
        log.warning("shutting down: %d requests in flight, draining for up to %.0f s", self.inflight, self.drain_timeout_s)
        await self._wait_idle(self.drain_timeout_s)
        cut = self.inflight
        if cut:
            log.warning("drain timeout: ending %d requests with an error", cut)
            backend.fail_all(SHUTDOWN_ERROR)
            await self._wait_idle(5.0)
        log.warning("drained; %d requests cut", cut)
        return cut

    async def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class ShoalServer(uvicorn.Server):
    """uvicorn whose first SIGTERM / SIGINT drains through :class:`Lifecycle` and whose process
    exits 0 afterwards; it also exits (code 1) when the backend's engine is beyond restarting.
    ``on_ready`` runs once the app has started and the socket listens (the "ready" line)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, backend: Backend,
                 on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.lifecycle, self.backend, self.on_ready = lifecycle, backend, on_ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._watch: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch = asyncio.create_task(self._watch_backend())
        try:
            await super().serve(sockets)
        finally:
            self._watch.cancel()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        # The app's startup may have replaced the handlers (ray.init() installs its own SIGTERM
        # handler, which cut every stream): take them back. uvicorn restores the originals on exit.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
        if self.started and self.on_ready is not None:
            self.on_ready()

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._draining = True
        log.warning("received %s; send it again to stop at once", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    def begin_drain(self) -> None:
        """What the first signal does, callable from any thread."""
        self.handle_exit(signal.SIGTERM, None)

    async def _drain(self) -> None:
        try:
            await self.lifecycle.drain(self.backend)
        finally:
            self.should_exit = True

    async def _watch_backend(self) -> None:
        while not self.should_exit:
            if self.backend.dead:
                log.critical("the engine is dead and could not be restarted (%s); exiting with code 1", self.backend.dead)
                self.lifecycle.exit_code = 1
                self.lifecycle.accepting = False
                self.should_exit = True
                return
            await asyncio.sleep(0.5)
