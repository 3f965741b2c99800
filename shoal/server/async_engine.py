"""The asyncio front of one engine core: requests go in through :meth:`AsyncEngine.submit` and their
:class:`RequestOutput` objects come back on a per-request stream.

The engine core stays single-threaded: an :class:`~shoal.server.engine_loop.EngineLoop` drives it
either in a thread of this process (:class:`AsyncEngine`) or alone in its own process
(:class:`~shoal.server.engine_process.EngineProcess`: the step loop then never waits on HTTP,
tokenization or detokenization, which happens here but for requests with stop strings, whose text
the engine needs). Either way messages cross to the loop, and the loop's events
(admissions, each step's outputs batched with a load snapshot) come back to the event loop here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Callable

from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.engine import Engine
from shoal.engine.guided import GrammarCompiler
from shoal.engine.metadata import SLO, RequestMetadata, with_slo
from shoal.engine.outputs import InstanceLoad, RequestOutput, failed_output
from shoal.engine.sampling_params import SamplingParams
from shoal.server.engine_loop import AbortRequest, AddRequest, Admitted, Dead, EngineLoop, Event, FailAll, Message, Stepped
from shoal.streams import RequestStream


class EngineFront:
    """What the API sees of an engine core, wherever its loop runs: subclasses say how a message
    reaches the loop (:meth:`_send`) and pass the loop's events to :meth:`_post` (any thread).

    A front that ``detokenizes`` decodes the text of requests without stop strings here, before
    step listeners and streams see their outputs (its engine core decodes only the others)."""

    detokenizes: bool = False

    def __init__(self, max_waiting: int | None, slo: SLO | None, max_model_len: int, vocab_size: int,
                 load: InstanceLoad) -> None:
        self.slo = slo  # given to requests that bring none
        self.max_waiting = max_waiting
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._snapshot = load
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._admissions: dict[str, asyncio.Future[None]] = {}
        self._detoks: dict[str, IncrementalDetokenizer] = {}  # open requests whose text is decoded here
        self.step_listeners: list[Callable[[list[RequestOutput]], None]] = []
        self.dead: str | None = None  # why the engine stopped for good, if it did

    def _send(self, msg: Message) -> None:
        raise NotImplementedError

    def load(self) -> InstanceLoad:
        """The latest load snapshot (the loop sends one after every step)."""
        return self._snapshot

    async def submit(
        self, prompt_token_ids: list[int], params: SamplingParams, req_id: str,
        metadata: RequestMetadata | None = None,
    ) -> RequestStream:
        """Admit a request; returns the stream of its outputs (of the ``metadata``, the session
        only matters to a cluster's dispatch: one engine holds every session; a missing SLO is
        the server's ``slo``). When the waiting queue is at its bound, a request of better
        priority than the worst queued one takes that one's place (it ends with ``SHED_ERROR``);
        otherwise QueueFull. ValueError for input the engine refuses, RuntimeError if the engine
        has stopped."""
        if self.dead:
            raise RuntimeError(f"engine stopped: {self.dead}")
        self._loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        admitted = self._admissions[req_id] = self._loop.create_future()
        self._streams[req_id] = outputs
        if self.detokenizes and not params.stop:
            self._detoks[req_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        self._send(AddRequest(req_id, list(prompt_token_ids), params, with_slo(metadata, self.slo)))
        try:
            await admitted
        except BaseException:
            self._streams.pop(req_id, None)
            self._detoks.pop(req_id, None)
            raise
        return RequestStream(self.abort, req_id, outputs)

    def abort(self, req_id: str) -> None:
        self._send(AbortRequest(req_id))

    def fail_all(self, error: str) -> None:
        """End every open request with ``error`` (a shutdown whose drain timed out)."""
        self._send(FailAll(error))

    def _post(self, event: Event) -> None:
        """Hand an event of the loop to the event loop (callable from any thread)."""
        if isinstance(event, Stepped):
            self._snapshot = event.load
        if isinstance(event, Dead):
            self.dead = event.reason
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_event, event)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Admitted):
            fut = self._admissions.pop(event.req_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None) if event.error is None else fut.set_exception(event.error)
        elif isinstance(event, Stepped):
            self._detokenize(event.outputs)
            # Listeners (metrics) first: a client that reads /metrics after its answer sees it counted.
            for listener in self.step_listeners:
                listener(event.outputs)
            for out in event.outputs:
                stream = self._streams.get(out.req_id)
                if stream is not None:
                    stream.put_nowait(out)
                    if out.finished:
                        del self._streams[out.req_id]
        else:
            error = f"engine stopped: {event.reason}"
            for fut in self._admissions.values():
                if not fut.done():
                    fut.set_exception(RuntimeError(error))
            self._admissions.clear()
            self._detoks.clear()
            outputs = [failed_output(req_id, error) for req_id in self._streams]
            for listener in self.step_listeners:
                listener(outputs)
            for out in outputs:
                self._streams.pop(out.req_id).put_nowait(out)

    def _detokenize(self, outputs: list[RequestOutput]) -> None:
        """Fill in the text of the outputs of requests decoded here; forget those that ended."""
        for out in outputs:
            detok = self._detoks.get(out.req_id)
            if detok is None:
                continue
            for token in out.new_token_ids:
                detok.update(token)
            if out.finished:
                out.new_text = detok.finish()
                del self._detoks[out.req_id]
            else:
                out.new_text = detok.get_delta()


class AsyncEngine(EngineFront):
    """An :class:`Engine` whose loop runs in a thread of this process."""

    def __init__(self, engine: Engine, max_waiting: int | None = None, slo: SLO | None = None) -> None:
        super().__init__(max_waiting, slo, engine.max_model_len, engine.vocab_size, engine.load())
        self.engine = engine
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._loop_runner = EngineLoop(engine, max_waiting, self._post)
        self._thread = threading.Thread(target=self._loop_runner.run, args=(self._receive,), name="shoal-engine",
                                        daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The engine's grammar compiler: the API compiles a new grammar into its cache off the
        engine thread, so the engine's own compile of it is a hit."""
        return self.engine.grammar_compiler

    def _send(self, msg: Message) -> None:
        self._inbox.put(msg)

    def _receive(self, block: bool) -> list[Message]:
        try:
            first = self._inbox.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return []
        messages = [first]
        while first is not None:
            try:
                messages.append(first := self._inbox.get_nowait())
            except queue.Empty:
                break
        return messages

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)
