"""One engine instance in its own process, as a Ray actor.

A thread steps the engine whenever it has work; every other method takes the same lock, so the
engine core stays single-threaded. The gateway long-polls outputs with :meth:`Instance.poll`.
"""

from __future__ import annotations

import threading
import time

import torch

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.outputs import InstanceLoad, RequestOutput, RequestState
from shoal.engine.sampling_params import SamplingParams


class Instance:
    """An :class:`Engine` behind a lock, stepped by its own thread."""

    def __init__(self, config: EngineConfig, name: str, num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.name = name
        self.engine = Engine(config)
        self._cv = threading.Condition()
        self._outputs: list[RequestOutput] = []
        self._stop = False
        self._faults: set[str] = set()
        self._step_delay_s = 0.0
        self._hold: set[str] = set()  # P/D: suspend these after their first token
        self._handoffs: dict[str, RequestState] = {}
        self._thread = threading.Thread(target=self._loop, name=f"shoal-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                if not self.engine.has_unfinished():
                    self._cv.wait(0.05)
                    continue
                outs = self.engine.step()
                for out in outs:
                    if out.req_id in self._hold and out.new_token_ids:
                        self._hold.discard(out.req_id)
                        if not out.finished:  # prefill done: park it (KV kept) for the decode instance
                            self._handoffs[out.req_id] = self.engine.export(out.req_id, 0, release=False)
                if outs:
                    self._outputs.extend(outs)
                    self._cv.notify_all()
            if self._step_delay_s:
                time.sleep(self._step_delay_s)

    def info(self) -> dict:
        e = self.engine
        return {"name": self.name, "max_model_len": e.max_model_len, "vocab_size": e.vocab_size,
                "block_size": e.block_manager.block_size, "num_blocks": e.block_manager.num_blocks,
                "model": e.model_config.name}

    def add(self, prompt_token_ids: list[int], params: SamplingParams, req_id: str, priority: int = 0,
            hold_after_prefill: bool = False) -> None:
        """Queue a request. With ``hold_after_prefill`` (a prefill instance) the request is parked
        after its first token until :meth:`take_handoff` moves it to a decode instance."""
        with self._cv:
            self.engine.add(prompt_token_ids, params, req_id=req_id, priority=priority)
            if hold_after_prefill:
                self._hold.add(req_id)
            self._cv.notify_all()

    def take_handoff(self, req_id: str) -> RequestState:
        """The parked state of a prefilled request (its KV stays here until release / restore)."""
        with self._cv:
            return self._handoffs.pop(req_id)

    def abort(self, req_id: str) -> bool:
        with self._cv:
            self._hold.discard(req_id)
            if self._handoffs.pop(req_id, None) is not None:
                self.engine.release(req_id)
                return True
            return self.engine.abort(req_id)

    def poll(self, timeout: float = 0.05) -> tuple[list[RequestOutput], InstanceLoad]:
        """Outputs produced since the last poll (waiting up to ``timeout`` for some) and the load."""
        with self._cv:
            if not self._outputs:
                self._cv.wait(timeout)
            outs, self._outputs = self._outputs, []
            return outs, self.engine.load()

    def load(self) -> InstanceLoad:
        with self._cv:
            return self.engine.load()

    def running(self) -> list[tuple[str, int, int]]:
        """(request id, priority, tokens) of the running requests, for migration policies."""
        with self._cv:
            return [(r.req_id, r.priority, r.num_tokens) for r in self.engine.scheduler.running]

    # ---- migration (see shoal.cluster.migration) ----------------------------------------------

    def read_blocks(self, req_id: str, start_block: int):
        with self._cv:
            return self.engine.read_blocks(req_id, start_block)

    def export(self, req_id: str, from_block: int, release: bool) -> tuple[RequestState, list[RequestOutput]]:
        """Suspend or remove a request; also hand over its outputs not yet polled, so the client
        sees them before anything the destination produces."""
        with self._cv:
            state = self.engine.export(req_id, from_block, release)
            mine = [o for o in self._outputs if o.req_id == req_id]
            self._outputs = [o for o in self._outputs if o.req_id != req_id]
            return state, mine

    def release(self, req_id: str) -> None:
        with self._cv:
            self.engine.release(req_id)

    def restore(self, req_id: str) -> None:
        with self._cv:
            self.engine.restore(req_id)
            self._cv.notify_all()

    def stage_kv(self, req_id: str, kv: torch.Tensor, start_block: int) -> None:
        with self._cv:
            self.engine.stage_kv(req_id, kv, start_block)
        self._maybe_fail("stage_kv")  # after the write: the caller cannot know what landed

    def unstage(self, req_id: str) -> None:
        with self._cv:
            self.engine.unstage(req_id)

    def import_(self, state: RequestState) -> None:
        self._maybe_fail("import_")
        with self._cv:
            self.engine.import_(state)
            self._cv.notify_all()

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
        with self._cv:
            self.engine.block_manager.check()
            return {"used": self.engine.block_manager.num_used, "requests": len(self.engine.requests)}

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
