"""Weighted fair share (VTC) in the engine scheduler, on hand-built scenarios (no model): the
scheduler is driven like ``EngineCore.step`` by a small loop that appends one token per sampled
chunk and ends requests at ``max_tokens``."""

from __future__ import annotations

from collections import Counter

import pytest

from shoal.engine.block_manager import BlockManager
from shoal.engine.cost_model import FEATURES, LinearCostModel
from shoal.engine.fair_share import VirtualTokenCounter
from shoal.engine.metadata import RequestMetadata
from shoal.engine.request import Request, Status
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import FAIR_PREFILL_FLOOR, FIRST_TOKEN_STEPS_IN_A_ROW, Scheduler, SchedulerConfig, StepPlan
from shoal.engine.step_budget import PrefillStretch


class Loop:
    """A scheduler over a roomy KV pool; ``served`` counts prompt + output tokens per tenant."""

    def __init__(self, policy: str = "vtc", max_num_seqs: int = 2, budget: int = 64, blocks: int = 512, **cfg) -> None:
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                               policy=policy, **cfg), BlockManager(blocks, 4, 0, False))
        self.reqs: dict[str, Request] = {}
        self.first_token: dict[str, int] = {}
        self.tenant_of: dict[str, str | None] = {}
        self.served: Counter[str | None] = Counter()
        self.steps = 0
        self.n = 0

    def add(self, tenant: str | None, prompt: int = 8, out: int = 8, weight: float = 1.0, priority: int = 0) -> str:
        rid = f"{tenant}-{self.n}"
        self.n += 1
        req = Request(rid, list(range(1, prompt + 1)), SamplingParams(max_tokens=out), float(self.steps),
                      priority=priority, metadata=RequestMetadata(priority=priority, tenant=tenant, weight=weight))
        self.reqs[rid] = req
        self.tenant_of[rid] = tenant
        self.sched.add(req)
        return rid

    def step(self) -> StepPlan:
        plan = self.sched.schedule(float(self.steps))
        self.sched.commit(plan, self.reqs)
        for c in plan.chunks:
            req = self.reqs[c.req_id]
            self.served[req.tenant] += c.num_tokens
            if c.sample:
                req.output_token_ids.append(7)
                self.first_token.setdefault(c.req_id, self.steps)
                if len(req.output_token_ids) >= req.params.max_tokens:
                    self.sched.remove(req)
                    req.status = Status.FINISHED
                    del self.reqs[c.req_id]
        self.steps += 1
        return plan

    def prefill_tokens(self, plan: StepPlan) -> Counter:
        """A step's prefill tokens per tenant (chunks that are not single decodes)."""
        tokens = Counter()
        for c in plan.chunks:
            if not (c.num_tokens == 1 and c.sample):
                tokens[self.tenant_of[c.req_id]] += c.num_tokens
        return tokens

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def test_a_light_tenant_is_served_before_a_heavy_backlog():
    loop = Loop(max_num_seqs=2)
    heavy = [loop.add("heavy") for _ in range(20)]
    loop.run(3)
    light = loop.add("light")
    loop.run(40)
    # Under VTC the light request starts as soon as a slot frees, ahead of heavy's queued ones.
    started_after = [h for h in heavy if loop.first_token.get(h, 1 << 30) > loop.first_token[light]]
    assert len(started_after) >= 15
    fcfs = Loop(policy="priority", max_num_seqs=2)
    heavy = [fcfs.add("heavy") for _ in range(20)]
    fcfs.run(3)
    light = fcfs.add("light")
    fcfs.run(200)
    assert all(fcfs.first_token[h] <= fcfs.first_token[light] for h in heavy)  # FCFS: behind all 20


def test_weighted_tenants_share_tokens_by_weight_while_both_are_backlogged():
    loop = Loop(max_num_seqs=4, budget=16)
    for _ in range(200):
        loop.add("gold", weight=3.0)
        loop.add("bronze", weight=1.0)
    loop.run(300)
    assert loop.reqs  # both still backlogged
    ratio = loop.served["gold"] / loop.served["bronze"]
    assert 2.7 <= ratio <= 3.3, ratio


def test_a_lone_tenant_gets_the_whole_engine():
    alone, fcfs = Loop(max_num_seqs=4), Loop(policy="fcfs", max_num_seqs=4)
    for loop in (alone, fcfs):
        for _ in range(12):
            loop.add("only")
        loop.run(60)
    assert alone.served == fcfs.served and alone.first_token == fcfs.first_token  # work-conserving, same order


def test_a_late_tenant_neither_starves_nor_is_starved():
    loop = Loop(max_num_seqs=2, budget=32)
    for _ in range(100):
        loop.add("early")
    loop.run(100)
    early_before = loop.served["early"]
    for _ in range(100):
        loop.add("late")
    loop.run(100)
    late = loop.served["late"]
    early = loop.served["early"] - early_before
    # The late tenant did not bank the early one's head start (it would then run alone for 100
    # steps), and is not starved either: the two now share about equally.
    assert early > 0 and late > 0
    assert 0.7 <= late / early <= 1.4, (late, early)


def test_an_idle_tenant_earns_no_credit():
    vtc = VirtualTokenCounter()
    vtc.charge("a", 1000, 0, 1.0)
    vtc.arrive("b", backlogged={"a"})  # b was never served: it starts level with a, not 1000 behind
    assert vtc.value("b") == vtc.value("a") == 1000
    vtc.charge("a", 500, 0, 1.0)
    vtc.arrive("b", backlogged={"a"})  # b has requests? no: still idle, lifted again
    assert vtc.value("b") == 1500


def test_fair_preemption_frees_a_slot_held_by_long_decodes():
    """A tenant whose long decodes hold every slot is preempted once it is ahead by the gap."""
    loop = Loop(max_num_seqs=2, budget=64, fair_preempt_tokens=64)
    hogs = [loop.add("hog", out=500) for _ in range(2)]
    loop.run(5)
    light = loop.add("light")
    loop.run(60)
    assert light in loop.first_token and loop.first_token[light] - 5 < 40
    assert loop.sched.num_preemptions >= 1 and all(h in loop.reqs for h in hogs)
    plain = Loop(max_num_seqs=2, budget=64, fair_preempt_tokens=None)
    [plain.add("hog", out=500) for _ in range(2)]
    plain.run(5)
    light = plain.add("light")
    plain.run(60)
    assert light not in plain.first_token and plain.sched.num_preemptions == 0


def _plan_tenants(loop: Loop) -> Counter:
    """The next step's chunks per (tenant, kind), without running it."""
    plan = loop.sched.schedule(float(loop.steps))
    loop.sched.commit(plan, loop.reqs)
    kinds = Counter()
    for c in plan.chunks:
        req = loop.reqs[c.req_id]
        kinds[req.tenant, "decode" if c.num_tokens == 1 and c.sample else "prefill"] += 1
        if c.sample:
            req.output_token_ids.append(7)
    loop.steps += 1
    return kinds


@pytest.mark.parametrize("on", [True, False])
def test_a_tenant_behind_in_fair_share_gets_its_first_token_in_a_step_of_its_own(on):
    """Heavy's decodes fill the batch; a light prompt arrives. Its prefill runs without heavy's
    decodes (which wait that one step), so its first token does not wait for
    a step carrying every decode. Off, the light prefill shares the step with all of them."""
    loop = Loop(max_num_seqs=8, budget=64, fair_first_token=on)
    for _ in range(6):
        loop.add("heavy", prompt=8, out=100)
    loop.run(3)
    assert _plan_tenants(loop) == Counter({("heavy", "decode"): 6})
    loop.add("light", prompt=8, out=4)
    step = _plan_tenants(loop)
    if on:
        assert step == Counter({("light", "prefill"): 1})
        assert _plan_tenants(loop) == Counter({("heavy", "decode"): 6, ("light", "decode"): 1})
    else:
        assert step == Counter({("heavy", "decode"): 6, ("light", "prefill"): 1})


@pytest.mark.parametrize("prompt, budget", [(8, 256), (16, 16)])  # (16, 16): the prompt takes the whole budget
def test_first_token_steps_hold_a_tenant_back_a_bounded_number_of_steps_running(prompt, budget):
    """Light prompts arriving every step (a heavy weight keeps their tenant behind) get first-token
    steps at most ``FIRST_TOKEN_STEPS_IN_A_ROW`` in a row, then heavy runs."""
    loop = Loop(max_num_seqs=64, budget=budget)
    for _ in range(30):
        loop.add("heavy", prompt=8, out=200)
    loop.run(3)
    heavy_stalls = []
    for _ in range(10):
        loop.add("light", prompt=prompt, out=2, weight=100.0)
        step = _plan_tenants(loop)
        heavy_stalls.append(step[("heavy", "decode")] + step[("heavy", "prefill")] == 0)
    runs = "".join("x" if stalled else "." for stalled in heavy_stalls).split(".")
    assert sum(heavy_stalls) >= 5
    assert max(len(run) for run in runs) == FIRST_TOKEN_STEPS_IN_A_ROW


def test_a_second_light_prompt_a_step_later_also_starts_alone():
    """Two light prompts arriving a step apart: the second also gets a step without heavy's
    decodes (it could not join the first one's), and heavy then runs. (Light's weight keeps it
    behind after its prompts are charged.)"""
    loop = Loop(max_num_seqs=10, budget=64)
    for _ in range(6):
        loop.add("heavy", prompt=8, out=100)
    loop.add("light", prompt=8, out=100, weight=100.0)
    loop.run(3)
    loop.add("light", prompt=8, out=20, weight=100.0)
    assert _plan_tenants(loop) == Counter({("light", "prefill"): 1, ("light", "decode"): 1})
    loop.add("light", prompt=8, out=20, weight=100.0)
    assert _plan_tenants(loop) == Counter({("light", "prefill"): 1, ("light", "decode"): 2})
    assert _plan_tenants(loop) == Counter({("heavy", "decode"): 6, ("light", "decode"): 3})


def test_running_prefills_take_the_step_in_fair_share_order():
    """Two long prompts in prefill at once: the tenant behind in fair share gets the step's tokens
    first, not the prompt that arrived first, so a heavy tenant's long prompt does not hold a light
    tenant's half-done one back for its whole length."""
    loop = Loop(max_num_seqs=4, budget=64)
    loop.add("light", prompt=8, out=100)
    loop.add("heavy", prompt=600, out=4)
    loop.run(2)
    loop.add("light", prompt=300, out=4)
    assert loop.prefill_tokens(loop.step()) == Counter({"light": 64})  # its first-token step
    for _ in range(3):
        assert loop.prefill_tokens(loop.step()) == Counter({"light": 63})  # beside light's decode


def test_a_backlogged_tenant_gets_no_first_token_steps():
    """A tenant with more waiting than its slot share has room for is served by the ordinary
    admission: heavy's long queue never holds the light tenant's running decodes back."""
    loop = Loop(max_num_seqs=8, budget=64)
    for _ in range(3):
        loop.add("light", prompt=8, out=300)
    loop.run(2)
    for _ in range(40):
        loop.add("heavy", prompt=8, out=300)
    for _ in range(30):
        assert _plan_tenants(loop)[("light", "decode")] == 3


@pytest.mark.parametrize("cap", [None, 16])
def test_a_prefill_cap_keeps_the_steps_of_the_tenants_ahead_short(cap):
    """Heavy, ahead in fair share, decodes 20 requests and starts a 200-token prompt while light
    (behind) decodes one. With ``fair_prefill_tokens`` heavy's prefill gets at most 16 tokens a step
    while all its decodes still run, and light's own new prompt is not capped. Without it heavy's
    prompt takes the rest of the budget."""
    loop = Loop(max_num_seqs=64, budget=128, fair_prefill_tokens=cap, fair_first_token=False)
    loop.add("light", prompt=8, out=300)
    for _ in range(20):
        loop.add("heavy", prompt=8, out=300)
    loop.run(5)
    assert loop.sched.fair.value("heavy") > loop.sched.fair.value("light")
    loop.add("heavy", prompt=200, out=4)
    plan = loop.step()
    assert plan.num_decodes == 21
    assert loop.prefill_tokens(plan)["heavy"] == (16 if cap else 128 - 21)
    if cap:
        loop.add("light", prompt=100, out=4)
        plan = loop.step()
        assert plan.num_decodes == 21
        assert loop.prefill_tokens(plan) == Counter({"heavy": 16, "light": 128 - 21 - 16})


def test_the_prefill_cap_counts_every_chunk_of_the_tenants_ahead():
    """Heavy's 15-token prompts against a cap of 16: the first takes 15, the next one token, and the
    rest wait (a one-token chunk counts too), step after step."""
    loop = Loop(max_num_seqs=64, budget=128, fair_prefill_tokens=16, fair_first_token=False)
    loop.add("light", prompt=8, out=300)
    for _ in range(3):  # heavy holds more of the batch than light
        loop.add("heavy", prompt=40, out=300)
    loop.run(3)
    assert loop.sched.fair.value("heavy") > loop.sched.fair.value("light")
    for _ in range(12):
        loop.add("heavy", prompt=15, out=300)
    for _ in range(8):
        assert loop.prefill_tokens(loop.step())["heavy"] == 16


def _stretch(token_s: float, fraction: float) -> PrefillStretch:
    """A cost model of 10 ms a step plus ``token_s`` a token, and the stretch ``fraction`` on it."""
    coefficients = [0.0] * len(FEATURES)
    coefficients[FEATURES.index("intercept")], coefficients[FEATURES.index("tokens")] = 0.010, token_s
    return PrefillStretch(LinearCostModel(coefficients), fraction)


@pytest.mark.parametrize("token_s, heavy_tokens", [(1e-3, 37), (1e-5, 128 - 21)])
def test_a_prefill_stretch_lengthens_a_step_by_at_most_its_fraction(token_s, heavy_tokens):
    """The same scene as above with ``fair_prefill_stretch`` 0.5: a full decode step (64 decodes)
    takes 10 + 64 x ``token_s`` ms, and heavy's prefill may add half of that to the step of 21
    decodes. Where a token costs 1 ms (prefill is dear, as on a CPU) that is 37 tokens; where it
    costs 0.01 ms, all the budget has room for. Light's new prompt is not capped."""
    stretch = _stretch(token_s, 0.5)
    loop = Loop(max_num_seqs=64, budget=128, fair_prefill_stretch=stretch, fair_first_token=False)
    loop.add("light", prompt=8, out=300)
    for _ in range(20):
        loop.add("heavy", prompt=8, out=300)
    loop.run(5)
    loop.add("heavy", prompt=200, out=4)
    plan = loop.step()
    assert plan.num_decodes == 21 and loop.prefill_tokens(plan)["heavy"] == heavy_tokens
    decodes_only, full = 0.010 + 21 * token_s, 0.010 + 64 * token_s
    assert stretch.cost_model.step_time(plan) <= decodes_only + 0.5 * full + 1e-12
    loop.add("light", prompt=100, out=4)
    tokens = loop.prefill_tokens(loop.step())
    assert tokens["heavy"] <= heavy_tokens and tokens["light"] == 128 - 21 - tokens["heavy"] > 0


@pytest.mark.parametrize("tokens, heavy_tokens", [(10, 10), (40, 37)])
def test_with_both_prefill_caps_the_tighter_one_holds(tokens, heavy_tokens):
    """The stretch of the test above leaves heavy 37 tokens: a token cap of 10 cuts that to 10, one
    of 40 leaves it at 37."""
    loop = Loop(max_num_seqs=64, budget=128, fair_prefill_stretch=_stretch(1e-3, 0.5), fair_prefill_tokens=tokens,
                fair_first_token=False)
    loop.add("light", prompt=8, out=300)
    for _ in range(20):
        loop.add("heavy", prompt=8, out=300)
    loop.run(5)
    loop.add("heavy", prompt=200, out=4)
    assert loop.prefill_tokens(loop.step())["heavy"] == heavy_tokens


@pytest.mark.parametrize("fraction", [0.01, 0.07])
def test_a_prefill_stretch_still_moves_the_prompts_of_the_tenants_ahead(fraction):
    """A stretch with room for no token (0.01 of a 74 ms full step) or for 5 (0.07) still lets the
    tenants ahead prefill ``FAIR_PREFILL_FLOOR`` tokens a step, so their prompts are never stuck
    behind a tenant that only decodes."""
    loop = Loop(max_num_seqs=64, budget=128, fair_prefill_stretch=_stretch(1e-3, fraction), fair_first_token=False)
    loop.add("light", prompt=8, out=300)
    for _ in range(3):  # heavy holds more of the batch than light
        loop.add("heavy", prompt=40, out=300)
    loop.run(3)
    for _ in range(3):
        loop.add("heavy", prompt=100, out=300)
    for _ in range(6):
        assert loop.prefill_tokens(loop.step())["heavy"] == FAIR_PREFILL_FLOOR


def test_a_tenant_holding_less_of_the_batch_is_never_prefill_capped():
    """Light, running one request beside heavy's ten, is admitted a long prompt: charged on
    admission, it lifts light's counter past heavy's, yet light holds less of the batch, so the rest
    of its prompt is not capped (only the tenants that fill the batch are)."""
    loop = Loop(max_num_seqs=64, budget=128, fair_prefill_tokens=16, fair_first_token=False)
    for _ in range(10):
        loop.add("heavy", prompt=8, out=300)
    loop.add("light", prompt=8, out=300)
    loop.run(3)
    loop.add("light", prompt=400, out=4)
    loop.step()
    assert loop.sched.fair.value("light") > loop.sched.fair.value("heavy")
    assert loop.prefill_tokens(loop.step())["light"] == 128 - 11


def test_a_lone_tenant_is_never_prefill_capped():
    loop = Loop(max_num_seqs=64, budget=128, fair_prefill_tokens=16)
    for _ in range(20):
        loop.add("heavy", prompt=8, out=300)
    loop.run(5)
    loop.add("heavy", prompt=200, out=4)
    assert loop.prefill_tokens(loop.step())["heavy"] == 128 - 20


def test_shoal_sim_takes_the_prefill_cap(tmp_path):
    import json

    from tests._cli_util import cli

    r = cli("sim", "--tenants", "heavy=10,light=1", "--num-requests", "40", "--rate", "8", "--fair-prefill-tokens", "32",
            "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["fair_prefill_tokens"] == 32
    assert set(result["tenants"]["by_tenant"]) == {"heavy", "light"}
    r = cli("sim", "--fair-prefill-tokens", "0", "--out", str(tmp_path))
    assert r.exit_code == 2 and "fair-prefill-tokens" in r.output
    r = cli("sim", "--tenants", "heavy=10,light=1", "--num-requests", "40", "--rate", "8", "--fair-prefill-stretch",
            "0.25", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "result.json").read_text())["fair_prefill_stretch"] == 0.25
    r = cli("sim", "--fair-prefill-stretch", "0", "--out", str(tmp_path))
    assert r.exit_code == 2 and "fair-prefill-stretch" in r.output


def test_priority_still_comes_before_fair_share():
    loop = Loop(max_num_seqs=1)
    loop.add("light", priority=5)
    loop.run(1)
    for _ in range(5):
        loop.add("heavy", priority=0)
    loop.run(200)
    firsts = sorted(loop.first_token.items(), key=lambda kv: kv[1])
    assert [rid.split("-")[0] for rid, _ in firsts] == ["light"] + ["heavy"] * 5
    # the light request was preempted for the better-priority heavy ones, which then ran first
    assert loop.sched.num_preemptions >= 1


def test_fcfs_ignores_priority():
    loop = Loop(policy="fcfs", max_num_seqs=1)
    a = loop.add(None, priority=9)
    b = loop.add(None, priority=-9)
    loop.run(40)
    assert loop.first_token[a] < loop.first_token[b] and loop.sched.num_preemptions == 0


def test_urgent_slack_admits_a_request_close_to_its_deadline_first():
    loop = Loop(max_num_seqs=1, admission="deadline", urgent_slack_s=3.0)
    relaxed = loop.add(None)
    urgent = loop.add(None)
    loop.reqs[relaxed].deadline = 100.0
    loop.reqs[urgent].deadline = 2.0  # due within the slack window: one level ahead
    loop.run(30)
    assert loop.first_token[urgent] < loop.first_token[relaxed]


def test_bad_weights_and_policies_are_refused():
    with pytest.raises(ValueError, match="weight"):
        RequestMetadata(weight=0)
    with pytest.raises(ValueError, match="weight"):
        RequestMetadata(weight=float("nan"))
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lottery")
    with pytest.raises(ValueError, match="fair_prefill_tokens"):
        SchedulerConfig(fair_prefill_tokens=0)
    with pytest.raises(ValueError, match="stretch"):
        PrefillStretch(LinearCostModel([0.0] * len(FEATURES)), 0.0)


def test_the_simulator_makes_the_engines_decisions_for_one_seeded_tenant_workload():
    """The simulator's instance and a real engine (tiny model), both under VTC with the same KV
    shape, get the same seeded two-tenant requests at the same steps: their step plans match,
    preemptions for fair share included."""
    import random

    from shoal.engine.cost_model import LinearCostModel, default_profile_path
    from shoal.sim.simulator import InstanceSpec, SimInstance
    from tests._server_util import fast_engine

    shape = dict(num_blocks=48, max_num_seqs=4, max_num_batched_tokens=64)
    sim = SimInstance(InstanceSpec(LinearCostModel.load(default_profile_path()), block_size=16, num_swap_blocks=64,
                                   max_model_len=256, vocab_size=49152, **shape)).engine
    real = fast_engine(scheduling_policy="vtc", preemption_mode="swap", **shape)
    rng = random.Random(7)
    arrivals: dict[int, list] = {}
    for i in range(24):
        tenant, step = ("heavy", rng.randrange(0, 3)) if i < 18 else ("light", rng.randrange(4, 30))
        prompt = [rng.randrange(1, 4000) for _ in range(rng.randrange(8, 60))]
        arrivals.setdefault(step, []).append((f"{tenant}{i}", prompt, rng.randrange(4, 40),
                                              RequestMetadata(tenant=tenant, weight=1.0 if tenant == "heavy" else 2.0)))
    plans: dict[str, list] = {"sim": [], "real": []}
    for name, engine in (("sim", sim), ("real", real)):
        for step in range(400):
            for rid, prompt, out, meta in arrivals.get(step, ()):
                engine.add(prompt, SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0), req_id=rid,
                           arrival_time=float(step), metadata=meta)
            if not engine.has_unfinished() and step > max(arrivals):
                break
            engine.step()
            p = engine.last_plan
            plans[name].append(sorted((c.req_id, c.start, c.num_tokens) for c in p.chunks) + sorted(p.preempted))
    assert plans["sim"] == plans["real"]
    assert real.scheduler.num_preemptions > 0  # the scenario exercises fair-share preemption
