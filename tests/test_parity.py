"""Parity: what the simulator shows is what the cluster decides.

A 240-request workload (12 req/s on 4 small instances) runs in the simulator (4 instances, predicted-latency dispatch, Llumnix
migration) while every call into its GlobalScheduler is recorded: each load snapshot handed in,
each dispatch and each migration plan. The very same stream of snapshots is then fed to the real
``ClusterEngine``'s own code — its pump's ``observe``, its ``_dispatch`` and its ``_control_once``
— with stand-in actor handles (no Ray), and it must decide exactly the same: the same instance
for every request and the same migrations at every control tick.
"""

from __future__ import annotations

import asyncio
import random
import types

import pytest

from shoal.bench.workloads import RequestSpec, Workload
from shoal.cluster.cluster import ClusterEngine, Member, Tracked
from shoal.control.global_scheduler import GlobalScheduler
from shoal.control.policies import LlumnixMigration
from shoal.engine.config import EngineConfig
from shoal.engine.cost_model import FEATURES, LinearCostModel
from shoal.engine.metadata import SLO
from shoal.engine.sampling_params import SamplingParams
from shoal.sim import simulator
from shoal.sim.simulator import InstanceSpec


class Recording(GlobalScheduler):
    """The simulator's scheduler, keeping a log of what it saw and decided."""

    log: list = []

    def observe(self, instance_id, load):
        self.log.append(("observe", instance_id, load))
        super().observe(instance_id, load)

    def dispatch(self, request):
        chosen = super().dispatch(request)
        self.log.append(("dispatch", request, chosen))
        return chosen

    def migration_plan(self, exclude=()):
        plan = super().migration_plan(exclude)
        self.log.append(("plan", frozenset(exclude), plan))
        return plan


class StandIn:
    """An actor handle whose every method answers at once (the decisions are all that is tested)."""

    def __getattr__(self, name):
        async def answer(*args):
            return None

        return types.SimpleNamespace(remote=answer)


def workload() -> Workload:
    rng = random.Random(7)
    reqs, t = [], 0.0
    for _ in range(240):
        t += rng.expovariate(12.0)
        reqs.append(RequestSpec(t, rng.randrange(16, 400), rng.randrange(4, 120)))
    return Workload("parity", reqs, {"kind": "parity"})


def cost() -> LinearCostModel:
    coef = dict.fromkeys(FEATURES, 0.0)
    coef.update(intercept=0.01, tokens=0.0005, decode_context=2e-6)
    return LinearCostModel([coef[f] for f in FEATURES])


def test_the_cluster_decides_as_the_simulator_on_the_same_snapshots(monkeypatch):
    Recording.log = []
    monkeypatch.setattr(simulator, "GlobalScheduler", Recording)
    spec = InstanceSpec(cost(), num_blocks=60, max_num_seqs=16)  # scarce KV: Llumnix relieves and rebalances
    slo = SLO(1.0, 0.05)
    simulator.simulate(workload(), [spec] * 4, "predicted_latency", migration=LlumnixMigration(), slo=slo)
    log = Recording.log
    dispatches = [e for e in log if e[0] == "dispatch"]
    plans = [e for e in log if e[0] == "plan"]
    assert len(dispatches) == 240 and any(e[2] for e in plans)  # migrations did happen

    async def replay() -> tuple[list[int], list[list]]:
        cluster = ClusterEngine(EngineConfig(), 4, "predicted_latency", migration=LlumnixMigration(), slo=slo)
        for i in range(4):
            cluster.members[i] = Member(i, StandIn(), "both")
            cluster.scheduler.add_instance(i, "both", spec_load(), spec.profile)
        chosen, planned = [], []

        async def record_migration(req_id, dst_id, reason="manual", staged=True):
            planned[-1].append((req_id, dst_id, reason))
            return False

        cluster.migrate = record_migration
        params = SamplingParams(max_tokens=8)
        for kind, *rest in log:
            if kind == "observe":  # what each instance's pump hands in after a step
                cluster.scheduler.observe(*rest)
            elif kind == "dispatch":
                request, _ = rest
                tracked = Tracked(request.req_id, list(request.prompt_token_ids), params, request.metadata, -1,
                                  asyncio.Queue())
                await cluster._dispatch(tracked)
                chosen.append(tracked.member)
            else:
                moving, _ = rest
                for t in cluster.requests.values():
                    t.migrating = t.req_id in moving
                planned.append([])
                await cluster._control_once(ticks=1)
                await asyncio.sleep(0)  # let the migration tasks it started record themselves
        return chosen, planned

    def spec_load():
        return next(e[2] for e in log if e[0] == "observe" and e[1] == 0)

    chosen, planned = asyncio.run(replay())
    assert chosen == [e[2] for e in dispatches]
    assert planned == [[(m.req_id, m.dst, m.reason) for m in e[2]] for e in plans]


@pytest.mark.parametrize("policy", ["round_robin", "least_load"])
def test_parity_holds_for_the_simpler_policies_too(monkeypatch, policy):
    Recording.log = []
    monkeypatch.setattr(simulator, "GlobalScheduler", Recording)
    spec = InstanceSpec(cost(), num_blocks=120, max_num_seqs=16)
    simulator.simulate(workload(), [spec] * 3, policy)
    sim_choices = [e[2] for e in Recording.log if e[0] == "dispatch"]

    async def replay() -> list[int]:
        cluster = ClusterEngine(EngineConfig(), 3, policy)
        first = next(e[2] for e in Recording.log if e[0] == "observe")
        for i in range(3):
            cluster.members[i] = Member(i, StandIn(), "both")
            cluster.scheduler.add_instance(i, "both", first)
        out = []
        for kind, *rest in Recording.log:
            if kind == "observe":
                cluster.scheduler.observe(*rest)
            elif kind == "dispatch":
                request = rest[0]
                tracked = Tracked(request.req_id, list(request.prompt_token_ids), SamplingParams(), request.metadata,
                                  -1, asyncio.Queue())
                await cluster._dispatch(tracked)
                out.append(tracked.member)
        return out

    assert asyncio.run(replay()) == sim_choices
