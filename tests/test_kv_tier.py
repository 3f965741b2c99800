"""The second KV tier: demotion on eviction, loads on a prefix hit, the load-or-recompute choice,
copies that did not run, and what the tier saves in the simulator."""

from __future__ import annotations

import pytest

from shoal.bench import agent
from shoal.engine.block_manager import BlockManager
from shoal.engine.cost_model import LinearCostModel, default_profile_path
from shoal.engine.kv_tier import PrefixTier, TierCost
from shoal.engine.preemption import PreemptionMode
from shoal.engine.request import Request
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig
from shoal.engine.programs import ProgramConfig
from shoal.sim.experiment import SimSetup

CHEAP = TierCost(load_s_per_block=1e-6, recompute_s_per_token=1e-3)


def finished_prompt(bm: BlockManager, rid: str, tokens: list[int]) -> None:
    """Allocate, 'compute' and commit a prompt, then free it: its full blocks stay cached."""
    bm.allocate(rid, tokens, len(tokens))
    bm.commit(rid, tokens, len(tokens))
    bm.free(rid)


def test_evicted_prefix_is_demoted_and_loaded_back():
    bm = BlockManager(5, 4, tier=PrefixTier(8, CHEAP))
    a = list(range(100, 116))  # four full blocks
    finished_prompt(bm, "a", a)
    assert bm.take_tier_copies() == ([], [])
    finished_prompt(bm, "b", list(range(200, 220)))  # takes every block: a's are evicted
    out, in_ = bm.take_tier_copies()
    assert len(out) == 4 and in_ == [] and bm.tier.demoted_blocks == 4
    assert sorted(s for _, s in out) == [0, 1, 2, 3]
    # a's next turn: its four blocks come back from the tier.
    turn = a + [1, 2]
    assert bm.cached_prefix(turn) == [None, None, None, None]
    computed = bm.allocate("a2", turn, len(turn))
    assert computed == 16
    out, in_ = bm.take_tier_copies()
    table = bm.table("a2")
    assert sorted(d for _, d in in_) == sorted(table[:4]), "every loaded block lands in a2's table"
    assert bm.tier.loaded_blocks == 4 and bm.prefix_hits == 16
    # b's blocks were evicted to make room: demoted in the same step (copied first) while slots were
    # free; a's slots, being loaded, are not reused, so b's fifth block is not kept.
    assert len(out) == 4 and {d for d, _ in out} <= set(table) and bm.tier.num_used == 8
    assert not {s for _, s in out} & {s for s, _ in in_}, "a demotion never overwrites a slot being loaded"
    bm.check()


def test_tier_hit_continues_past_the_device_prefix():
    bm = BlockManager(4, 2, tier=PrefixTier(4, CHEAP))
    p = [1, 1, 2, 2, 3, 3, 4]
    finished_prompt(bm, "a", p)  # blocks [1,1] [2,2] [3,3] cached, the tail plain; freed tail first
    bm.allocate("x", [9, 9, 9, 9], 4)  # the plain block, then the least recently freed: [3,3]
    bm.take_tier_copies()
    bm.free("x")
    hits = bm.cached_prefix(p)
    assert len(hits) == 3 and hits[2] is None and None not in hits[:2]
    assert bm.allocate("b", p, len(p)) == 6
    _, in_ = bm.take_tier_copies()
    assert [d for _, d in in_] == [bm.table("b")[2]]
    bm.check()


def test_loading_is_skipped_when_recompute_is_cheaper():
    slow = TierCost(load_s_per_block=1.0, recompute_s_per_token=1e-3)
    bm = BlockManager(3, 4, tier=PrefixTier(8, slow))
    a = list(range(8))
    finished_prompt(bm, "a", a)
    finished_prompt(bm, "b", list(range(50, 62)))
    assert bm.tier.num_used == 2, "still demoted: a faster tier could use them"
    assert bm.cached_prefix(a + [1]) == []
    assert bm.allocate("a2", a + [1], 9) == 0
    assert bm.take_tier_copies()[1] == []


def test_tier_reuses_least_recently_used_slots():
    tier = PrefixTier(2, CHEAP)
    tier.demote(10, 0)
    tier.demote(11, 1)
    tier.take_copies()
    tier.load(10, 5)  # 10 is now the most recently used
    tier.take_copies()
    tier.demote(12, 2)
    assert tier.lookup([10]) == 1 and tier.lookup([11]) == 0 and tier.lookup([12]) == 1
    tier.check()


def test_slots_in_use_this_step_are_not_reused():
    tier = PrefixTier(1, CHEAP)
    tier.demote(10, 0)
    tier.demote(11, 1)  # the only slot is being written this step: 11 is not kept
    assert tier.lookup([10]) == 1 and tier.lookup([11]) == 0
    assert tier.take_copies() == ([(0, 0)], [])
    tier.demote(11, 1)  # next step the slot is reusable
    assert tier.lookup([11]) == 1 and tier.lookup([10]) == 0


def test_copies_that_did_not_run_are_forgotten():
    bm = BlockManager(3, 2, tier=PrefixTier(4, CHEAP))
    a, b = [1, 1, 2, 2, 3], [7, 7, 8, 8, 9]
    finished_prompt(bm, "a", a)
    finished_prompt(bm, "b", b)  # a's two cached blocks are demoted (and copied)
    assert len(bm.take_tier_copies()[0]) == 2
    bm.allocate("a2", a, len(a))  # loads a's blocks, evicting (demoting) b's
    out, in_ = bm.take_tier_copies()
    assert len(out) == 2 and len(in_) == 2
    bm.forget_tier_copies(out, in_)  # the step failed before its copies ran
    bm.free("a2")
    bm.check()
    assert all(bm.blocks[d].hash is None for _, d in in_), "blocks never loaded are not found by hash"
    assert bm.cached_prefix(a) == [None, None], "a's earlier, completed demotions still count"
    assert bm.cached_prefix(b) == [], "b's demotions never ran: the tier does not claim them"


def test_a_victim_waiting_for_its_loads_is_recomputed_not_swapped():
    """Swap-outs run before the step's loads: swapping such a request out would copy garbage."""
    bm = BlockManager(6, 4, num_swap_blocks=16, tier=PrefixTier(8, CHEAP))
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, policy="priority"), bm)
    a = list(range(100, 113))
    finished_prompt(bm, "a", a)
    finished_prompt(bm, "b", list(range(200, 224)))  # evicts a's blocks into the tier
    bm.take_tier_copies()
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    low = Request("low", a, params, arrival_time=0.0, priority=5)
    sched.add(low)
    plan = sched.schedule(0.0)
    assert plan.tier_in and not bm.loading("low"), "the plan carries the loads"
    # Were an urgent request to take low's slot before the step ran (its loads still pending),
    # low must not be swapped out.
    bm.tier.pending_in.update({d: s for s, d in plan.tier_in})
    assert bm.loading("low")
    urgent = Request("urgent", [1, 2, 3], params, arrival_time=0.0, priority=0)
    sched.add(urgent)
    sched._admit(plan, 100, 0.0)
    assert ("low", PreemptionMode.RECOMPUTE) in plan.preempted


def test_the_tier_cuts_recomputed_prefill_in_the_simulator():
    """Multi-turn programs whose contexts are several times the pool: the tier keeps what the
    pool evicts, so the turns prefill much less again."""
    programs = agent.generate("swe", 12, 0.3, seed=3, scale_tokens=0.15)
    wl = agent.AgentWorkload("agent", programs, {"kind": "agent"})
    runs = {}
    for tier_blocks in (0, 2000):
        setup = SimSetup(cost_model=LinearCostModel.load(default_profile_path()), speeds=[1.0], dispatch="round_robin",
                         num_blocks=200, num_tier_blocks=tier_blocks, programs=ProgramConfig(scheduling="none"))
        runs[tier_blocks] = setup.run(wl)[0]
    one, two = runs[0], runs[2000]
    assert one["kv_tier"]["loaded_blocks"] == 0
    assert two["kv_tier"]["demoted_blocks"] > 0 and two["kv_tier"]["loaded_blocks"] > 0
    before = one["programs"]["recomputed_prefill_tokens_per_program"]["mean"]
    after = two["programs"]["recomputed_prefill_tokens_per_program"]["mean"]
    assert after < 0.5 * before, (before, after)
    assert two["programs"]["jct_s"]["mean"] < one["programs"]["jct_s"]["mean"]


def test_engine_config_refuses_a_negative_tier():
    from shoal.engine.config import EngineConfig

    with pytest.raises(ValueError, match="kv_tier_gb"):
        EngineConfig(kv_tier_gb=-1)


def test_server_reports_the_tier_and_its_hits():
    """Over HTTP: a prompt evicted from a small pool comes back from the tier (``cached_tokens``),
    and /metrics shows the tier's capacity, use, demotions and hits."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests._server_util import MODEL_NAME, fast_engine, serve

    engine = fast_engine(num_blocks=16, max_model_len=256, num_tier_blocks=64)
    server, _ = serve(engine)
    try:
        def complete(prompt: list[int]) -> dict:
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200, r.text
            return r.json()["usage"]

        first = list(range(1000, 1150))
        assert complete(first)["prompt_tokens_details"]["cached_tokens"] == 0
        complete(list(range(3000, 3200)))  # needs the whole pool: evicts the first prompt's blocks
        again = complete(first)
        assert again["prompt_tokens_details"]["cached_tokens"] == 144, "9 full blocks of 16: from the device or the tier"
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        m = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert m["shoal:kv_tier_capacity_blocks"] == 64
        assert 0 < m["shoal:kv_tier_used_blocks"] <= 64
        assert m["shoal:kv_tier_demoted_blocks_total"] >= 9
        assert 0 < m["shoal:kv_tier_hit_blocks_total"] <= 9  # the rest were still on the device
    finally:
        server.stop()


def test_sim_and_serve_take_the_tier_options(tmp_path):
    """``shoal sim --kv-tier-blocks`` reports the tier; a negative size is refused before anything loads."""
    import json

    from tests._cli_util import cli

    trace = tmp_path / "t.jsonl"
    agent.dump(agent.generate("swe", 4, 0.5, seed=1, scale_tokens=0.1), trace)
    r = cli("sim", "--workload", f"agent:{trace}", "--num-blocks", "120", "--kv-tier-blocks", "600",
            "--program-scheduling", "none", "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["kv_tier"]["blocks_per_instance"] == 600 and res["kv_tier"]["loaded_blocks"] > 0
    assert res["prefix_cache"]["hit_tokens"] > 0
    for command in (["sim", "--kv-tier-blocks", "-1"], ["serve", "--kv-tier-gb", "-1"]):
        r = cli(*command, "--model", str(tmp_path / "absent.gguf")) if command[0] == "serve" else cli(*command)
        assert r.exit_code == 2, r.output
