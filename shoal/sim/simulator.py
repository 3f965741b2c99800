"""Discrete-event simulation of a cluster of engines on a virtual clock.

Each simulated instance is a real :class:`EngineCore` — the same scheduler, block manager,
preemption policy and request bookkeeping as a real engine — whose executor predicts the step's
duration with a cost model instead of running the model. Dispatch uses the cluster's policy
objects. The result is the same JSON as ``shoal bench serve``.

Simplification: an instance's step is applied when it starts (its outputs carry the step's end
time), so a dispatch decision made during a step sees that step's effect on load a little early.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from shoal.bench.report import RequestRecord
from shoal.bench.workloads import Workload
from shoal.cluster.policies import DispatchPolicy, DispatchRequest
from shoal.engine.block_manager import BlockManager
from shoal.engine.core import EngineCore
from shoal.engine.sampler import SampleResult, SamplingState
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import SchedulerConfig, StepPlan
from shoal.sim.cost_model import CostModel
from shoal.sim.fast_forward import advance, steady_decode_steps, step_times


class VirtualClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class CostModelExecutor:
    """Executes a plan by advancing the virtual clock by the cost model's step time. Every sampled
    token is ``token_id`` (the simulator runs with ``ignore_eos``, so values do not matter)."""

    def __init__(self, cost_model: CostModel, clock: VirtualClock, token_id: int = 0) -> None:
        self.cost_model = cost_model
        self.clock = clock
        self.token_id = token_id
        self.busy_s = 0.0

    def execute(self, plan: StepPlan, states: list[SamplingState]) -> SampleResult:
        dt = self.cost_model.step_time(plan)
        self.clock.t += dt
        self.busy_s += dt
        return SampleResult(token_ids=[self.token_id] * len(states), logprobs=[None] * len(states))

    def read_kv(self, block_ids: list[int], swapped: bool = False) -> torch.Tensor:
        return torch.empty((2, 0, 0, len(block_ids), 0, 0), device="meta")  # shape only: no memory

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        if data.shape[3] != len(block_ids):
            raise ValueError("KV block count mismatch")


@dataclass
class InstanceSpec:
    """Shape of one simulated instance."""

    cost_model: CostModel
    num_blocks: int = 4096
    block_size: int = 16
    num_swap_blocks: int = 4096
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    vocab_size: int = 49152


class SimInstance:
    """One engine on its own virtual clock."""

    def __init__(self, spec: InstanceSpec) -> None:
        self.clock = VirtualClock()
        self.executor = CostModelExecutor(spec.cost_model, self.clock)
        self.engine = EngineCore(
            self.executor,
            BlockManager(spec.num_blocks, spec.block_size, spec.num_swap_blocks),
            SchedulerConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens),
            max_model_len=spec.max_model_len,
            vocab_size=spec.vocab_size,
            clock=self.clock,
        )


def simulate(
    workload: Workload,
    instances: list[InstanceSpec],
    dispatch: DispatchPolicy,
    seed: int = 0,
    fast_forward: bool = True,
) -> tuple[list[RequestRecord], float, list[SimInstance]]:
    """Run the workload to completion. Returns per-request records, the simulated duration and
    the instances (for their statistics). ``fast_forward`` applies runs of forced decode steps at
    once (same result, much faster)."""
    sims = [SimInstance(spec) for spec in instances]
    gen = torch.Generator().manual_seed(seed)
    arrivals = workload.requests
    records = [RequestRecord(r.arrival_s, r.prompt_len, r.output_len, start_s=r.arrival_s) for r in arrivals]
    by_id: dict[str, RequestRecord] = {}
    free_events: list[tuple[float, int, int]] = []  # (time, order, instance): an instance finished a step
    order = 0
    busy = [False] * len(sims)
    vocab = instances[0].vocab_size
    now = 0.0
    ai = 0  # next arrival

    def finish_at(i: int, end: float) -> None:
        nonlocal order
        busy[i] = True
        order += 1
        heapq.heappush(free_events, (end, order, i))

    def start_step(i: int) -> None:
        sim = sims[i]
        sim.clock.t = max(sim.clock.t, now)
        horizon = arrivals[ai].arrival_s if ai < len(arrivals) else float("inf")
        k = steady_decode_steps(sim.engine, 1 << 30) if fast_forward else 0
        if k > 1:
            times, t = [], sim.clock.t
            for dt in step_times(sim.engine, sim.executor.cost_model, k):
                if t >= horizon:
                    break
                t += dt
                times.append(t)
            if len(times) > 1:
                sim.executor.busy_s += t - sim.clock.t
                sim.clock.t = t
                for rid in advance(sim.engine, len(times), sim.executor.token_id, times):
                    by_id[rid].token_times_s.extend(times)
                finish_at(i, t)
                return
        outputs = sim.engine.step()
        end = sim.clock.t
        if sim.engine.last_plan is None or sim.engine.last_plan.empty:
            return  # nothing could run: wait for the next event instead of spinning
        for out in outputs:
            rec = by_id[out.req_id]
            if out.new_token_ids:
                if rec.first_token_s is None:
                    rec.first_token_s = end
                rec.token_times_s.append(end)
            if out.finished:
                rec.end_s = end
                rec.output_tokens = out.num_output_tokens
                if out.error:
                    rec.error = out.error
        finish_at(i, end)

    while ai < len(arrivals) or free_events:
        if ai < len(arrivals) and (not free_events or arrivals[ai].arrival_s <= free_events[0][0]):
            idx = ai
            ai += 1
            spec = arrivals[idx]
            now = spec.arrival_s
            prompt = torch.randint(1, vocab, (spec.prompt_len,), generator=gen).tolist()
            loads = [s.engine.load() for s in sims]
            rid = f"r{idx}"
            target = dispatch.choose(loads, DispatchRequest(rid, prompt))
            by_id[rid] = records[idx]
            params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
            try:
                sims[target].engine.add(prompt, params, req_id=rid, arrival_time=now)
            except ValueError as exc:
                records[idx].error = str(exc)
                continue
            if not busy[target]:
                start_step(target)
        else:
            now, _, i = heapq.heappop(free_events)
            busy[i] = False
            if sims[i].engine.has_unfinished():
                start_step(i)
    duration = max((r.end_s for r in records if r.end_s is not None), default=0.0)
    return records, duration, sims
