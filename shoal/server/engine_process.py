"""The engine core in its own process (vLLM V1's shape): the API process does HTTP, chat templates,
tokenization and detokenization of the text it serves (except requests with stop strings, whose
text the engine needs); the engine process runs the :class:`~shoal.server.engine_loop.EngineLoop`
and nothing else, so its steps never wait on them.

Messages and events cross a duplex Unix socket pair (``multiprocessing.Pipe``: pickled frames, one
per message and one per engine step carrying all of the step's outputs). A reader thread here turns
the engine's events into the event loop's; if the engine process dies, every open request ends with
an error, ``dead`` is set (``/health`` answers 503) and nothing hangs.

Threads: OpenMP keeps its default wait policy (workers spin briefly, then sleep): it reads
``OMP_WAIT_POLICY`` once, when torch loads, and ``PASSIVE`` halves a single stream's decode (every
small op then waits on a futex wake). Given ``cpus``, the process is pinned to those cores; with
``adaptive_threads`` its torch thread count follows the cores other processes leave
(:mod:`shoal.server.thread_governor`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
from typing import Callable

from shoal import logs
from shoal.engine.guided import GrammarCompiler
from shoal.engine.metadata import SLO
from shoal.server.async_engine import EngineFront
from shoal.server.engine_loop import Admitted, Dead, EngineLoop, Event, Message

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0


class EngineProcess(EngineFront):
    """An engine core built by ``factory()`` in a child process; ``tokenizer`` serves the API here
    and decodes the text of requests without stop strings (none without a tokenizer)."""

    def __init__(self, factory: Callable[[], object], tokenizer, max_waiting: int | None = None,
                 slo: SLO | None = None, cpus: list[int] | None = None, adaptive_threads: bool = False,
                 log_level: str = "warning", log_format: str = "text") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, args=(pickle.dumps(factory), max_waiting, child, cpus, adaptive_threads,
                                                      log_level, log_format, tokenizer is not None),
                                name="shoal-engine-core", daemon=True)
        self.proc.start()
        child.close()
        ready = self._wait_ready()
        super().__init__(max_waiting, slo, ready["max_model_len"], ready["vocab_size"], ready["load"])
        self.tokenizer = tokenizer
        self.detokenizes = tokenizer is not None
        self._grammar: GrammarCompiler | None = None
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="shoal-engine-events", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> dict:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self.proc.is_alive() or waited > STARTUP_TIMEOUT_S:
                self.proc.kill()
                raise RuntimeError(f"the engine process did not start (exit code {self.proc.exitcode})")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process did not start (exit code {self.proc.join(5) or self.proc.exitcode})") from None
        if kind == "failed":
            self.proc.join(10)
            raise value
        return value

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """A grammar compiler in this process: the API checks and compiles grammars here; the
        engine process compiles each again for its own matchers."""
        if self._grammar is None:
            self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._grammar

    def _send(self, msg: Message) -> None:
        if self.dead:
            return
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError:  # the process is gone: the reader reports it
            pass

    def _read(self) -> None:
        while True:
            try:
                event = self._conn.recv()
            except (EOFError, OSError):
                break
            self._post(event)
            if isinstance(event, Dead):
                return
        self.proc.join(5)
        self._post(Dead(f"the engine process exited (code {self.proc.exitcode})"))

    def shutdown(self) -> None:
        self._send(None)
        # The reader reaps the process once its end of the pipe closes (one waiter: two threads
        # waiting on one child race for its exit status).
        self._reader.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._conn.close()


def engine_main(factory_bytes: bytes, max_waiting: int | None, conn, cpus: list[int] | None,
                adaptive_threads: bool = False, log_level: str = "warning", log_format: str = "text",
                api_detokenizes: bool = True) -> None:
    """The engine process: set its cores and logging (the server's), build the engine
    (if ``api_detokenizes``, decoding the text of requests with stop strings only: the API process
    decodes the others'), run the loop."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    logs.configure(log_level, log_format)
    try:
        engine = pickle.loads(factory_bytes)()
        engine.detokenize_all = not api_detokenizes
    except BaseException as exc:  # the model or the config failed: say why, then exit
        conn.send(("failed", _picklable(exc)))
        return
    conn.send(("ready", {"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size, "load": engine.load()}))

    def emit(event: Event) -> None:
        if isinstance(event, Admitted) and event.error is not None:
            event = Admitted(event.req_id, _picklable(event.error))
        conn.send(event)

    def receive(block: bool) -> list[Message]:
        if not conn.poll(0.5 if block else 0):
            return []
        messages = [conn.recv()]
        while messages[-1] is not None and conn.poll(0):
            messages.append(conn.recv())
        return messages

    after_step = None
    if adaptive_threads:
        import torch

        from shoal.server.thread_governor import ThreadGovernor

        after_step = ThreadGovernor(torch.get_num_threads(), torch.set_num_threads).observe
    try:
        EngineLoop(engine, max_waiting, emit, after_step).run(receive)
    except (EOFError, OSError):  # the API process went away
        pass


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(repr(exc))

