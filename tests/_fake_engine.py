"""An engine core without a model, for the engine loop's and engine process's protocol tests: the
simulator's cost-model executor, each step also taking ``step_s`` of real time (so that a test can
act while requests are in flight). Module-level, so an engine process can build it."""

from __future__ import annotations

import time

from shoal.engine.block_manager import BlockManager
from shoal.engine.core import EngineCore
from shoal.engine.cost_model import LinearCostModel, default_profile_path
from shoal.engine.scheduler import SchedulerConfig
from shoal.sim.simulator import CostModelExecutor, VirtualClock


class PacedExecutor(CostModelExecutor):
    def __init__(self, step_s: float) -> None:
        super().__init__(LinearCostModel.load(default_profile_path()), VirtualClock(), token_id=7)
        self.step_s = step_s

    def execute(self, plan, states):
        time.sleep(self.step_s)
        return super().execute(plan, states)


def fake_engine_core(step_s: float = 0.01, max_num_seqs: int = 4, vocab_size: int = 100) -> EngineCore:
    executor = PacedExecutor(step_s)
    return EngineCore(executor, BlockManager(256, 16, 64), SchedulerConfig(max_num_seqs=max_num_seqs),
                      max_model_len=128, vocab_size=vocab_size, clock=executor.clock)
