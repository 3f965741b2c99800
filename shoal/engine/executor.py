"""What runs a step plan: the model on a device, or (in the simulator) a cost model."""

from __future__ import annotations

from typing import Protocol

import torch

from shoal.engine.model_runner import KVCache, ModelRunner
from shoal.engine.sampler import Sampler, SampleResult, SamplingState
from shoal.engine.scheduler import StepPlan
from shoal.engine.spec_verify import verify


class Executor(Protocol):
    def execute(self, plan: StepPlan, states: list[SamplingState]) -> SampleResult:
        """Run the plan; return one sampled token per chunk with ``sample=True``, in order (and, for
        chunks with drafts, how many of those were accepted)."""
        ...

    def read_kv(self, block_ids: list[int], swapped: bool = False) -> torch.Tensor:
        """KV of these blocks as one CPU tensor (see :class:`KVCache`)."""
        ...

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None: ...

    def copy_tier(self, copies_out: list[tuple[int, int]], copies_in: list[tuple[int, int]]) -> None:
        """Run second-tier copies outside a step: demotions (device block, slot), then loads (slot,
        device block). In a step they come with the plan."""
        ...

    def reset(self) -> None:
        """Forget whatever is carried from step to step (the engine starts over)."""
        ...


class ModelExecutor:
    """The real thing: a forward pass on the device, then the sampler."""

    def __init__(self, runner: ModelRunner, sampler: Sampler) -> None:
        self.runner = runner
        self.sampler = sampler

    @property
    def kv(self) -> KVCache:
        return self.runner.kv

    def execute(self, plan: StepPlan, states: list[SamplingState]) -> SampleResult:
        logits = self.runner.execute(plan)
        sampled = [c for c in plan.chunks if c.sample]
        if any(c.num_drafts for c in sampled):
            return verify(self.sampler, logits, states, sampled)
        return self.sampler(logits, states)

    def read_kv(self, block_ids: list[int], swapped: bool = False) -> torch.Tensor:
        return self.runner.kv.read(block_ids, swapped)

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        self.runner.kv.write(block_ids, data)

    def copy_tier(self, copies_out: list[tuple[int, int]], copies_in: list[tuple[int, int]]) -> None:
        self.runner.kv.tier_copies(copies_out, copies_in)

    def reset(self) -> None:
        self.runner.kv.version += 1  # the carried decode K/V buffer no longer matches
