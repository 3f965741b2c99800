"""The engine core's step loop, apart from whoever listens: it runs in a thread of the API process
or alone in its own process (:mod:`shoal.server.engine_process`), and knows nothing of asyncio.

It takes messages (:class:`AddRequest`, :class:`AbortRequest`, :class:`FailAll`, ``None`` to stop)
from ``receive`` between steps and reports through ``emit``: :class:`Admitted` once per added
request, :class:`Stepped` (every output of a step, batched, with the load snapshot after it), and
:class:`Dead` when the engine cannot go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Union

from shoal.engine.metadata import RequestMetadata
from shoal.engine.outputs import InstanceLoad, RequestOutput
from shoal.engine.sampling_params import SamplingParams
from shoal.streams import QueueFull

log = logging.getLogger(__name__)


@dataclass
class AddRequest:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metadata: RequestMetadata


@dataclass
class AbortRequest:
    req_id: str


@dataclass
class FailAll:
    error: str


Message = Union[AddRequest, AbortRequest, FailAll, None]


@dataclass
class Admitted:
    """An :class:`AddRequest` was queued (``error`` None) or refused (``QueueFull``, ``ValueError``...)."""

    req_id: str
    error: BaseException | None = None


@dataclass
class Stepped:
    outputs: list[RequestOutput]
    load: InstanceLoad


@dataclass
class Dead:
    """The engine stopped for good (a restart failed, or its process exited)."""

    reason: str


Event = Union[Admitted, Stepped, Dead]


class EngineLoop:
    """Drives one engine core (an ``Engine``, or any ``EngineCore``): messages in, events out."""

    def __init__(self, engine, max_waiting: int | None, emit: Callable[[Event], None],
                 after_step: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.emit = emit
        self.after_step = after_step  # e.g. the engine process's thread governor

    def run(self, receive: Callable[[bool], list[Message]]) -> None:
        """Step until a ``None`` message; ``receive(block)`` returns the messages waiting (when
        ``block``, it waits a little for one first)."""
        engine = self.engine
        self.emit(Stepped([], engine.load()))
        while True:
            try:
                messages = receive(not engine.has_unfinished())
                for msg in messages:
                    if msg is None:
                        return
                    self.handle(msg)
                if engine.has_unfinished():
                    outputs = engine.step()
                    self.emit(Stepped(outputs, engine.load()))
                    if self.after_step is not None:
                        self.after_step()
                elif messages:
                    self.emit(Stepped([], engine.load()))
            except Exception as exc:  # the step itself broke, not one request: start over
                if not self._recover(exc):
                    return

    def handle(self, msg: AddRequest | AbortRequest | FailAll) -> None:
        engine = self.engine
        if isinstance(msg, AbortRequest):
            engine.abort(msg.req_id)
        elif isinstance(msg, FailAll):
            self.emit(Stepped(engine.fail_all(msg.error), engine.load()))
        else:
            self.emit(Admitted(msg.req_id, self._add(msg)))

    def _add(self, msg: AddRequest) -> BaseException | None:
        engine = self.engine
        if self.max_waiting is not None and (waiting := engine.load().waiting_for_room()) >= self.max_waiting:
            # Decided here, where every earlier request is queued already: a burst neither gets
            # past the bound nor has its urgent requests refused for lower ones not yet queued.
            if engine.shed(msg.metadata.priority) is None:
                return QueueFull(f"{waiting} requests are waiting (limit {self.max_waiting})")
        try:
            engine.add(msg.prompt_token_ids, msg.params, req_id=msg.req_id, metadata=msg.metadata)
        except Exception as exc:  # refused (ValueError / TypeError) or a bug: this request alone fails
            return exc
        return None

    def _recover(self, exc: Exception) -> bool:
        """Fail every open request and start the engine core over; False (and :class:`Dead`
        emitted) if even that fails, so that the server exits instead of answering 503 for ever."""
        log.exception("engine step crashed; failing its requests and restarting the engine")
        try:
            outputs = self.engine.recover(f"the engine hit an internal error and restarted: {exc!r}")
            self.emit(Stepped(outputs, self.engine.load()))
        except Exception as fatal:
            log.critical("engine restart failed: %r", fatal)
            self.emit(Dead(repr(fatal)))
            return False
        log.warning("engine restarted (restart %d)", self.engine.num_restarts)
        return True
