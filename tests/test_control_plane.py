"""The control plane's new decisions: the latency predictor (against hand-computed cost-model
values), predicted-latency dispatch, SLO-sized steps, deadline admission, the capacity search,
heterogeneous fleets, and request metadata through the engine, a migration and the simulator."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from prometheus_client import CollectorRegistry

from shoal.bench.workloads import RequestSpec, Workload
from shoal.control import policies
from shoal.control.global_scheduler import GlobalScheduler
from shoal.control.predictor import InstanceProfile, LatencyPredictor
from shoal.engine.block_manager import BlockManager
from shoal.engine.core import EngineCore
from shoal.engine.cost_model import FEATURES, LinearCostModel, ScaledCostModel, plan_features
from shoal.engine.metadata import SLO, RequestMetadata
from shoal.engine.outputs import InstanceLoad, RunningRequest
from shoal.engine.request import Request
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig, ScheduledChunk, StepPlan
from shoal.engine.step_budget import StepTimeBudget
from shoal.sim.capacity import find_capacity
from shoal.sim.experiment import SimSetup, parse_speeds
from shoal.sim.simulator import CostModelExecutor, InstanceSpec, VirtualClock, simulate


def linear(intercept=0.0, tokens=0.0, decodes=0.0, ctx=0.0, attn=0.0, chunks=0.0, span=0.0) -> LinearCostModel:
    coef = dict.fromkeys(FEATURES, 0.0)
    coef.update(intercept=intercept, tokens=tokens, decodes=decodes, decode_context=ctx, prefill_attention=attn,
                prefill_chunks=chunks, decode_span=span)
    return LinearCostModel([coef[f] for f in FEATURES])


def load(free=100, running=0, waiting=0, waiting_tokens=0, in_flight=0, total=128) -> InstanceLoad:
    return InstanceLoad(num_running=running, num_waiting=waiting, num_swapped=0, num_total_blocks=total,
                        num_free_blocks=free, num_used_blocks=total - free, num_cached_blocks=0,
                        num_pinned_blocks=0, block_size=16, tokens_in_flight=in_flight,
                        waiting_prompt_tokens=waiting_tokens, num_preemptions=0, max_num_seqs=16)


# ---- the predictor ------------------------------------------------------------------------------


def test_ttft_and_tpot_by_hand():
    """10 ms a step + 1 ms a token; 4 decoding at context 400 in total; 300 tokens queued ahead;
    a 200-token prompt; budget 104 tokens a step -> chunks of 100 prefill tokens."""
    cm = linear(intercept=0.010, tokens=0.001)
    profile = InstanceProfile(cm, max_num_batched_tokens=104)
    pred = LatencyPredictor(expected_output_tokens=100).predict(
        profile, load(running=4, waiting_tokens=300, in_flight=400), prompt_len=200)
    step = 0.010 + 0.001 * (4 + 100)  # decodes + one full chunk
    assert pred.ttft_s == pytest.approx(math.ceil(500 / 100) * step)  # 5 steps for 300 + 200 tokens
    decode_only = 0.010 + 0.001 * 4
    joined = 0.010 + 0.001 * 5
    assert pred.tpot_s == pytest.approx(joined + 5 * (step - decode_only) / 100)


def test_tpot_prices_the_running_batch_padded_to_its_longest_request():
    """A profile that prices decode attention on the span (decodes x the longest context) predicts
    a batch by its longest request, from the snapshot's running batch: 3 of 100 tokens and one of
    900, and a 200-token newcomer -> 5 decodes padded to 900 when it joins."""
    cm = linear(intercept=0.010, span=1e-5)
    batch = tuple(RunningRequest(str(i), 0, n) for i, n in enumerate((100, 100, 100, 900)))
    busy = dataclasses.replace(load(running=4, in_flight=1200), running=batch)
    pred = LatencyPredictor().predict(InstanceProfile(cm), busy, prompt_len=200)
    assert pred.tpot_s == pytest.approx(0.010 + 1e-5 * 5 * 900)
    even = dataclasses.replace(busy, running=tuple(RunningRequest(str(i), 0, 300) for i in range(4)))  # the same tokens
    assert LatencyPredictor().predict(InstanceProfile(cm), even, prompt_len=200).tpot_s == pytest.approx(
        0.010 + 1e-5 * 5 * 300)


def test_prefix_hits_and_speed_shorten_and_lengthen_the_prediction():
    cm = linear(intercept=0.010, tokens=0.001)
    p = LatencyPredictor()
    fast, slow = InstanceProfile(cm), InstanceProfile(ScaledCostModel(cm, 0.5))
    idle = load()
    cold = p.predict(fast, idle, 480)
    assert p.predict(fast, idle, 480, cached=320).ttft_s < cold.ttft_s
    assert p.predict(slow, idle, 480).ttft_s == pytest.approx(2 * cold.ttft_s)


def test_a_kv_shortfall_adds_a_wait():
    cm = linear(intercept=0.010, tokens=0.001)
    p, profile = LatencyPredictor(), InstanceProfile(cm)
    roomy = p.predict(profile, load(free=100, running=4, in_flight=1024), 160)
    full = p.predict(profile, load(free=2, running=4, in_flight=1024), 160)
    assert full.ttft_s > roomy.ttft_s and full.tpot_s == pytest.approx(roomy.tpot_s)


def test_predicted_dispatch_prefers_the_faster_instance_and_never_a_gone_one():
    cm = linear(intercept=0.010, tokens=0.001)
    profiles = {0: InstanceProfile(ScaledCostModel(cm, 0.25)), 1: InstanceProfile(cm)}
    policy = policies.make_dispatch_policy("predicted_latency", profiles, SLO(0.5, 0.05))
    gs = GlobalScheduler(policy, profiles=profiles)
    for i in (0, 1):
        gs.add_instance(i, "both", load())
    prompt = list(range(300))  # 0.31 s on instance 1, 1.24 s (past the SLO) on instance 0
    assert gs.dispatch(policies.DispatchRequest("a", prompt)) == 1
    gs.remove_instance(1)
    assert 1 not in profiles  # the policy reads the scheduler's own mapping
    assert gs.dispatch(policies.DispatchRequest("b", prompt)) == 0  # misses the SLO, but is all there is


def test_predicted_dispatch_keeps_a_prefix_where_it_is_cached_until_that_instance_goes():
    cm = linear(intercept=0.010, tokens=0.001)
    profiles = {i: InstanceProfile(cm) for i in range(3)}
    policy = policies.make_dispatch_policy("predicted_latency", profiles)
    loads = {i: load() for i in range(3)}
    prefix = list(range(256))
    home = policy.choose(loads, policies.DispatchRequest("a", prefix + [1]))
    loads[home] = load(free=90)  # a little busier now, but holds the prefix
    assert policy.choose(loads, policies.DispatchRequest("b", prefix + [2])) == home
    del loads[home]  # it died or drains: the next pick is another live instance
    assert policy.choose(loads, policies.DispatchRequest("c", prefix + [3])) in loads


def test_a_session_turn_that_meets_its_slo_nowhere_stays_with_its_kv():
    """Past the SLO everywhere, a session's next turn stays where its history is cached (a move
    would recompute it); it moves when another instance meets the SLO."""
    from shoal.engine.metadata import RequestMetadata

    cm = linear(intercept=0.010, tokens=0.001)
    profiles = {i: InstanceProfile(cm) for i in range(2)}
    policy = policies.make_dispatch_policy("predicted_latency", profiles, SLO(1e-3, 1e-3))  # met nowhere
    loads = {i: load() for i in range(2)}
    history = list(range(256))
    home = policy.choose(loads, policies.DispatchRequest("t0", history, RequestMetadata(session_id="p")))
    loads[home] = load(free=0, running=16, in_flight=1 << 20)  # much busier now
    turn = history + [7] * 32
    assert policy.choose(loads, policies.DispatchRequest("t1", turn, RequestMetadata(session_id="p"))) == home
    roomy = policies.make_dispatch_policy("predicted_latency", profiles, SLO(0.5, 0.015))  # met off home
    roomy.memory = policy.memory
    assert roomy.choose(loads, policies.DispatchRequest("t2", turn, RequestMetadata(session_id="p"))) != home


def test_predicted_latency_needs_profiles():
    with pytest.raises(ValueError, match="profiles"):
        policies.make_dispatch_policy("predicted_latency")


# ---- migrations gated by predicted benefit ------------------------------------------------------

GATE_SLO = SLO(1.0, 0.1)


def gated_scheduler(src: InstanceLoad, dst: InstanceLoad, cm, migration: str = "llumnix") -> GlobalScheduler:
    gs = GlobalScheduler(policies.LeastLoad(), policies.make_migration_policy(migration), slo=GATE_SLO)
    for i, l in enumerate((src, dst)):
        gs.add_instance(i, "both", l, InstanceProfile(cm, max_num_batched_tokens=104))
    return gs


def batch(n: int, tokens: int) -> tuple[policies.RunningRequest, ...]:
    return tuple(policies.RunningRequest(f"r{k}", 0, tokens) for k in range(n))


def with_batch(l: InstanceLoad, reqs) -> InstanceLoad:
    return dataclasses.replace(l, running=reqs, num_running=len(reqs), tokens_in_flight=sum(r.num_tokens for r in reqs))


def test_a_rebalance_between_instances_that_both_meet_the_slo_is_declined():
    """Llumnix's rule sees an imbalance (a queue beside an idle instance, freeness 0.6 vs 100); the
    predictor sees both meet the SLO (10 ms + 1 ms a token: the queued 228 tokens take 3 steps of
    113 ms), so the move could only cost a copy. Ungated, it is made."""
    cm = linear(intercept=0.010, tokens=0.001)
    src = with_batch(load(free=10, waiting=1, waiting_tokens=100), batch(3, 100))
    assert gated_scheduler(src, load(), cm, "llumnix_ungated").migration_plan()[0].reason == "rebalance"
    gs = gated_scheduler(src, load(), cm)
    assert gs.migration_plan() == []
    assert gs.declined == {"rebalance": {"slo_met": 1}}
    from shoal.cluster.cluster import ClusterMetrics  # the cluster's /metrics reads the same counts

    registry = CollectorRegistry()
    ClusterMetrics(registry, gs)
    assert registry.get_sample_value("shoal:migrations_declined_total", {"reason": "rebalance", "why": "slo_met"}) == 1
    gs.migration_plan()
    assert registry.get_sample_value("shoal:migrations_declined_total", {"reason": "rebalance", "why": "slo_met"}) == 2


def test_a_move_off_an_instance_whose_decodes_miss_the_tpot_slo_is_kept():
    """0.1 ms a token of decode context: three 2,000-token requests make a 613 ms decode step
    there (TPOT 6x the SLO); moving one leaves 412 ms there and 222 ms on the idle instance."""
    cm = linear(intercept=0.010, tokens=0.001, ctx=0.0001)
    src = with_batch(load(free=10, waiting=1, waiting_tokens=100, total=400), batch(3, 2000))
    gs = gated_scheduler(src, load(free=400, total=400), cm)
    assert [(m.req_id, m.src, m.dst) for m in gs.migration_plan()] == [("r0", 0, 1)]
    assert gs.declined == {}


def test_a_drain_is_always_kept_and_a_relief_into_a_worse_instance_is_not():
    cm = linear(intercept=0.010, tokens=0.001, ctx=0.0001)
    src = with_batch(load(free=10, waiting=1, waiting_tokens=100), batch(3, 100))
    gs = gated_scheduler(src, load(), cm)
    gs.set_draining(0)
    assert [m.reason for m in gs.migration_plan()] == ["drain", "drain"]  # two a round; all meet the SLO
    # the source is about to preempt (1 free block for 3 decodes), but the destination already
    # decodes 9,000 tokens of context (925 ms a step): moving a 2,000-token request there makes it worse
    src = with_batch(load(free=1, total=1000), batch(3, 2000))
    dst = with_batch(load(free=400, total=1000), batch(2, 4500))
    gs = gated_scheduler(src, dst, cm)
    assert gs.migration_plan() == []
    assert gs.declined == {"relieve": {"dst_would_miss": 1}}
    assert [m.reason for m in gated_scheduler(src, dst, cm, "llumnix_ungated").migration_plan()] == ["relieve"]


def test_a_prefilled_request_decodes_where_its_tpot_is_predicted_to_meet_the_slo():
    """0.1 ms a token of decode context: instance 2 has the most free blocks but decodes 8,000
    tokens (0.8 s a step); instance 1 has less room and meets the SLO. When every decode instance
    is predicted worse than the prefill instance itself, the request stays there."""
    cm = linear(intercept=0.010, tokens=0.001, ctx=0.0001)
    gs = GlobalScheduler(policies.LeastLoad(), slo=GATE_SLO)
    loads = [load(), with_batch(load(free=40), batch(1, 100)), with_batch(load(free=120, total=1000), batch(2, 4000))]
    for i, (role, l) in enumerate(zip(("prefill", "decode", "decode"), loads)):
        gs.add_instance(i, role, l, InstanceProfile(cm))
    assert gs.pd_destination(0, 300) == 1
    assert GlobalScheduler(policies.LeastLoad()).pd_destination() is None  # no decode instance at all
    gs.observe(1, with_batch(load(free=40, total=1000), batch(2, 4000)))
    assert gs.pd_destination(0, 300) is None and gs.declined == {"pd": {"no_gain": 1}}


# ---- SLO-sized steps ----------------------------------------------------------------------------


def chunk(rid, start, n, sample=True):
    return ScheduledChunk(rid, start, [0] * n, [], sample)


@pytest.mark.parametrize("seed", range(20))
def test_the_time_budget_never_lets_a_step_with_decodes_exceed_the_limit(seed):
    rng = random.Random(seed)
    cm = linear(intercept=0.015, tokens=0.000675, decodes=0.00047, ctx=3.4e-6, attn=4.8e-7, chunks=0.0048)
    budget = StepTimeBudget(cm, limit_s=0.2)
    plan = StepPlan([chunk(f"d{i}", rng.randrange(1, 2000), 1) for i in range(rng.randrange(1, 20))])
    for j in range(rng.randrange(1, 4)):
        start, want = rng.randrange(0, 3000), rng.randrange(2, 1024)
        n = budget.chunk_tokens(plan, start, want)
        assert 0 <= n <= want
        if n:
            plan.chunks.append(chunk(f"p{j}", start, n))
    first_chunk_alone = StepPlan([c for c in plan.chunks if c.num_tokens == 1] + plan.chunks[-1:])
    if cm.step_time(first_chunk_alone) > 0.2:  # only the progress guarantee may overrun
        assert sum(c.num_tokens > 1 for c in plan.chunks) == 1 and plan.chunks[-1].num_tokens <= budget.min_chunk
    else:
        assert cm.step_time(plan) <= 0.2 + 1e-9


def test_steps_without_decodes_are_not_limited_and_a_step_always_progresses():
    cm = linear(intercept=0.015, tokens=0.001)
    budget = StepTimeBudget(cm, limit_s=0.05, min_chunk=8)
    assert budget.chunk_tokens(StepPlan(), 0, 512) == 512  # nobody waits for a token
    heavy = StepPlan([chunk(f"d{i}", 10, 1) for i in range(40)])  # 55 ms of decodes alone
    assert budget.chunk_tokens(heavy, 0, 512) == 8
    light = StepPlan([chunk("d", 10, 1)])
    n = budget.chunk_tokens(light, 0, 512)
    assert cm.step_time(StepPlan(light.chunks + [chunk("p", 0, n)])) <= 0.05 < cm.step_time(
        StepPlan(light.chunks + [chunk("p", 0, n + 1)]))


def test_the_scheduler_cuts_prefill_chunks_to_the_time_budget():
    cm = linear(intercept=0.010, tokens=0.001)
    cfg = SchedulerConfig(max_num_batched_tokens=512, step_time_budget=StepTimeBudget(cm, 0.1))
    s = Scheduler(cfg, BlockManager(256, 16, 0))
    running = Request("run", list(range(1, 33)), SamplingParams(max_tokens=50), 0.0)
    s.add(running)
    plan = s.schedule(0.0)
    s.commit(plan, {"run": running})
    running.output_token_ids.append(1)
    long = Request("long", list(range(1, 1001)), SamplingParams(max_tokens=5), 1.0)
    s.add(long)
    plan = s.schedule(1.0)
    assert [c.num_tokens for c in plan.chunks] == [1, 89]  # 10 ms + 90 tokens x 1 ms = the limit
    assert cm.step_time(plan) <= 0.1 + 1e-9


# ---- deadline admission -------------------------------------------------------------------------


def test_deadline_admission_serves_requests_still_on_time_first():
    def admitted(admission: str) -> str:
        s = Scheduler(SchedulerConfig(max_num_seqs=1, admission=admission), BlockManager(64, 16, 0))
        late = Request("late", [1] * 20, SamplingParams(max_tokens=4), 0.0, deadline=1.0)
        fresh = Request("fresh", [2] * 20, SamplingParams(max_tokens=4), 4.0, deadline=9.0)
        s.add(late)
        s.add(fresh)
        return s.schedule(5.0).chunks[0].req_id

    assert admitted("fcfs") == "late"
    assert admitted("deadline") == "fresh"
    with pytest.raises(ValueError, match="admission"):
        SchedulerConfig(admission="edf")


# ---- metadata -----------------------------------------------------------------------------------


def sim_engine(admission="fcfs") -> EngineCore:
    clock = VirtualClock()
    return EngineCore(CostModelExecutor(linear(intercept=0.01), clock), BlockManager(64, 16, 16),
                      SchedulerConfig(admission=admission), max_model_len=512, vocab_size=100, clock=clock)


def test_metadata_rides_on_the_request_its_outputs_and_a_migration():
    meta = RequestMetadata(priority=-2, tenant="acme", session_id="s1", slo=SLO(2.0, 0.1))
    src, dst = sim_engine(), sim_engine()
    src.add([1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True), req_id="r", arrival_time=0.0, metadata=meta)
    req = src.requests["r"]
    assert (req.priority, req.deadline) == (-2, 2.0)
    outs = src.step()
    assert outs[0].metadata == meta
    dst.import_(src.export("r"))
    assert dst.requests["r"].metadata == meta and dst.requests["r"].deadline == 2.0
    while dst.has_unfinished():
        for out in dst.step():
            assert out.metadata == meta
    with pytest.raises(ValueError, match="twice"):
        src.add([1], req_id="x", priority=3, metadata=meta)
    with pytest.raises(ValueError, match="priority"):
        RequestMetadata(priority=2**40)
    with pytest.raises(ValueError, match="positive"):
        SLO(0.0, 0.1)


def test_simulated_requests_carry_the_runs_slo():
    spec = InstanceSpec(linear(intercept=0.01, tokens=0.0001), num_blocks=64, admission="deadline")
    wl = Workload("t", [RequestSpec(0.0, 20, 3), RequestSpec(0.01, 20, 3)], {"kind": "test"})
    records, _, sims = simulate(wl, [spec], "predicted_latency", slo=SLO(1.0, 0.1))
    assert all(r.ok for r in records)
    assert sims[0].engine.scheduler.config.admission == "deadline"


# ---- fleets and capacity ------------------------------------------------------------------------


def test_speeds_parse_into_one_speed_per_instance():
    assert parse_speeds("2x1,1x0.5", 3) == [1.0, 1.0, 0.5]
    assert parse_speeds(None, 2) == [1.0, 1.0]
    for bad in ("2x1", "0x1,3x1", "x", "3x-1"):
        with pytest.raises(ValueError):
            parse_speeds(bad, 3)


def test_a_half_speed_instance_steps_twice_as_long():
    cm = linear(intercept=0.01, tokens=0.001)
    plan = StepPlan([chunk("a", 0, 10)])
    assert ScaledCostModel(cm, 0.5).step_time(plan) == pytest.approx(2 * cm.step_time(plan))
    assert plan_features(plan)[FEATURES.index("tokens")] == 10
    setup = SimSetup(cm, [1.0, 0.5], "round_robin")
    assert [s.cost_model.step_time(plan) for s in setup.specs()] == pytest.approx([0.02, 0.04])


def test_capacity_search_finds_the_knee_of_a_monotone_attainment():
    knee = 0.8  # attainment is 1 at time scales above the knee, 0.5 below

    def run(ts):
        return {"slo_attainment": 1.0 if ts >= knee else 0.5, "workload": {"rate": 10 / ts}}

    found = find_capacity(run, 0.9, lo=0.25, hi=4.0, rel_tol=0.01)
    assert knee <= found.time_scale <= knee * 1.01
    assert found.rate_rps == pytest.approx(10 / found.time_scale)
    assert find_capacity(lambda ts: {"slo_attainment": 0.1, "workload": {}}, 0.9) is None
    with pytest.raises(ValueError):
        find_capacity(run, 1.5)


def test_capacity_search_on_the_simulator_ranks_a_faster_fleet_higher():
    wl = [RequestSpec(i * 0.5, 64, 8) for i in range(40)]

    def capacity(speed: float) -> float:
        setup = SimSetup(linear(intercept=0.02, tokens=0.001), [speed, speed], "predicted_latency",
                         slo=SLO(1.0, 0.1), num_blocks=200)

        def run(ts):
            w = Workload("t", [RequestSpec(r.arrival_s * ts, r.prompt_len, r.output_len) for r in wl],
                         {"kind": "test", "rate": len(wl) / (wl[-1].arrival_s * ts)})
            return setup.run(w)[0]

        return find_capacity(run, 0.9, lo=0.01, hi=4.0, rel_tol=0.05).rate_rps

    assert capacity(2.0) > 1.5 * capacity(1.0)


# ---- prefix groups ------------------------------------------------------------------------------


def test_prefix_groups_share_leading_tokens_and_make_prefix_aware_dispatch_pay():
    from shoal.bench.workloads import synthetic, with_prefix_groups

    wl = with_prefix_groups(synthetic("poisson", 200, 20.0, 300, 8, seed=1), groups=40, prefix_len=256, seed=1)
    assert {r.prefix_group for r in wl.requests} <= set(range(40)) and wl.description["prefix_groups"] == 40
    short = with_prefix_groups(Workload("t", [RequestSpec(0.0, 10, 2)], {}), 2, 256).requests[0]
    assert short.prefix_len == 9  # one token stays the request's own
    with pytest.raises(ValueError):
        with_prefix_groups(wl, 0, 256)

    def hits(policy: str) -> int:
        spec = InstanceSpec(linear(intercept=0.01, tokens=0.001), num_blocks=150)  # no room for every prefix everywhere
        _, _, sims = simulate(wl, [spec] * 4, policy, slo=SLO(2.0, 0.2))
        return sum(s.engine.load().prefix_cache_hits for s in sims)

    assert hits("predicted_latency") > 1.5 * hits("round_robin") > 0  # measured 38,560 vs 20,768 tokens
