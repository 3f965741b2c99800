"""The simulator runs the real scheduler on a virtual clock; its cost models and planner."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from shoal.bench.report import summarize
from shoal.bench.workloads import RequestSpec, Workload, synthetic
from shoal.control import policies
from shoal.engine.scheduler import ScheduledChunk, StepPlan
from shoal.sim.catalog import RooflineCostModel, gpus, model_shape
from shoal.engine.cost_model import FEATURES, LinearCostModel, default_profile_path, plan_features
from shoal.sim.simulator import InstanceSpec, simulate
from shoal.sim.transfer import Link, summarize_transfers


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
    # every feature a decode step has priced, so a skipped stretch must price each one as a step does
    cm = LinearCostModel([0.02, 0.008, 0.0004, 0.0002, 1e-6, 2e-6, 1e-7, 1e-4, 0.005, 0.0])
    assert len(cm.coefficients) == len(FEATURES)
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
    true = np.array([0.005, 0.001, 2e-4, 3e-4, 1e-6, 2e-6, 1e-8, 1e-4, 5e-4, 0.0])
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


def test_a_profile_fitted_with_the_old_small_step_feature_prices_steps_as_before():
    """Profiles written before ``large_step`` replaced ``small_step`` (= 1 - large_step) still load,
    and price every step exactly as their own coefficients did."""
    old = [0.0114, 0.003, 4e-4, 4e-5, 5e-6, 4e-7, 0.0, 5e-3, 0.0]
    names = ["intercept", "small_step", "tokens", "decodes", "decode_context", "prefill_attention", "sampled",
             "prefill_chunks", "swapped_blocks"]
    data = {"kind": "linear", "features": names, "coefficients": old, "device": "cpu", "model": "m", "dtype": "bfloat16"}
    cm = LinearCostModel.from_dict(data)
    for decodes in (1, 4, 5, 32):
        plan = StepPlan(chunks=[ScheduledChunk(str(i), 100 + 50 * i, [0], [], True) for i in range(decodes)])
        f = dict(zip(FEATURES, plan_features(plan)))
        f["small_step"] = float(f["large_step"] == 0)
        assert cm.step_time(plan) == pytest.approx(float(np.dot(old, [f[n] for n in names])))
    for bogus in (["intercept", "bogus", *names[2:]], names[:-1], [*names, "decode_context"]):
        with pytest.raises(ValueError, match="not a linear cost model"):
            LinearCostModel.from_dict({**data, "features": bogus, "coefficients": [0.0] * len(bogus)})


def test_the_committed_profile_prices_decode_attention_padded_to_the_longest_context():
    """Shoal's decode attention reads every decode's K/V padded to the longest, so one long decode
    in a batch of short ones costs the whole batch its length; the profile before decode_span
    (summed contexts) prices only the sum, and the roofline (paged attention) too."""
    def batch(contexts):
        return StepPlan(chunks=[ScheduledChunk(str(i), c, [0], [], True) for i, c in enumerate(contexts)])

    mixed, even = batch([1000] + [100] * 31), batch([128] * 28 + [129] * 4)  # the same summed context
    f_mixed, f_even = plan_features(mixed), plan_features(even)
    assert f_mixed[FEATURES.index("decode_context")] == f_even[FEATURES.index("decode_context")] == 4132
    assert (f_mixed[FEATURES.index("decode_span")], f_even[FEATURES.index("decode_span")]) == (32 * 1001, 32 * 130)
    padded = LinearCostModel.load(default_profile_path())
    per_token = padded.coefficients[FEATURES.index("decode_span")]
    assert per_token > 0 and padded.coefficients[FEATURES.index("decode_context")] == 0
    assert padded.step_time(mixed) - padded.step_time(even) == pytest.approx(per_token * 32 * (1001 - 130))
    summed = LinearCostModel.load(Path(__file__).parents[1] / "benchmarks/profiles/smollm2_cpu_2026-12-07.json")
    assert summed.step_time(mixed) == pytest.approx(summed.step_time(even))
    assert summed.step_time(batch([128] * 32)) == pytest.approx(padded.step_time(batch([128] * 32)))
    roofline = RooflineCostModel(gpus()["A100-80G"], model_shape("smollm2-135m"))
    assert roofline.step_time(mixed) == pytest.approx(roofline.step_time(even))


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
    assert plan.meets_target == (plan.verification["slo_attainment"] >= 0.9)


def test_a_plan_that_misses_its_check_comes_with_a_dearer_mix_that_meets_it():
    """Capacities six times too high make the integer program pick too few instances; solving again
    with less headroom finds a mix whose simulation meets the target (or says none within the tries)."""
    from shoal.sim import planner

    wl = synthetic("poisson", 100, rate=8.0, prompt_len=512, output_len=128, seed=1)
    l4, model = gpus()["L4"], model_shape("llama-3-8b")
    found = planner.Capacities(buckets=[(640, 640)], bucket_rps=[8.0], caps={"L4": [20.0]},
                               configs={"L4": planner.CONFIGS[0]},
                               specs={"L4": planner.instance_spec(l4, model, planner.CONFIGS[0])})
    slo = (1000.0, 100.0)
    plan = planner.solve(found, {"L4": l4})
    assert plan.counts == {"L4": 1} and plan.headroom == 1.0
    planner.verify(plan, wl, found, slo, 0.9)
    assert plan.meets_target is False and plan.verification["slo_attainment"] < 0.9
    better = planner.meet_target(plan, wl, found, {"L4": l4}, slo, 0.9)
    assert better is not None and better.meets_target and better.verification["slo_attainment"] >= 0.9
    assert better.counts["L4"] > 1 and better.headroom < 1 and better.cost_per_hour > plan.cost_per_hour
    assert planner.meet_target(plan, wl, found, {"L4": l4}, (1.0, 100.0), 0.9, tries=2) is None  # a 1 ms TTFT: never


def test_the_solver_prints_nothing_on_stdout(capfd):
    """HiGHS prints debug lines from C whatever ``disp`` says; stdout carries only the result."""
    import ctypes

    from shoal.sim.planner import _c_stdout_silenced

    with _c_stdout_silenced():
        ctypes.CDLL(None).printf(b"HighsMipSolverData::debug\n")
        os.write(1, b"more noise\n")
    print("result")
    out, _ = capfd.readouterr()
    assert out == "result\n"


# ---- live migration and P/D disaggregation ------------------------------------------------------

# KV of 2048 bytes a block (1 layer, 1 head, head_dim 32, bf16) over a link moving one block a
# second after a fixed 0.25 s: timelines by hand.
TINY_KV = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 32}
BLOCK_A_SECOND = Link(bandwidth_gbps=2048 * 8 / 1e9, latency_s=0.25)


def transfers(sims):
    return [t for s in sims for t in s.transfers]


def check_all_done(records, sims):
    for r in records:  # each request ended once, with every token it asked for
        assert r.error is None and r.end_s is not None
        assert r.output_tokens == r.output_len == len(r.token_times_s)
        assert r.token_times_s == sorted(r.token_times_s) and r.token_times_s[-1] == r.end_s
    for s in sims:
        s.engine.block_manager.check()
        assert s.engine.block_manager.num_used == 0 and not s.engine.has_unfinished()


class Scripted:
    """A migration policy that moves the first running request of instance 0 to instance 1 once,
    and records what it was shown."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = []

    def plan(self, loads, running, draining=frozenset()):
        self.calls.append((dict(loads), {i: list(r) for i, r in running.items()}))
        src, dst = sorted(running)[:2]
        if len(self.calls) == 1 and running[src]:
            return [policies.Migration(running[src][0].req_id, src, dst, "test")]
        return []


@pytest.mark.parametrize("ff", [True, False])
def test_migration_timeline_by_hand(ff):
    # 1 s a step. r0 (32-token prompt, 10 outputs) on instance 0: tokens at 1..3; the tick at 2.5
    # sees 35 tokens and stages blocks 0-1 (34 computed) by 4.75 while tokens 4, 5 come. The stage
    # round at 4.75 finds no new full block: stop-and-copy of block 2 (36 computed) from the end of
    # the step in flight (5) takes 1.25 s; instance 1 resumes it at 6.25: tokens at 7.25 ... 11.25.
    policy = Scripted()
    spec = InstanceSpec(constant_cost(1.0), **TINY_KV)
    records, _, sims = simulate(workload((0.0, 32, 10)), [spec, spec], policies.LeastLoad(), fast_forward=ff,
                                       migration=policy, link=BLOCK_A_SECOND, control_interval_s=2.5)
    (r,) = records
    assert r.token_times_s == pytest.approx([1, 2, 3, 4, 5, 7.25, 8.25, 9.25, 10.25, 11.25])
    assert policy.calls[0][1] == {0: [policies.RunningRequest("r0", 0, 35)], 1: []}  # from the engine's load snapshot
    (t,) = transfers(sims)
    assert (t.kind, t.reason, t.src, t.dst, t.outcome) == ("migration", "test", 0, 1, "done")
    assert (t.staged_bytes, t.tail_bytes) == (2 * 2048, 2048)
    assert (t.start_s, t.end_s, t.downtime_s) == pytest.approx((2.5, 6.25, 1.25))
    assert [s.tokens for s in sims] == [5, 5]
    check_all_done(records, sims)


def test_pd_timeline_by_hand():
    # Prefill of 10 tokens on instance 0 [0, 1): token 1 at 1; its one KV block reaches the decode
    # instance at 2.25; tokens 2, 3 at 3.25, 4.25.
    spec = InstanceSpec(constant_cost(1.0), **TINY_KV)
    records, _, sims = simulate(workload((0.0, 10, 3)), [spec, spec], policies.LeastLoad(), roles=["prefill", "decode"],
                                link=BLOCK_A_SECOND)
    (r,) = records
    assert r.token_times_s == pytest.approx([1.0, 3.25, 4.25]) and r.ttft == 1.0
    (t,) = transfers(sims)
    assert (t.kind, t.src, t.dst, t.outcome, t.tail_bytes) == ("pd", 0, 1, "done", 2048)
    assert (t.start_s, t.end_s) == pytest.approx((1.0, 2.25))
    check_all_done(records, sims)


def test_migration_sees_only_decode_instances():
    # As in the cluster: prefill instances hand their requests off; live migration moves requests
    # among decode/both instances only, so the policy is shown instances 1 and 2, not 0.
    spec = InstanceSpec(constant_cost(1.0), max_num_batched_tokens=16, **TINY_KV)
    policy = Scripted()
    records, _, sims = simulate(workload((0.0, 40, 6), (0.0, 8, 6)), [spec] * 3, policies.LeastLoad(),
                                roles=["prefill", "decode", "decode"], migration=policy, link=BLOCK_A_SECOND,
                                control_interval_s=0.5)
    assert policy.calls and all(len(loads) == 2 for loads, _ in policy.calls)
    assert all(t.kind == "pd" and t.src == 0 for t in transfers(sims) if t.kind == "pd")
    assert all(t.src != 0 and t.dst != 0 for t in transfers(sims) if t.kind == "migration")
    check_all_done(records, sims)


def imbalanced():
    """Round-robin sends every long request to instance 0, whose small KV then preempts."""
    reqs = [(i * 0.05, 200, 120) if i % 2 == 0 else (i * 0.05, 20, 8) for i in range(16)]
    spec = InstanceSpec(constant_cost(0.02, 0.0004), num_blocks=48, num_swap_blocks=64, max_num_seqs=8)
    return workload(*reqs), [spec, spec]


def test_migration_relieves_an_imbalanced_cluster():
    class Recording(policies.LlumnixMigration):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def plan(self, loads, running, draining=frozenset()):
            self.calls += 1
            return super().plan(loads, running, draining)

    wl, specs = imbalanced()
    _, _, static = simulate(wl, specs, policies.RoundRobin())
    assert static[0].engine.scheduler.num_preemptions > 0 and not transfers(static)
    policy = Recording()
    records, _, sims = simulate(wl, specs, policies.RoundRobin(), migration=policy)
    assert policy.calls > 0
    moved = [t for t in transfers(sims) if t.outcome == "done"]
    assert moved and all(t.kind == "migration" and t.src != t.dst for t in moved)
    assert {t.reason for t in transfers(sims)} <= {"relieve", "rebalance"}
    assert sum(s.tokens for s in sims) == sum(r.output_len for r in records)
    summary = summarize_transfers(transfers(sims))["migrations"]
    assert summary["done"] == len(moved) and summary["downtime_ms"]["mean"] > 0
    check_all_done(records, sims)


def test_pd_first_token_on_prefill_rest_on_decode():
    wl = synthetic("poisson", 30, rate=8.0, prompt_len=120, output_len=12, seed=4, len_jitter=0.5)
    spec = InstanceSpec(constant_cost(0.02, 0.0004), num_blocks=400)
    records, _, sims = simulate(wl, [spec, spec], policies.LeastLoad(), roles=["prefill", "decode"])
    by_req = {t.req_id: t for t in transfers(sims)}
    assert len(by_req) == len(transfers(sims)) == len(records)
    for i, r in enumerate(records):
        t = by_req[f"r{i}"]
        assert (t.src, t.dst, t.outcome) == (0, 1, "done")
        assert t.start_s == r.first_token_s and all(x > t.end_s for x in r.token_times_s[1:])
        assert r.ttft >= 0.02 + 0.0004 * min(r.prompt_len, spec.max_num_batched_tokens) - 1e-9  # the prefill step
    assert sims[0].tokens == len(records) and sims[1].tokens == sum(r.output_len - 1 for r in records)
    check_all_done(records, sims)


def test_pd_rolls_back_when_the_decode_instance_has_no_room():
    prefill = InstanceSpec(constant_cost(0.1), num_blocks=64)
    decode = InstanceSpec(constant_cost(0.1), num_blocks=2)  # a 40-token prompt needs 3 blocks
    records, _, sims = simulate(workload((0.0, 40, 5)), [prefill, decode], policies.LeastLoad(), roles=["prefill", "decode"])
    (t,) = transfers(sims)
    assert t.outcome == "rolled_back" and [s.tokens for s in sims] == [5, 0]
    check_all_done(records, sims)
    with pytest.raises(ValueError, match="decode"):
        simulate(workload((0.0, 4, 2)), [prefill], policies.LeastLoad(), roles=["prefill"])


@pytest.mark.parametrize("roles", [None, ["prefill", "both", "decode"]])
def test_same_seed_same_result_with_migration(roles):
    wl = synthetic("gamma", 80, rate=8.0, prompt_len=200, output_len=50, burstiness=0.5, seed=3, len_jitter=0.5)
    spec = InstanceSpec(constant_cost(0.02, 0.0004), num_blocks=60, max_num_seqs=16)
    runs = [simulate(wl, [spec] * 3, policies.RoundRobin(), seed=1, fast_forward=ff, roles=roles,
                     migration=policies.LlumnixMigration(), link=Link(1.0, 0.002)) for ff in (True, True, False)]
    assert [asdict(r) for r in runs[0][0]] == [asdict(r) for r in runs[1][0]]
    assert [asdict(t) for t in transfers(runs[0][2])] == [asdict(t) for t in transfers(runs[1][2])]
    assert any(t.kind == "migration" for t in transfers(runs[0][2]))
    for a, b in zip(runs[0][0], runs[2][0]):  # fast-forward stays exact with ticks and transfers
        assert a.token_times_s == pytest.approx(b.token_times_s, rel=1e-9)
    for records, _, sims in runs:
        check_all_done(records, sims)


def test_validate_runs_tenants_and_fair_share_settings_on_both_sides(make_tiny_engine):
    """``sim --validate`` on a tenant mix: the real run sends each request as its tenant (the
    per-tenant counters move), and the simulated twin gets the engine's fair-share settings, so
    both sides schedule the same way."""
    from dataclasses import replace

    from shoal.sim.validate import real_run, spec_of

    engine = make_tiny_engine(scheduling_policy="vtc", fair_first_token=False, fair_prefill_tokens=24,
                              fair_prefill_stretch=0.3, admission="deadline", step_time_limit_s=0.2)
    spec = spec_of(engine, constant_cost(0.01))
    assert (spec.scheduling_policy, spec.fair_first_token, spec.fair_prefill_tokens, spec.fair_prefill_stretch,
            spec.admission, spec.step_time_limit_s) == ("vtc", False, 24, 0.3, "deadline", 0.2)
    wl = workload((0.0, 9, 4), (0.0, 5, 4), (0.01, 7, 4))
    wl = replace(wl, requests=[replace(r, tenant=t, weight=w) for r, t, w in zip(wl.requests, "aab", (1.0, 1.0, 2.0))])
    records, _ = real_run(engine, wl)
    assert [r.tenant for r in records] == ["a", "a", "b"] and all(r.output_tokens == 4 for r in records)
    # served tokens / weight: a 9 + 5 prompt tokens + 8 outputs; b (weight 2) (7 + 4) / 2 on top of
    # the counter it was lifted to on arrival (how far a had got by then)
    assert engine.scheduler.fair.value("a") == pytest.approx(22)
    assert engine.scheduler.fair.value("b") >= 5.5 and engine.scheduler.fair.value(None) == 0


def test_shoal_sim_validate_hands_tenants_and_scheduler_options_to_the_real_run(monkeypatch, tmp_path):
    """``shoal sim --validate`` builds the tenant mix it was given and an engine with the command's
    scheduler options (the comparison itself is stubbed: its tests are above and below)."""
    import shoal.sim.validate as validate
    from tests._cli_util import cli

    seen = {}

    def compare(wl, engine, cm, slo, progress):
        seen["tenants"] = {r.tenant for r in wl.requests}
        seen["config"] = engine.scheduler.config
        return {"step_time": {"rel_error": 0.0}}

    monkeypatch.setattr(validate, "compare", compare)
    r = cli("sim", "--validate", "--tenants", "a=1,b=1", "-n", "8", "--fair-prefill-stretch", "0.3",
            "--admission", "deadline", "--token-budget", "slo", "--slo-tpot-ms", "150", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    cfg = seen["config"]
    assert seen["tenants"] == {"a", "b"}
    assert (cfg.fair_prefill_stretch.fraction, cfg.admission, cfg.step_time_budget.limit_s) == (0.3, "deadline", 0.15)


def test_validate_prices_each_real_step_with_the_cost_model(make_tiny_engine, tmp_path):
    """``compare`` times every real step and prices the same steps with the cost model: at 0.5 s
    a step plus 0.1 s a token, the price is exactly that of the steps and tokens the engine ran,
    and the engine gets its own executor back. With enough steps it simulates again on a cost
    model fitted to them, which prices this run's steps far closer than 0.5 s a step does."""
    from shoal.sim.validate import compare

    engine = make_tiny_engine()
    executor = engine.executor
    wl = workload((0.0, 9, 30), (0.0, 5, 40), (0.01, 7, 20))
    result = compare(wl, engine, constant_cost(0.5, per_token=0.1), also={"slower": constant_cost(1.0, per_token=0.2)})
    steps = result["step_time"]
    slower = result["also"]["slower"]["metrics"]["e2e_p50"]
    assert slower["real_ms"] == result["metrics"]["e2e_p50"]["real_ms"]
    assert slower["sim_ms"] == pytest.approx(2 * result["metrics"]["e2e_p50"]["sim_ms"], rel=0.05)
    assert engine.executor is executor
    # every prompt token once, then one token a decode step after each request's first
    tokens = 9 + 5 + 7 + (30 - 1) + (40 - 1) + (20 - 1)
    assert steps["steps"] >= 40 and steps["predicted_s"] == pytest.approx(0.5 * steps["steps"] + 0.1 * tokens)
    assert 0 < steps["real_s"] < steps["predicted_s"]  # a tiny model steps far faster than 0.5 s
    assert steps["rel_error"] == pytest.approx((steps["predicted_s"] - steps["real_s"]) / steps["real_s"])
    buckets = steps["by_decodes"]  # the same steps by decodes a step: 0 (prefill only), 1-8 here
    assert set(buckets) <= {"0", "1-8"} and "1-8" in buckets
    assert sum(b["steps"] for b in buckets.values()) == steps["steps"]
    assert sum(b["predicted_s"] for b in buckets.values()) == pytest.approx(steps["predicted_s"])
    assert sum(b["real_s"] for b in buckets.values()) == pytest.approx(steps["real_s"])
    assert result["also"]["slower"]["step_time"]["predicted_s"] == pytest.approx(2 * steps["predicted_s"])
    calibrated = result["calibrated"]
    assert calibrated["cost_model"]["fit"]["samples"] == steps["steps"]
    # the engine pads decodes' K/V to the longest: a fit of its steps prices the span, never the sum
    assert calibrated["cost_model"]["coefficients"][FEATURES.index("decode_context")] == 0
    from shoal.sim.validate import stale_cost_model  # the 0.5 s steps are far off: `sim --validate` warns

    assert "--cost-model x.json" in stale_cost_model(result, "x.json")
    assert stale_cost_model({"step_time": {"rel_error": -0.1}}, "x.json") is None
    saved = tmp_path / "calibrated_cost_model.json"  # what `sim --validate` writes, for a later --cost-model
    saved.write_text(json.dumps(calibrated["cost_model"]))
    assert LinearCostModel.load(saved).coefficients == calibrated["cost_model"]["coefficients"]
    assert calibrated["metrics"]["e2e_p50"]["rel_error"] < result["metrics"]["e2e_p50"]["rel_error"]


def test_a_workload_of_one_tenant_keeps_only_its_requests():
    from shoal.bench.workloads import with_tenants

    mixed = with_tenants(synthetic("poisson", 40, 4.0, 16, 4, seed=0), {"heavy": 10, "light": 1}, seed=0)
    light = mixed.of_tenant("light")
    assert light.requests and {r.tenant for r in light.requests} == {"light"}
    assert len(light.requests) + len(mixed.of_tenant("heavy").requests) == 40
    assert light.requests == [r for r in mixed.requests if r.tenant == "light"]
