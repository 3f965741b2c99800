"""Runs the synchronous engine's step loop in its own thread and streams outputs to asyncio.

The engine core stays single-threaded: only the loop thread touches it. Callers on the event loop
submit work through a thread-safe inbox and receive :class:`RequestOutput` objects on a per-request
``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from shoal.engine.metadata import SLO, RequestMetadata, with_slo
from shoal.engine.engine import Engine
from shoal.engine.guided import GrammarCompiler
from shoal.engine.outputs import InstanceLoad, RequestOutput, failed_output
from shoal.engine.sampling_params import SamplingParams
from shoal.streams import QueueFull, RequestStream

log = logging.getLogger(__name__)


@dataclass
class _Add:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metadata: RequestMetadata | None
    sink: Callable[[RequestOutput], None]
    admitted: "asyncio.Future[None]"
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    req_id: str


@dataclass
class _FailAll:
    error: str


class AsyncEngine:
    """Thread-backed asyncio front of one :class:`Engine`."""

    def __init__(self, engine: Engine, max_waiting: int | None = None, slo: SLO | None = None) -> None:
        self.slo = slo  # given to requests that bring none
        self.engine = engine
        self.max_waiting = max_waiting
        self._inbox: queue.Queue[_Add | _Abort | _FailAll | None] = queue.Queue()
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._snapshot = engine.load()  # refreshed by the loop thread after every step
        self._thread = threading.Thread(target=self._run, name="shoal-engine", daemon=True)
        self._stopped = threading.Event()
        self.step_listeners: list[Callable[[list[RequestOutput]], None]] = []
        self.dead: str | None = None  # why the engine could not be started again, if it could not
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The engine's grammar compiler: the API compiles a new grammar into its cache off the
        engine thread, so the engine's own compile of it is a hit."""
        return self.engine.grammar_compiler

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def load(self) -> InstanceLoad:
        """The latest load snapshot (refreshed by the loop thread after every step)."""
        return self._snapshot

    async def submit(
        self, prompt_token_ids: list[int], params: SamplingParams, req_id: str,
        metadata: RequestMetadata | None = None,
    ) -> "RequestStream":
        """Admit a request; returns the stream of its outputs (of the ``metadata``, the session
        only matters to a cluster's dispatch: one engine holds every session; a missing SLO is
        the server's ``slo``). When the waiting queue is at its bound, a request of better
        priority than the worst queued one takes that one's place (it ends with ``SHED_ERROR``);
        otherwise QueueFull. ValueError for input the engine refuses, RuntimeError if the engine
        has stopped."""
        if self.dead:
            raise RuntimeError(f"engine stopped: {self.dead}")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        admitted: asyncio.Future[None] = loop.create_future()

        def sink(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        self._inbox.put(_Add(req_id, prompt_token_ids, params, with_slo(metadata, self.slo), sink, admitted, loop))
        await admitted
        return RequestStream(self.abort, req_id, outputs)

    def abort(self, req_id: str) -> None:
        self._inbox.put(_Abort(req_id))

    def fail_all(self, error: str) -> None:
        """End every open request with ``error`` (a shutdown whose drain timed out)."""
        self._inbox.put(_FailAll(error))

    def shutdown(self) -> None:
        self._stopped.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # ---- the loop thread --------------------------------------------------------------------------

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return
        while item is not None:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: _Add | _Abort | _FailAll) -> None:
        if isinstance(item, _Abort):
            self._sinks.pop(item.req_id, None)
            self.engine.abort(item.req_id)
            return
        if isinstance(item, _FailAll):
            self._deliver(self.engine.fail_all(item.error))
            return
        if self.max_waiting is not None and (waiting := self.engine.load().waiting_for_room()) >= self.max_waiting:
            # Decided here, where every earlier request is queued already: a burst neither gets
            # past the bound nor has its urgent requests refused for lower ones not yet queued.
            if self.engine.shed(item.metadata.priority) is None:
                refused = QueueFull(f"{waiting} requests are waiting (limit {self.max_waiting})")
                item.loop.call_soon_threadsafe(_set_exception, item.admitted, refused)
                return
        try:
            self.engine.add(item.prompt_token_ids, item.params, req_id=item.req_id, metadata=item.metadata)
        except Exception as exc:  # refused (ValueError / TypeError) or a bug: this request alone fails
            item.loop.call_soon_threadsafe(_set_exception, item.admitted, exc)
            return
        self._sinks[item.req_id] = item.sink
        item.loop.call_soon_threadsafe(_set_result, item.admitted)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # Listeners (metrics) first: a client that reads /metrics after its answer sees it counted.
        for listener in self.step_listeners:
            listener(outputs)
        for out in outputs:
            sink = self._sinks.get(out.req_id)
            if sink is not None:
                sink(out)
                if out.finished:
                    del self._sinks[out.req_id]

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    self._snapshot = self.engine.load()
                    self._deliver(outputs)
                else:
                    self._snapshot = self.engine.load()
            except Exception as exc:  # the step itself broke, not one request: start over
                if not self._recover(exc):
                    return

    def _recover(self, exc: Exception) -> bool:
        """Fail every open request and start the engine core over; False (and ``dead`` set) if
        even that fails, so that the server exits instead of answering 503 for ever."""
        log.exception("engine step crashed; failing its %d requests and restarting the engine", len(self._sinks))
        try:
            outputs = self.engine.recover(f"the engine hit an internal error and restarted: {exc!r}")
            self._snapshot = self.engine.load()
            self._deliver(outputs)
        except Exception as fatal:
            log.critical("engine restart failed: %r", fatal)
            self.dead = repr(fatal)
            for req_id, sink in self._sinks.items():
                sink(failed_output(req_id, f"engine stopped: {self.dead}"))
            self._sinks.clear()
            return False
        log.warning("engine restarted (restart %d)", self.engine.num_restarts)
        return True


def _set_result(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)



