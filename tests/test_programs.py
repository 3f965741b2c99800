"""Agent programs: KV time-to-live pins, program-level FCFS, the agent trace format, and the
simulator and the engine making the same pin decisions (hand-built timelines on a virtual clock)."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.bench import agent
from shoal.engine.block_manager import BlockManager
from shoal.engine.config import EngineConfig
from shoal.engine.core import EngineCore
from shoal.engine.cost_model import LinearCostModel, default_profile_path
from shoal.engine.engine import Engine
from shoal.engine.metadata import RequestMetadata
from shoal.engine.programs import ProgramConfig
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import SchedulerConfig
from shoal.model.llama import LlamaModel
from shoal.model.loader import load_checkpoint
from shoal.sim.simulator import CostModelExecutor, InstanceSpec, VirtualClock, simulate
from shoal.sim.validate import real_agent_run
from tests._cli_util import cli

COST = LinearCostModel.load(default_profile_path())
BS = 16


def sim_core(num_blocks: int = 64, programs: ProgramConfig = ProgramConfig(), max_num_seqs: int = 8) -> EngineCore:
    clock = VirtualClock()
    return EngineCore(CostModelExecutor(COST, clock), BlockManager(num_blocks, BS, 64),
                      SchedulerConfig(max_num_seqs=max_num_seqs, programs=programs),
                      max_model_len=num_blocks * BS, vocab_size=100_000, clock=clock)


def turn(core: EngineCore, rid: str, prompt: list[int], out: int, *, session: str | None = None,
         more: bool = False, tool: str | None = None) -> str:
    meta = RequestMetadata(session_id=session, more_turns=more, tool=tool)
    return core.add(prompt, SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0), req_id=rid, metadata=meta)


def finish_all(core: EngineCore) -> dict[str, object]:
    """Step until idle; the final output of each request."""
    done = {}
    while core.has_unfinished():
        for o in core.step():
            if o.finished:
                done[o.req_id] = o
    return done


def context(prompt: list[int], out: int, new: int, base: int) -> list[int]:
    """The next turn's prompt: the previous prompt, its reply (the cost model's token 0), new tokens."""
    return prompt + [0] * out + list(range(base, base + new))


def evict_everything(core: EngineCore, base: int) -> None:
    """Another request that needs (nearly) the whole pool."""
    n = (core.block_manager.num_blocks - core.block_manager.num_pinned - 1) * BS
    turn(core, f"filler{base}", list(range(base, base + n)), 2)
    finish_all(core)


@pytest.mark.parametrize("scheduling", ["continuum", "none"])
def test_pinned_program_next_turn_hits_its_whole_prefix(scheduling):
    core = sim_core(programs=ProgramConfig(scheduling=scheduling))
    p1 = list(range(1, 161))  # 10 blocks
    turn(core, "a/0", p1, 16, session="a", more=True)
    finish_all(core)
    bm = core.block_manager
    if scheduling == "continuum":
        assert bm.num_pinned == (160 + 16 - 1) // BS  # every full block of prompt + reply
    else:
        assert bm.num_pinned == 0
    evict_everything(core, 5000)  # the tool runs; meanwhile other work needs the pool
    p2 = context(p1, 16, 20, 300)
    turn(core, "a/1", p2, 4, session="a", more=False)
    out = finish_all(core)["a/1"]
    if scheduling == "continuum":
        assert out.num_cached_tokens == (160 + 16 - 1) // BS * BS
        assert core.scheduler.programs.stats.pin_hits == 1
    else:
        assert out.num_cached_tokens == 0  # evicted: the whole context is prefilled again
    bm.check()
    assert bm.num_pinned == 0 and bm.num_used == 0  # the program ended: nothing stays pinned


def test_expired_pin_is_released():
    core = sim_core(programs=ProgramConfig(default_ttl_s=1.5))
    turn(core, "a/0", list(range(1, 100)), 8, session="a", more=True)
    finish_all(core)
    bm = core.block_manager
    assert bm.num_pinned > 0
    core.clock.t += 1.0
    turn(core, "b", [7] * 20, 1)
    finish_all(core)
    assert bm.num_pinned > 0  # within its time-to-live
    core.clock.t += 1.0
    turn(core, "c", [8] * 20, 1)
    finish_all(core)
    assert bm.num_pinned == 0 and core.scheduler.programs.stats.expired == 1
    bm.check()


def test_ttl_is_learned_from_the_tools_pauses():
    cfg = ProgramConfig(ttl_quantile=1.0, ttl_margin=1.0, max_ttl_s=100)
    core = sim_core(programs=cfg)
    table = core.scheduler.programs
    prompt = [1] * 40
    for k, pause in enumerate([2.0, 3.0, 4.0]):
        turn(core, f"a/{k}", prompt, 2, session="a", more=True, tool="tests")
        finish_all(core)
        core.clock.t += pause
        prompt = context(prompt, 2, 4, 100 + 10 * k)
    # two pauses seen (2 s, 3 s; the last one has no next turn): too few for the tool's own window,
    # so every program's pauses decide; the quantile 1.0 is the slowest
    assert table.ttl("a", "tests") == pytest.approx(3.0)
    assert table.ttl("other", "never-seen") == pytest.approx(3.0)


def test_pins_never_push_out_a_running_request():
    # a pin that outlives the run (whatever the cost model's step times), so only yielding can free it
    core = sim_core(num_blocks=24, programs=ProgramConfig(max_pinned_fraction=0.5, default_ttl_s=60.0, max_ttl_s=60.0))
    turn(core, "a/0", list(range(1, 161)), 17, session="a", more=True)  # 11 blocks pinned
    finish_all(core)
    assert core.block_manager.num_pinned == 11
    # 4 blocks of prompt beside the pins; it then decodes to 20 blocks: only the pins can give way
    turn(core, "big", list(range(500, 564)), 250)
    out = finish_all(core)["big"]
    assert out.num_output_tokens == 250 and out.error is None
    assert core.scheduler.num_preemptions == 0
    assert core.scheduler.programs.stats.yielded == 1 and core.block_manager.num_pinned == 0
    core.block_manager.check()


def test_an_idle_engine_never_waits_out_an_older_programs_pin():
    """24 blocks, the older program's context pinned in 11 (TTL 30 s): a younger program's turn
    needing 16 blocks cannot start beside it. With nothing running, the pin gives way at once
    rather than leaving the engine idle until the pin expires; while something runs, the turn
    waits (the running request may free room first)."""
    core = sim_core(num_blocks=24, programs=ProgramConfig(max_pinned_fraction=0.5, default_ttl_s=30.0))
    turn(core, "old/0", list(range(1, 161)), 17, session="old", more=True)
    finish_all(core)
    assert core.block_manager.num_pinned == 11
    core.clock.t += 1.0
    turn(core, "new/0", list(range(500, 756)), 1, session="new", more=True)
    start = core.clock.t
    for _ in range(50):  # the old rule stepped an idle engine here until the pin expired
        done = {o.req_id: o for o in core.step() if o.finished}.get("new/0")
        if done is not None:
            break
    assert done is not None and done.error is None and done.first_scheduled_time - start < 1.0
    table = core.scheduler.programs
    assert table.stats.yielded == 1 and table.stats.expired == 0 and "old" not in table.pinned
    core.block_manager.check()


def test_pins_hold_at_most_their_share_and_older_programs_keep_theirs():
    core = sim_core(num_blocks=40, programs=ProgramConfig(max_pinned_fraction=0.5))  # 20 blocks of pins
    for name in ("old", "new"):
        turn(core, f"{name}/0", [ord(name[0])] * 160, 1, session=name, more=True)  # 10 blocks each
        core.clock.t += 0.01
    finish_all(core)
    assert core.block_manager.num_pinned == 20
    turn(core, "third/0", [3] * 160, 1, session="third", more=True)
    finish_all(core)
    table = core.scheduler.programs
    assert core.block_manager.num_pinned == 20
    assert [p for p, prog in table.programs.items() if prog.pin] == ["old", "new"]  # the youngest gives way
    assert table.stats.displaced == 0 and table.stats.pins == 2  # nothing older to displace: not pinned
    core.block_manager.check()


def test_program_level_fcfs_with_aging():
    core = sim_core(programs=ProgramConfig(aging_s=5.0), max_num_seqs=1)
    turn(core, "a/0", [1] * 30, 1, session="a", more=True)
    finish_all(core)
    core.clock.t = 10.0
    turn(core, "blocker", [2] * 30, 50)  # holds the only slot
    core.step()
    core.clock.t = 11.0
    turn(core, "b/0", [3] * 30, 1, session="b", more=True)  # a new program, waiting first
    core.clock.t = 12.0
    turn(core, "a/1", [1] * 30 + [0, 9, 9], 1, session="a", more=True)  # the older program returns
    done = finish_all(core)
    assert done["a/1"].first_scheduled_time < done["b/0"].first_scheduled_time  # program-level FCFS

    # aging: a new program that has waited longer than aging_s goes first
    core.clock.t = 100.0
    turn(core, "blocker2", [4] * 30, 400)
    core.step()
    turn(core, "c/0", [5] * 30, 1, session="c")
    core.clock.t = 106.0
    turn(core, "a/2", [1] * 30 + [0, 9, 9, 0, 8], 1, session="a")
    done = finish_all(core)
    assert done["c/0"].first_scheduled_time < done["a/2"].first_scheduled_time

    baseline = sim_core(programs=ProgramConfig(scheduling="none"), max_num_seqs=1)
    turn(baseline, "a/0", [1] * 30, 1, session="a", more=True)
    finish_all(baseline)
    baseline.clock.t = 10.0
    turn(baseline, "blocker", [2] * 30, 50)
    baseline.step()
    baseline.clock.t = 11.0
    turn(baseline, "b/0", [3] * 30, 1, session="b", more=True)
    baseline.clock.t = 12.0
    turn(baseline, "a/1", [1] * 30 + [0, 9, 9], 1, session="a", more=True)
    done = finish_all(baseline)
    assert done["b/0"].first_scheduled_time < done["a/1"].first_scheduled_time  # request-level FCFS


def test_aborted_turn_keeps_nothing_pinned():
    core = sim_core()
    turn(core, "a/0", list(range(1, 100)), 50, session="a", more=True)
    core.step()
    core.step()
    core.abort("a/0")
    finish_all(core)
    assert core.block_manager.num_pinned == 0 and "a" not in core.scheduler.programs.programs
    core.block_manager.check()


def test_program_config_errors():
    with pytest.raises(ValueError, match="none, continuum"):
        ProgramConfig(scheduling="lifo")
    with pytest.raises(ValueError, match="unknown program option"):
        ProgramConfig.from_dict({"agin_s": 1})
    with pytest.raises(ValueError, match="bad program option"):
        ProgramConfig.from_dict({"aging_s": "ten"})
    with pytest.raises(ValueError, match="max_pinned_fraction"):
        ProgramConfig(max_pinned_fraction=1.5)
    with pytest.raises(TypeError, match="more_turns"):
        RequestMetadata(more_turns="yes")


# ---- the agent trace format ---------------------------------------------------------------------


def test_agent_trace_round_trips(tmp_path):
    progs = agent.generate("bfcl", num_programs=12, rate=2.0, seed=3, tenants={"x": 1, "y": 1})
    path = tmp_path / "t.jsonl"
    agent.dump(progs, path)
    wl = agent.load(path)
    assert wl.programs == sorted(progs, key=lambda p: (p.arrival_s, p.program_id))
    assert wl.description["num_turns"] == sum(len(p.turns) for p in progs)
    assert {p.tenant for p in progs} == {"x", "y"}
    assert all(p.turns[-1].tool_s == 0 and all(t.tool for t in p.turns[:-1]) for p in progs)
    clipped = agent.load(path, max_context=3000)
    assert all(p.context_before(len(p.turns) - 1) + p.turns[-1].output_tokens <= 3000 for p in clipped.programs)


@pytest.mark.parametrize("line, message", [
    ("{not json", ": not JSON"),
    ('{"program_id": "p", "arrival_s": 0, "turns": []}', "turns must be a non-empty list"),
    ('{"program_id": "p", "arrival_s": -1, "turns": [{"prompt_tokens": 1, "output_tokens": 1}]}', "arrival_s"),
    ('{"program_id": "p", "arrival_s": 0, "turns": [{"prompt_tokens": 0, "output_tokens": 1}]}', "turn 0: prompt_tokens"),
    ('{"program_id": "p", "arrival_s": 0, "turns": [{"prompt_tokens": 2, "output_tokens": 1, "tool_s": "x"}]}', "tool_s"),
    ('{"program_id": "p", "arrival_s": 0, "turns": [{"prompt_tokens": 2, "output_tokens": 1}], "colour": 1}', "unknown fields"),
    ('{"program_id": "", "arrival_s": 0, "turns": [{"prompt_tokens": 2, "output_tokens": 1}]}', "program_id"),
])
def test_malformed_agent_trace_is_rejected_clearly(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"program_id": "ok", "arrival_s": 0, "turns": [{"prompt_tokens": 2, "output_tokens": 1}]}\n'
                    + line + "\n")
    with pytest.raises(agent.TraceError, match=message) as err:
        agent.load(path)
    assert f"{path}:2" in str(err.value)


def test_duplicate_program_ids_are_rejected(tmp_path):
    line = json.dumps({"program_id": "p", "arrival_s": 0, "turns": [{"prompt_tokens": 2, "output_tokens": 1}]})
    path = tmp_path / "dup.jsonl"
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(agent.TraceError, match="appears twice"):
        agent.load(path)


# ---- the simulator and the engine decide alike -----------------------------------------------------


class TimedExecutor:
    """The real executor, then the virtual clock moved by the cost model's time for the plan (as
    the simulator's executor does), so the real engine sees the simulator's times."""

    def __init__(self, inner, clock: VirtualClock) -> None:
        self.inner, self.clock = inner, clock

    def execute(self, plan, states):
        result = self.inner.execute(plan, states)
        self.clock.t += COST.step_time(plan)
        return result

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_simulator_and_engine_make_the_same_pin_decisions(tiny_model_dir):
    progs = agent.generate("bfcl", num_programs=6, rate=1.0, seed=5, scale_tokens=0.12, turns_mean=4)
    wl = agent.AgentWorkload("agent", progs, {})
    num_blocks = 40  # contended: pins are made, used, and yield
    programs = ProgramConfig(max_pinned_fraction=0.5, default_ttl_s=0.5)

    config, state = load_checkpoint(tiny_model_dir, dtype=torch.float32)
    clock = VirtualClock()
    engine = Engine(EngineConfig(dtype="float32", device="cpu", block_size=BS, num_blocks=num_blocks,
                                 num_swap_blocks=64, max_num_seqs=8, programs=programs, preemption_mode="recompute"),
                    model=LlamaModel.from_state_dict(config, state), clock=clock)
    engine.executor = TimedExecutor(engine.executor, clock)
    real, _ = real_agent_run(engine, wl, clock=clock)

    spec = InstanceSpec(COST, num_blocks=num_blocks, block_size=BS, num_swap_blocks=0, max_num_seqs=8,
                        max_model_len=engine.max_model_len, vocab_size=engine.vocab_size, programs=programs)
    sim, _, sims = simulate(wl, [spec], "round_robin")

    key = lambda r: (r.program_id, r.turn)  # noqa: E731
    assert [(key(r), r.cached_tokens, r.output_tokens) for r in sorted(real, key=key)] == \
        [(key(r), r.cached_tokens, r.output_tokens) for r in sorted(sim, key=key)]
    real_stats, sim_stats = engine.scheduler.programs.stats, sims[0].engine.scheduler.programs.stats
    assert real_stats == sim_stats
    assert real_stats.pins > 0 and real_stats.pin_hits > 0
    engine.block_manager.check()


# ---- the commands ---------------------------------------------------------------------------------


def test_agent_trace_command_and_sim_compare_the_two_schedulings(tmp_path):
    """``bench agent-trace`` writes what ``generate`` makes; ``sim --workload agent:PATH`` reports
    the programs under either ``--program-scheduling``, and only ``continuum`` pins."""
    trace = tmp_path / "t.jsonl"
    r = cli("bench", "agent-trace", str(trace), "--preset", "bfcl", "-n", "6", "--rate", "2", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert agent.load(trace).programs == agent.generate("bfcl", 6, 2.0, 3)
    assert json.loads(r.output)["programs"] == 6
    results = {}
    for sched in ("none", "continuum"):
        out = tmp_path / sched
        r = cli("sim", "--workload", f"agent:{trace}", "--num-blocks", "200", "--program-scheduling", sched,
                "--program-config", '{"aging_s": 5}', "--out", str(out))
        assert r.exit_code == 0, r.output
        results[sched] = json.loads((out / "result.json").read_text())
    for sched, res in results.items():
        p = res["programs"]
        assert p["scheduling"] == sched and p["completed"] == 6 and res["workload"]["kind"] == "agent"
        assert p["jct_s"]["mean"] > 0
    assert results["none"]["programs"]["pins"] == 0 < results["continuum"]["programs"]["pins"]


@pytest.mark.parametrize("args, message", [
    (["--program-scheduling", "lru"], "'lru' is not one of 'continuum', 'none'"),
    (["--program-config", '{"max_pinned": 1}'], "unknown program option"),
    (["--program-config", '[1]'], "JSON object"),
    (["--program-config", '{"aging_s": '], "not valid JSON"),
])
def test_bad_program_options_are_refused_before_anything_loads(tmp_path, args, message):
    for command in (["sim", "--out", str(tmp_path)], ["serve", "--model", str(tmp_path / "absent.gguf")]):
        r = cli(*command, *args)
        assert r.exit_code == 2, r.output
        assert message in r.output


def test_sim_refuses_tenant_options_with_an_agent_trace(tmp_path):
    trace = tmp_path / "t.jsonl"
    agent.dump(agent.generate("bfcl", 2, 1.0, 0), trace)
    r = cli("sim", "--workload", f"agent:{trace}", "--tenants", "a=1", "--out", str(tmp_path))
    assert r.exit_code == 2 and "carries its own" in r.output
    r = cli("sim", "--workload", f"agent:{tmp_path / 'nope.jsonl'}", "--out", str(tmp_path))
    assert r.exit_code == 2 and "not found" in r.output
