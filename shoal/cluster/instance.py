"""One engine instance in its own process, as a Ray actor.

Only the instance's own thread touches the engine: it runs the calls it was sent (in arrival
order) between two steps, then steps. A call therefore waits at most for the step in flight, and
the engine core stays single-threaded. The gateway long-polls outputs and the load snapshot taken
after each step with :meth:`Instance.poll`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch

from shoal.engine.metadata import RequestMetadata
from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.outputs import InstanceLoad, RequestOutput, RequestState
from shoal.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Instance:
    """An :class:`Engine` owned by its own stepping thread; methods are queued to it."""

    def __init__(self, config: EngineConfig, name: str, num_threads: int | None = None) -> None:
        _normal_priority(name)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = name
        self.engine = Engine(config)
        self._cv = threading.Condition()  # guards _calls, _outputs, _load, _stop
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._outputs: list[RequestOutput] = []
        self._load = self.engine.load()
        self._stop = False
        self._faults: set[str] = set()
        self._step_delay_s = 0.0
        self._hold: set[str] = set()  # P/D: suspend these after their first token
        self._handoffs: dict[str, RequestState] = {}
        self._broken: str | None = None  # why the engine could not be restarted, if it could not
        self._thread = threading.Thread(target=self._loop, name=f"shoal-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._calls or self.engine.has_unfinished()):
                    self._cv.wait()
                if self._stop:
                    for _, fut in self._calls:
                        fut.set_exception(RuntimeError(f"{self.name} is shutting down"))
                    return
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                try:
                    fut.set_result(fn())
                except Exception as exc:
                    fut.set_exception(exc)
            stepped = self.engine.has_unfinished()
            try:
                outs = self._step() if stepped else []
            except Exception as exc:  # the step itself broke, not one request: start over
                outs = self._recover(exc)
                if outs is None:
                    return
            load = self.engine.load()
            with self._cv:
                self._outputs.extend(outs)
                self._load = load
                self._cv.notify_all()
            if stepped and self._step_delay_s:
                time.sleep(self._step_delay_s)

    def _step(self) -> list[RequestOutput]:
        outs = self.engine.step()
        for out in outs:
            if out.req_id in self._hold and out.new_token_ids:
                self._hold.discard(out.req_id)
                if not out.finished:  # prefill done: park it (KV kept) for the decode instance
                    self._handoffs[out.req_id] = self.engine.export(out.req_id, 0, release=False)
        return outs

    def _recover(self, exc: Exception) -> list[RequestOutput] | None:
        """Fail every request here and start the engine core over (its outputs are returned);
        None if even that failed: the instance is then broken and :meth:`poll` says so, so the
        gateway treats it as dead instead of routing to it."""
        log.exception("%s: engine step crashed; failing its requests and restarting the engine", self.name)
        self._hold.clear()
        self._handoffs.clear()
        try:
            outs = self.engine.recover(f"the engine hit an internal error and restarted: {exc!r}")
        except Exception as fatal:
            log.critical("%s: engine restart failed: %r", self.name, fatal)
            with self._cv:
                self._broken = repr(fatal)
                for _, fut in self._calls:
                    fut.set_exception(RuntimeError(f"{self.name} is broken"))
                self._calls = []
                self._cv.notify_all()
            return None
        log.warning("%s: engine restarted (restart %d)", self.name, self.engine.num_restarts)
        return outs

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the stepping thread before its next step; return its result or raise."""
        fut: Future = Future()
        with self._cv:
            if self._broken:
                raise RuntimeError(f"{self.name} is broken: {self._broken}")
            if self._stop:
                raise RuntimeError(f"{self.name} is shutting down")
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut.result()

    def info(self) -> dict:
        e = self.engine
        return {"name": self.name, "max_model_len": e.max_model_len, "vocab_size": e.vocab_size,
                "block_size": e.block_manager.block_size, "num_blocks": e.block_manager.num_blocks,
                "model": e.model_config.name}

    def add(self, prompt_token_ids: list[int], params: SamplingParams, req_id: str,
            metadata: RequestMetadata | None = None, hold_after_prefill: bool = False) -> None:
        """Queue a request. With ``hold_after_prefill`` (a prefill instance) the request is parked
        after its first token until :meth:`take_handoff` moves it to a decode instance."""

        def add() -> None:
            self.engine.add(prompt_token_ids, params, req_id=req_id, metadata=metadata)
            if hold_after_prefill:
                self._hold.add(req_id)

        self._call(add)

    def take_handoff(self, req_id: str) -> RequestState:
        """The parked state of a prefilled request (its KV stays here until release / restore)."""
        return self._call(lambda: self._handoffs.pop(req_id))

    def abort(self, req_id: str) -> bool:
        def abort() -> bool:
            self._hold.discard(req_id)
            if self._handoffs.pop(req_id, None) is not None:
                self.engine.release(req_id)
                return True
            return self.engine.abort(req_id)

        return self._call(abort)

    def poll(self, timeout: float = 0.05) -> tuple[list[RequestOutput], InstanceLoad]:
        """Outputs produced since the last poll (waiting up to ``timeout`` for some) and the load
        after the latest step."""
        with self._cv:
            if not self._outputs and not self._broken:
                self._cv.wait(timeout)
            outs, self._outputs = self._outputs, []
            if self._broken and not outs:
                raise RuntimeError(f"{self.name} is broken: {self._broken}")
            return outs, self._load

    def load(self) -> InstanceLoad:
        """The load after the latest step."""
        with self._cv:
            return self._load

    # ---- migration (see ClusterEngine.migrate) ------------------------------------------------

    def read_blocks(self, req_id: str, start_block: int):
        return self._call(lambda: self.engine.read_blocks(req_id, start_block))

    def export(self, req_id: str, from_block: int, release: bool) -> tuple[RequestState, list[RequestOutput]]:
        """Suspend or remove a request; also hand over its outputs not yet polled, so the client
        sees them before anything the destination produces."""

        def export() -> tuple[RequestState, list[RequestOutput]]:
            state = self.engine.export(req_id, from_block, release)
            with self._cv:
                mine = [o for o in self._outputs if o.req_id == req_id]
                self._outputs = [o for o in self._outputs if o.req_id != req_id]
            return state, mine

        return self._call(export)

    def release(self, req_id: str) -> None:
        self._call(lambda: self.engine.release(req_id))

    def restore(self, req_id: str) -> None:
        self._call(lambda: self.engine.restore(req_id))

    def stage_kv(self, req_id: str, kv: torch.Tensor, start_block: int) -> None:
        self._call(lambda: self.engine.stage_kv(req_id, kv, start_block))
        self._maybe_fail("stage_kv")  # after the write: the caller cannot know what landed

    def unstage(self, req_id: str) -> None:
        self._call(lambda: self.engine.unstage(req_id))

    def import_(self, state: RequestState) -> None:
        self._maybe_fail("import_")
        self._call(lambda: self.engine.import_(state))

    def inject_delay(self, seconds: float) -> None:
        """Sleep this long after every step: a slow instance (tests)."""
        self._step_delay_s = seconds

    def inject_fault(self, method: str) -> None:
        """Make the next call of a migration method (``stage_kv``, ``import_``) raise (tests)."""
        self._faults.add(method)

    def _maybe_fail(self, method: str) -> None:
        if method in self._faults:
            self._faults.discard(method)
            raise RuntimeError(f"injected fault in {method}")

    def check(self) -> dict:
        """Block-manager invariants and usage (tests)."""

        def check() -> dict:
            self.engine.block_manager.check()
            return {"used": self.engine.block_manager.num_used, "requests": len(self.engine.requests)}

        return self._call(check)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()


def _normal_priority(name: str) -> None:
    """Run this instance's threads (the stepping thread and torch's, started after this) at nice 0:
    Ray starts workers at nice 15, where any busy neighbour starves the engine's steps."""
    nice = os.nice(0)
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except PermissionError:
        log.warning("%s runs at nice %d: a busy CPU will starve it; start Ray with RAY_worker_niceness=0", name, nice)
