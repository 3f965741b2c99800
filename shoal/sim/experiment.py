"""One simulated cluster set-up, run on any workload into the result JSON of ``shoal bench serve``.

``shoal sim`` and its capacity search (and the benchmarks) describe a cluster once, as a
:class:`SimSetup`, and run it at as many time scales as they like; each run gets fresh policy
objects, so no state leaks from one run into the next.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from shoal.bench import report
from shoal.bench.agent import AgentWorkload, program_summary
from shoal.bench.report import RequestRecord
from shoal.bench.workloads import Workload
from shoal.control.policies import DEFAULT_MIGRATION, make_dispatch_policy, make_migration_policy
from shoal.engine.metadata import SLO
from shoal.engine.cost_model import CostModel, ScaledCostModel
from shoal.engine.programs import ProgramConfig
from shoal.engine.scheduler import SCHEDULING_POLICIES
from shoal.progress import Progress
from shoal.sim.simulator import Cluster, InstanceSpec
from shoal.sim.transfer import Link, summarize_transfers


def parse_speeds(text: str | None, instances: int) -> list[float]:
    """``"8x1,8x0.5"`` or ``"1,1,0.5"`` -> one speed per instance (``None``: all 1.0)."""
    if not text:
        return [1.0] * instances
    speeds: list[float] = []
    for part in text.split(","):
        count, _, speed = part.strip().rpartition("x")
        try:
            n, v = int(count) if count else 1, float(speed)
        except ValueError:
            raise ValueError(f"bad speed {part!r}: write N x SPEED like 8x0.5, or SPEED") from None
        if n < 1 or not v > 0:
            raise ValueError(f"bad speed {part!r}: counts and speeds must be positive")
        speeds += [v] * n
    if len(speeds) != instances:
        raise ValueError(f"--speeds names {len(speeds)} instances but --instances is {instances}")
    return speeds


@dataclass(frozen=True)
class SimSetup:
    cost_model: CostModel
    speeds: list[float]
    dispatch: str
    migration: str = DEFAULT_MIGRATION
    roles: list[str] | None = None
    slo: SLO = SLO(1.0, 0.1)
    slo_steps: bool = False  # size each step from the TPOT SLO (Sarathi-Serve) instead of a fixed budget only
    deadlines: bool = False  # admit requests within the TTFT SLO before late ones
    scheduling_policy: str = "vtc"  # fcfs | priority | vtc (SchedulerConfig.policy)
    fair_preempt_tokens: float | None = 2048  # SchedulerConfig.fair_preempt_tokens
    urgent_slack_s: float | None = None  # SchedulerConfig.urgent_slack_s (deadline admission)
    resident_swap: bool = True  # SchedulerConfig.resident_swap
    fair_first_token: bool = True  # SchedulerConfig.fair_first_token
    fair_prefill_tokens: int | None = None  # SchedulerConfig.fair_prefill_tokens
    fair_prefill_stretch: float | None = None  # SchedulerConfig.fair_prefill_stretch
    programs: ProgramConfig = ProgramConfig()  # SchedulerConfig.programs
    num_blocks: int = 2800
    num_tier_blocks: int = 0  # the second KV tier per instance (0: none)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    link_gbps: float = 10.0
    link_latency_ms: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError for names no policy has."""
        make_dispatch_policy(self.dispatch, {0: self.specs()[0].profile}, self.slo)
        make_migration_policy(self.migration)
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"--scheduling-policy is one of {', '.join(SCHEDULING_POLICIES)}")

    def specs(self) -> list[InstanceSpec]:
        base = InstanceSpec(self.cost_model, num_blocks=self.num_blocks, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            step_time_limit_s=self.slo.tpot_s if self.slo_steps else None,
                            admission="deadline" if self.deadlines else "fcfs",
                            scheduling_policy=self.scheduling_policy, fair_preempt_tokens=self.fair_preempt_tokens,
                            urgent_slack_s=self.urgent_slack_s, resident_swap=self.resident_swap,
                            fair_first_token=self.fair_first_token, fair_prefill_tokens=self.fair_prefill_tokens,
                            fair_prefill_stretch=self.fair_prefill_stretch, programs=self.programs,
                            num_tier_blocks=self.num_tier_blocks)
        return [base if v == 1.0 else replace(base, cost_model=ScaledCostModel(self.cost_model, v)) for v in self.speeds]

    def cluster(self, workload: Workload | AgentWorkload, progress: Progress | None = None) -> Cluster:
        """A simulated cluster of this set-up, not yet run (the gateway's simulator steps it and adds
        arrivals as they come); ``progress`` hears of each request ended."""
        return Cluster(workload, self.specs(), self.dispatch, self.seed, migration=make_migration_policy(self.migration),
                       roles=self.roles, link=Link(self.link_gbps, self.link_latency_ms / 1e3), slo=self.slo,
                       progress=progress)

    def run(self, workload: Workload | AgentWorkload,
            progress: Progress | None = None) -> tuple[dict, list[RequestRecord]]:
        """Simulate ``workload`` (``progress`` hears of each request ended); the result JSON and the records."""
        specs = self.specs()
        t = time.perf_counter()
        run = self.cluster(workload, progress)
        run.run()
        records, sims, duration = run.records, run.sims, run.duration
        wall = time.perf_counter() - t
        model = getattr(self.cost_model, "model", "unknown")
        result = report.summarize(records, workload.description, self.slo.ttft_s * 1e3, self.slo.tpot_s * 1e3,
                                  duration_s=duration, extra={
            "simulated": True, "instances": len(specs), "policy": self.dispatch, "migration": self.migration,
            "roles": self.roles, "speeds": self.speeds, "token_budget": "slo" if self.slo_steps else "fixed",
            "admission": "deadline" if self.deadlines else "fcfs", "scheduling_policy": self.scheduling_policy,
            "fair_prefill_tokens": self.fair_prefill_tokens, "fair_prefill_stretch": self.fair_prefill_stretch,
            "link": {"gbps": self.link_gbps, "latency_ms": self.link_latency_ms,
                     "kv_bytes_per_block": specs[0].kv_bytes_per_block},
            **summarize_transfers([tr for s in sims for tr in s.transfers]),
            "migrations_declined": run.scheduler.declined,
            "preemptions": sum(s.engine.scheduler.num_preemptions for s in sims),
            "swapped_out_bytes": sum(s.engine.scheduler.num_swapped_out_blocks for s in sims) * specs[0].kv_bytes_per_block,
            "prefix_cache": {"query_tokens": sum(s.engine.block_manager.prefix_queries for s in sims),
                             "hit_tokens": sum(s.engine.block_manager.prefix_hits for s in sims)},
            "kv_tier": tier_stats(sims, self.num_tier_blocks),
            "cost_model": {"device": getattr(self.cost_model, "device", "unknown"), "model": model},
            "sim_wall_s": wall})
        if isinstance(workload, AgentWorkload):
            result["programs"] = {**program_summary(workload, records), "scheduling": self.programs.scheduling,
                                  **pin_stats(sims)}
        return result, records


def tier_stats(sims, blocks_per_instance: int) -> dict:
    """The instances' second KV tiers: size, blocks demoted into them and loaded back, summed."""
    tiers = [s.engine.block_manager.tier for s in sims if s.engine.block_manager.tier is not None]
    return {"blocks_per_instance": blocks_per_instance, "demoted_blocks": sum(t.demoted_blocks for t in tiers),
            "loaded_blocks": sum(t.loaded_blocks for t in tiers)}


def pin_stats(sims) -> dict:
    """The engines' program pins, summed (:class:`ProgramStats`)."""
    totals = {"pins": 0, "pin_hits": 0, "expired": 0, "yielded": 0, "displaced": 0}
    for sim in sims:
        for key in totals:
            totals[key] += getattr(sim.engine.scheduler.programs.stats, key)
    return totals
