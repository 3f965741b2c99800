"""The simulator runs the real scheduler on a virtual clock; its cost models and planner."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from shoal.bench.report import summarize
from shoal.bench.workloads import RequestSpec, Workload, synthetic
from shoal.cluster import policies
from shoal.engine.scheduler import ScheduledChunk, StepPlan
from shoal.sim.catalog import RooflineCostModel, gpus, model_shape
from shoal.sim.cost_model import FEATURES, LinearCostModel, default_profile_path, plan_features
from shoal.sim.simulator import InstanceSpec, simulate


def constant_cost(seconds: float, per_token: float = 0.0) -> LinearCostModel:
    coef = [0.0] * len(FEATURES)
    coef[FEATURES.index("intercept")] = seconds
    coef[FEATURES.index("tokens")] = per_token
    return LinearCostModel(coef)


def workload(*reqs: tuple[float, int, int]) -> Workload:
    return Workload("test", [RequestSpec(*r) for r in reqs], {"kind": "test"})


def test_single_request_timeline_by_hand():
    # Every step takes 1 s: prefill (10 tokens) -> token 1 at t=1, then one token per second.
    records, duration, _ = simulate(workload((0.0, 10, 3)), [InstanceSpec(constant_cost(1.0))], policies.LeastLoad())
    (r,) = records
    assert r.token_times_s == [1.0, 2.0, 3.0]
    assert r.ttft == 1.0 and r.e2e == 3.0 and r.tpot == 1.0
    assert duration == 3.0


def test_two_requests_batch_and_chunk_by_hand():
    # 0.1 s + 0.01 s per token. A: 20-token prompt at t=0, 2 outputs. B: 30 tokens at t=0.05, 2 outputs.
    # Budget 25 tokens/step: step1 [0, .3): A prefill 20 -> A tok1 at .3 (B arrived during it).
    # step2 [.3, .65): A decode 1 + B chunk 24 (25 tokens) -> A tok2 at .65 (A done).
    # step3 [.65, .81): B's last 6 prompt tokens -> B tok1 at .81. step4 [.81, .92): B decode.
    spec = InstanceSpec(constant_cost(0.1, 0.01), max_num_batched_tokens=25)
    (a, b), duration, _ = simulate(workload((0.0, 20, 2), (0.05, 30, 2)), [spec], policies.LeastLoad())
    assert a.token_times_s == pytest.approx([0.3, 0.65])
    assert b.token_times_s == pytest.approx([0.81, 0.92])
    assert b.ttft == pytest.approx(0.81 - 0.05)
    assert duration == pytest.approx(0.92)


def test_same_seed_same_result_and_fast_forward_is_exact():
    wl = synthetic("gamma", 120, rate=6.0, prompt_len=200, output_len=60, burstiness=0.5, seed=3, len_jitter=0.5)
    cm = constant_cost(0.02, 0.0004)
    specs = [InstanceSpec(cm, num_blocks=300, max_num_seqs=16)] * 3
    runs = [simulate(wl, specs, policies.LeastLoad(), seed=1, fast_forward=ff)[0] for ff in (True, True, False)]
    as_dicts = [[asdict(r) for r in run] for run in runs]
    assert as_dicts[0] == as_dicts[1]
    for a, b in zip(runs[0], runs[2]):  # stepping one by one: same up to float summation order
        assert a.token_times_s == pytest.approx(b.token_times_s, rel=1e-9)
        assert a.output_tokens == b.output_tokens


def test_dispatch_policy_objects_are_the_clusters():
    class Counting(policies.RoundRobin):
        calls = 0

        def choose(self, loads, request):
            Counting.calls += 1
            return super().choose(loads, request)

    policy = Counting()
    records, _, sims = simulate(workload((0, 10, 2), (0, 10, 2), (0, 10, 2)), [InstanceSpec(constant_cost(0.1))] * 3, policy)
    assert Counting.calls == 3
    assert all(s.engine.block_manager.num_used == 0 for s in sims)
    assert policies.make_dispatch_policy("least_load").__class__ is policies.LeastLoad


def test_result_schema_matches_bench():
    wl = synthetic("poisson", 20, rate=2.0, prompt_len=50, output_len=10)
    records, duration, _ = simulate(wl, [InstanceSpec(constant_cost(0.01))], policies.LeastLoad())
    result = summarize(records, wl.description, 500, 50, duration)
    for key in ("num_requests", "completed", "failed", "duration_s", "request_throughput", "output_token_throughput",
                "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "slo", "goodput_rps", "slo_attainment", "workload"):
        assert key in result
    assert result["completed"] == 20 and result["failed"] == 0
    assert set(result["ttft_ms"]) == {"mean", "p50", "p90", "p99"}


def test_linear_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    true = np.array([0.005, 0.001, 2e-4, 3e-4, 1e-6, 1e-8, 1e-4, 5e-4, 0.0])
    plans = []
    for _ in range(200):
        chunks = [ScheduledChunk("d", int(rng.integers(10, 500)), [0], [], True) for _ in range(rng.integers(0, 20))]
        if rng.random() < 0.5:
            n = int(rng.integers(2, 300))
            chunks.append(ScheduledChunk("p", int(rng.integers(0, 200)), [0] * n, [], True))
        plans.append(StepPlan(chunks=chunks))
    feats = np.array([plan_features(p) for p in plans])
    secs = feats @ true
    model = LinearCostModel.fit_samples(feats, secs)
    assert model.fit["mape"] < 1e-3
    assert model.step_time(plans[0]) == pytest.approx(secs[0], rel=1e-3)


def test_committed_profile_loads_and_is_sane(tmp_path):
    cm = LinearCostModel.load(default_profile_path())
    decode1 = StepPlan(chunks=[ScheduledChunk("a", 100, [0], [], True)])
    decode32 = StepPlan(chunks=[ScheduledChunk(str(i), 100, [0], [], True) for i in range(32)])
    prefill = StepPlan(chunks=[ScheduledChunk("p", 0, [0] * 512, [], True)])
    assert 0 < cm.step_time(decode1) < cm.step_time(decode32) < cm.step_time(prefill)
    assert cm.fit["mape"] < 0.25
    cm.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["coefficients"] == cm.coefficients


def test_roofline_orders_gpus_and_checks_memory():
    plan = StepPlan(chunks=[ScheduledChunk(str(i), 500, [0], [], True) for i in range(32)])
    cat = gpus()
    m8 = model_shape("llama-3-8b")
    assert RooflineCostModel(cat["H100"], m8).step_time(plan) < RooflineCostModel(cat["L4"], m8).step_time(plan)
    assert RooflineCostModel(cat["T4"], m8).kv_blocks() == 0  # 16 GB of weights do not fit on a T4
    with pytest.raises(ValueError, match="unknown model"):
        model_shape("gpt-5")


def test_plan_picks_a_mix_that_meets_the_slo():
    from shoal.sim.planner import make_plan

    wl = synthetic("poisson", 150, rate=8.0, prompt_len=400, output_len=64, seed=2, len_jitter=0.5)
    cat = {g: gpus()[g] for g in ("L4", "H100")}
    plan = make_plan(wl, model_shape("llama-3.2-1b"), cat, slo_ttft_ms=1500, slo_tpot_ms=80, target=0.9,
                     num_buckets=2, sample=40)
    assert plan.counts and plan.cost_per_hour == pytest.approx(
        sum(cat[g].price_per_hour * n for g, n in plan.counts.items()))
    for shares in zip(*plan.shares.values()):
        assert sum(shares) == pytest.approx(1.0)
    assert plan.verification["slo_attainment"] >= 0.8
