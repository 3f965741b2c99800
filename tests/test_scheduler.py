"""Property tests of the engine scheduler under random workloads (no model).

The test plays the runner, like ``EngineCore.step``: ``schedule(now)``, apply the plan's KV copies
to a shadow of the KV content, ``commit``, append a fake sampled token to every chunk that samples,
and finish requests at ``max_tokens`` (or the context length) with ``Scheduler.remove``. The shadow
holds, per device and swap block slot, the token whose KV the runner wrote there, so a chunk that
would attend over wrong KV (bad prefix hit, lost swap, block reused while in use) is caught.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from unittest import mock

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings

from shoal.engine.block_manager import BlockManager
from shoal.engine.preemption import PreemptionCost, PreemptionMode
from shoal.engine.request import FinishReason, Request, Status
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler, SchedulerConfig, StepPlan

MAX_STEPS = 1000
COSTS = {
    "swap": PreemptionCost(force=PreemptionMode.SWAP),
    "recompute": PreemptionCost(force=PreemptionMode.RECOMPUTE),
    "cost": PreemptionCost(),  # swap unless nothing is computed yet
    "cost-recompute-cheap": PreemptionCost(recompute_s_per_token=1e-4, swap_s_per_block=1e-3),
}
BASES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9], [5] * 16]


@dataclass(frozen=True)
class Spec:
    arrival_step: int
    prompt: tuple[int, ...]
    max_tokens: int
    priority: int


@dataclass(frozen=True)
class Workload:
    num_blocks: int
    block_size: int
    num_swap_blocks: int
    prefix_caching: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    cost: str
    priority_aging_s: float | None
    specs: tuple[Spec, ...]
    aborts: tuple[tuple[int, int], ...]  # (step, index into specs)

    @property
    def max_model_len(self) -> int:
        return self.num_blocks * self.block_size


@st.composite
def workloads(draw, priorities=None, aging=None, aborts=True, scarce=False) -> Workload:
    """Random requests over a small KV; ``scarce``: many requests over very few blocks."""
    bs = draw(st.integers(1, 4), label="block_size")
    nb = draw(st.integers(3, 5 if scarce else 8), label="num_blocks")
    max_len = nb * bs
    prios = priorities if priorities is not None else draw(st.sampled_from([[0], [0, 1], [0, 1, 2]]))
    specs = []
    for _ in range(draw(st.integers(4 if scarce else 1, 10), label="num_requests")):
        base = draw(st.sampled_from(BASES))
        head = base[: draw(st.integers(0, len(base)))]
        prompt = head + draw(st.lists(st.integers(0, 3), min_size=3 if scarce else 0, max_size=10))
        prompt = (prompt or [0])[: min(max_len - 1, 24)]  # the engine refuses prompts >= max_model_len
        specs.append(
            Spec(
                arrival_step=draw(st.integers(0, 8)),
                prompt=tuple(prompt),
                max_tokens=draw(st.integers(4 if scarce else 1, 16)),
                priority=draw(st.sampled_from(prios)),
            )
        )
    return Workload(
        num_blocks=nb,
        block_size=bs,
        num_swap_blocks=draw(st.integers(0, 2 * nb), label="num_swap_blocks"),
        prefix_caching=draw(st.sampled_from([True, True, False])),
        max_num_seqs=draw(st.integers(2 if scarce else 1, 6), label="max_num_seqs"),
        max_num_batched_tokens=draw(st.integers(4 if scarce else 1, 24), label="max_num_batched_tokens"),
        cost=draw(st.sampled_from(sorted(COSTS))),
        priority_aging_s=draw(st.sampled_from([None, None, 0.2])) if aging is None else aging or None,
        specs=tuple(specs),
        aborts=tuple(
            draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, len(specs) - 1)), max_size=2))
            if aborts
            else ()
        ),
    )


def fake_token(context: list[int]) -> int:
    """A 'greedy' sample: a pure function of the context, so equal contexts continue equally."""
    return hash(tuple(context[-4:])) % 4


def serialise(plan: StepPlan) -> tuple:
    return (
        tuple((c.req_id, c.start, tuple(c.token_ids), tuple(c.block_table), c.sample) for c in plan.chunks),
        tuple(plan.swap_out),
        tuple(plan.swap_in),
        tuple((r, m.value) for r, m in plan.preempted),
    )


def is_decode(chunk) -> bool:
    return chunk.num_tokens == 1 and chunk.sample


class Sim:
    """Runs one workload through a scheduler, checking every step."""

    def __init__(self, wl: Workload, dt: float = 0.05, check: bool = True) -> None:
        self.wl, self.dt, self.check = wl, dt, check
        self.bm = BlockManager(wl.num_blocks, wl.block_size, wl.num_swap_blocks, wl.prefix_caching)
        self.sched = Scheduler(
            SchedulerConfig(
                max_num_seqs=wl.max_num_seqs,
                max_num_batched_tokens=wl.max_num_batched_tokens,
                preemption_cost=COSTS[wl.cost],
                priority_aging_s=wl.priority_aging_s,
            ),
            self.bm,
        )
        # A swapped request whose resident prefix is evicted during a step (by an admission before
        # it in the same step) recomputes: seen here, so the checks treat it as evicted before.
        self.recomputed: list[str] = []
        recompute = self.sched.recompute_instead
        self.sched.recompute_instead = lambda req: (self.recomputed.append(req.req_id), recompute(req))[1]
        self.requests: dict[str, Request] = {}  # unfinished, like Engine.requests
        self.all: list[Request] = []
        self.ended: Counter[str] = Counter()
        self.plans: list[tuple] = []
        bs = wl.block_size
        self.dev: list[list[int | None]] = [[None] * bs for _ in range(wl.num_blocks)]
        self.swap: list[list[int | None]] = [[None] * bs for _ in range(wl.num_swap_blocks)]
        self.stats: Counter[str] = Counter()

    # ---- the runner's side ----------------------------------------------------------------------

    def run(self) -> None:
        wl = self.wl
        for step in range(MAX_STEPS):
            now = step * self.dt
            for i, spec in enumerate(wl.specs):
                if spec.arrival_step == step:
                    self._add(i, spec, now)
            for abort_step, i in wl.aborts:
                rid = f"r{i}"
                if abort_step == step and rid in self.requests:
                    self._finish(self.requests[rid], FinishReason.ABORT)
            if step >= max(s.arrival_step for s in wl.specs) and not self.requests:
                break
            self._step(now)
        else:
            stuck = {r.req_id: (r.status, r.num_computed_tokens, r.num_tokens) for r in self.requests.values()}
            raise AssertionError(f"requests never finished: {stuck}")
        if self.check:
            self._check_end()

    def _add(self, i: int, spec: Spec, now: float) -> None:
        req = Request(
            req_id=f"r{i}",
            prompt_token_ids=list(spec.prompt),
            params=SamplingParams(max_tokens=spec.max_tokens),
            arrival_time=now,
            priority=spec.priority,
        )
        self.requests[req.req_id] = req
        self.all.append(req)
        self.sched.add(req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """``Engine._finish``: end exactly once."""
        assert req.req_id in self.requests and not req.finished, f"{req.req_id} ends twice"
        self.sched.remove(req)
        del self.requests[req.req_id]
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.ended[req.req_id] += 1

    def _step(self, now: float) -> None:
        pre = self._snapshot() if self.check else None
        self.recomputed.clear()
        plan = self.sched.schedule(now)
        self.plans.append(serialise(plan))
        if self.check:
            for rid in self.recomputed:
                pre["status"][rid] = Status.WAITING
                pre["evicted_swap"] |= set(pre["swapped"][rid])
            self._check_plan(plan, pre, now)
        if plan.empty:
            return
        self.sched.commit(plan, self.requests)
        if self.check:
            for c in plan.chunks:
                self._write(c)
        for c in plan.chunks:
            if c.sample:
                req = self.requests[c.req_id]
                req.output_token_ids.append(fake_token(req.all_token_ids))
                if len(req.output_token_ids) >= req.params.max_tokens or req.num_tokens >= self.wl.max_model_len:
                    self._finish(req, FinishReason.LENGTH)
        if self.check:
            self._check_state()

    def _write(self, c) -> None:
        bs = self.wl.block_size
        for p, tok in zip(range(c.start, c.context_len), c.token_ids):
            self.dev[c.block_table[p // bs]][p % bs] = tok

    # ---- checks ---------------------------------------------------------------------------------

    def _snapshot(self) -> dict:
        bm, s = self.bm, self.sched
        evicted = {rid for rid in bm.swapped if bm.resident_blocks(rid) is None}  # will recompute
        return {
            "status": {r.req_id: Status.WAITING if r.req_id in evicted else r.status for r in self.requests.values()},
            "resident": {rid: len(p.hashes) for rid, p in bm.resident.items()},
            "computed": {r.req_id: r.num_computed_tokens for r in self.requests.values()},
            "left": {r.req_id: r.num_tokens - r.num_computed_tokens for r in self.requests.values()},
            "preemptions": {r.req_id: r.num_preemptions for r in self.requests.values()},
            "tables": {rid: list(t.blocks) for rid, t in bm.tables.items()},
            "swapped": {rid: list(ids) for rid, ids in bm.swapped.items()},
            "free_swap": set(bm._free_swap),
            "evicted_swap": {b for rid in evicted for b in bm.swapped[rid]},
            "running": list(s.running),
            "candidates": list(s.waiting) + list(s.swapped),
            "oldest": min(self.requests.values(), key=lambda r: r.sort_key, default=None),
        }

    def _eff(self, req: Request, now: float) -> tuple[float, float, str]:
        prio = float(req.priority)
        if self.wl.priority_aging_s:
            prio -= (now - req.arrival_time) // self.wl.priority_aging_s
        return (prio, req.arrival_time, req.req_id)

    def _check_plan(self, plan: StepPlan, pre: dict, now: float) -> None:
        wl, bm, bs = self.wl, self.bm, self.wl.block_size
        chunks = {c.req_id: c for c in plan.chunks}
        preempted = dict(plan.preempted)
        status = pre["status"]

        # Budget, batch size, one chunk per request, decodes first.
        assert len(chunks) == len(plan.chunks), "a request appears twice in one plan"
        assert plan.num_tokens <= wl.max_num_batched_tokens
        assert len(self.sched.running) <= wl.max_num_seqs
        kinds = [is_decode(c) for c in plan.chunks]
        assert kinds == sorted(kinds, reverse=True), "decodes must come before prefill chunks"

        # Each chunk: the request's next tokens, over a block table that covers its context.
        for c in plan.chunks:
            req = self.requests.get(c.req_id)
            assert req is not None, f"chunk for ended request {c.req_id}"
            assert req.status is Status.RUNNING and req in self.sched.running
            assert c.req_id not in preempted
            assert c.num_tokens >= 1
            assert c.start == req.num_computed_tokens
            assert c.token_ids == req.all_token_ids[c.start : c.context_len]
            assert c.sample == (c.context_len == req.num_tokens)
            assert c.block_table == bm.table(c.req_id)
            assert len(c.block_table) * bs >= c.context_len
            if status[c.req_id] is not Status.WAITING:
                assert c.start == pre["computed"][c.req_id], "running/swapped progress must be kept"
            else:
                assert c.start % bs == 0 and c.start < req.num_tokens  # prefix-cache hit, if any
                if c.start:
                    self.stats["prefix hit"] += 1

        # Running requests not preempted are served, unless the budget ran out.
        running0 = [r for r in pre["running"] if r.req_id in self.requests]
        for r in running0:
            if r.req_id not in chunks and r.req_id not in preempted:
                assert plan.num_tokens == wl.max_num_batched_tokens, f"{r.req_id} skipped with budget left"

        # Stall-free: running decodes get their token before any prefill chunk does.
        decodes0 = [r for r in running0 if pre["left"][r.req_id] == 1]
        served = [r for r in decodes0 if r.req_id not in preempted]
        starved = [r for r in served if r.req_id not in chunks]
        if len(decodes0) <= wl.max_num_batched_tokens:
            assert not starved, f"decodes {[r.req_id for r in starved]} stalled"
        if starved:
            assert all(is_decode(c) for c in plan.chunks), "a prefill chunk ran while a decode starved"
        for r in served:
            if r.req_id in chunks:
                assert is_decode(chunks[r.req_id])

        # Admission: a prefix of the waiting/swapped queue in (effective) priority order.
        # (With priority aging, a request admitted early may be preempted for a later one of
        # better plain priority in the same step.)
        cands = sorted((r for r in pre["candidates"] if r.req_id in self.requests), key=lambda r: self._eff(r, now))
        admitted = [r for r in cands if r.status is Status.RUNNING or r.req_id in preempted]
        left_out = [r for r in cands if r not in admitted]
        if admitted and left_out:
            assert max(self._eff(r, now) for r in admitted) < min(self._eff(r, now) for r in left_out), (
                "admitted out of priority order"
            )
        for r in admitted:
            assert r.req_id in chunks or r.req_id in preempted, f"{r.req_id} admitted without a chunk"
            if status[r.req_id] is Status.SWAPPED:
                self.stats["swap in"] += 1
        if plan.preempted:
            self.stats["preemption"] += 1

        # Preemption victims.
        victims = [self._req(rid) for rid, _ in plan.preempted]
        # A prefill chunk is only cut short by the budget. (Tokens a preemption gives back are not
        # all reused in the same step, so steps with preemptions are left out.)
        if any(not c.sample for c in plan.chunks) and not victims:
            assert plan.num_tokens == wl.max_num_batched_tokens, "a chunk was cut short with budget left"
        for v, (rid, mode) in zip(victims, plan.preempted):
            assert v.priority == wl.specs[int(rid[1:])].priority, "a preempted request keeps its priority"
            assert v.num_preemptions == pre["preemptions"].get(rid, 0) + 1
            if mode is PreemptionMode.SWAP:
                assert v.status is Status.SWAPPED and v in self.sched.swapped and rid in bm.swapped
                assert rid not in bm.tables
            else:
                assert v.status is Status.WAITING and v in self.sched.waiting
                assert v.num_computed_tokens == 0 and rid not in bm.tables and rid not in bm.swapped
        # The lowest-priority, latest-arrived running requests go first.
        order = sorted(running0, key=lambda r: r.sort_key, reverse=True)
        was_running = [v for v in victims if v in running0]
        assert was_running == order[: len(was_running)], "victims are not the last in priority order"
        if victims and admitted:  # preempted to admit: only for a strictly better plain priority
            best = min(r.priority for r in admitted + left_out[:1])
            for v in victims:
                assert v.priority > best, "admission preempted a request of equal or better priority"
        # No starvation: the oldest request of the best priority, once running, is never preempted.
        oldest = pre["oldest"]
        if oldest is not None and status[oldest.req_id] is Status.RUNNING:
            assert oldest.req_id not in preempted, "the oldest request was preempted"

        # Swap-out pairs: the victim's blocks (its table, plus any it got this step) to free swap blocks.
        i = 0
        for rid, mode in plan.preempted:
            if mode is not PreemptionMode.SWAP:
                continue
            ids = bm.swapped[rid]
            pairs = plan.swap_out[i : i + len(ids)]
            i += len(ids)
            dev = [d for d, _ in pairs]
            assert [s for _, s in pairs] == ids
            before = pre["tables"].get(rid, [])
            kept = len(bm.resident[rid].hashes)  # left in the prefix cache: a preemption for a slot
            assert dev[: max(0, len(before) - kept)] == before[kept:]
            # Swap blocks free before the step, or of a swapped request that recomputes instead
            # (its resident prefix was evicted): nothing reads those.
            assert set(ids) <= pre["free_swap"] | pre["evicted_swap"]
        assert i == len(plan.swap_out), "swap-out pairs of no victim"
        # Swap-in pairs: a swapped request's swap blocks onto blocks it then owns alone.
        i = 0
        for r in admitted:
            if status[r.req_id] is not Status.SWAPPED:
                continue
            ids = pre["swapped"][r.req_id]
            pairs = plan.swap_in[i : i + len(ids)]
            i += len(ids)
            assert [s for s, _ in pairs] == ids
            if r.req_id in preempted:
                continue
            kept = pre["resident"][r.req_id]
            assert bm.table(r.req_id)[kept : kept + len(ids)] == [d for _, d in pairs]
            for _, d in pairs:
                assert bm.blocks[d].ref_count == 1 and bm.blocks[d].hash is None
        assert i == len(plan.swap_in), "swap-in pairs of no request"

        # Shadow KV: run the copies in plan order, then every chunk must see its own tokens.
        for d, s in plan.swap_out:
            self.swap[s] = list(self.dev[d])
        for s, d in plan.swap_in:
            self.dev[d] = list(self.swap[s])
        self._check_content()
        writes: dict[tuple[int, int], str] = {}
        for c in plan.chunks:
            for p in range(c.start, c.context_len):
                blk = bm.blocks[c.block_table[p // bs]]
                assert blk.ref_count == 1 and blk.hash is None, f"{c.req_id} writes a shared block"
                slot = (blk.block_id, p % bs)
                assert slot not in writes, f"{c.req_id} and {writes[slot]} write the same slot"
                writes[slot] = c.req_id
        for c in plan.chunks:
            for p in range(c.start):
                assert (c.block_table[p // bs], p % bs) not in writes, f"{c.req_id} context overwritten"

    def _check_content(self) -> None:
        bs = self.wl.block_size
        for req in self.requests.values():
            if req.status is Status.RUNNING:
                ids, store = self.bm.table(req.req_id), self.dev
            elif req.status is Status.SWAPPED:
                resident = self.bm.resident_blocks(req.req_id)
                if resident is None:  # evicted: it will be recomputed
                    continue
                ids = [(b, self.dev) for b in resident] + [(b, self.swap) for b in self.bm.swapped[req.req_id]]
                tokens = req.all_token_ids
                for p in range(req.num_computed_tokens):
                    b, store = ids[p // bs]
                    assert store[b][p % bs] == tokens[p], f"{req.req_id} KV at {p} is wrong"
                continue
            else:
                continue
            tokens = req.all_token_ids
            for p in range(req.num_computed_tokens):
                assert store[ids[p // bs]][p % bs] == tokens[p], f"{req.req_id} KV at {p} is wrong"

    def _check_state(self) -> None:
        bm, s = self.bm, self.sched
        bm.check()
        assert bm.num_free + bm.num_used == bm.num_blocks
        queues = {Status.WAITING: s.waiting, Status.RUNNING: s.running, Status.SWAPPED: s.swapped}
        listed = [r.req_id for q in queues.values() for r in q]
        assert sorted(listed) == sorted(self.requests), "every unfinished request is in exactly one queue"
        for req in self.requests.values():
            assert req in queues[req.status]
            assert (req.req_id in bm.tables) == (req.status is Status.RUNNING)
            assert (req.req_id in bm.swapped) == (req.status is Status.SWAPPED)
            if req.status is Status.WAITING:
                assert req.num_computed_tokens == 0
        assert len(s.running) <= self.wl.max_num_seqs

    def _check_end(self) -> None:
        bm, s = self.bm, self.sched
        assert sorted(self.ended) == sorted(r.req_id for r in self.all) and set(self.ended.values()) <= {1}
        assert s.num_unfinished == 0 and not bm.tables and not bm.swapped
        bm.check()
        assert bm.num_used == bm.num_pinned == 0
        assert bm.num_free_swap == bm.num_swap_blocks
        # Preemptions stay bounded: each is forced by an older or more urgent request needing
        # a block, so a request is preempted at most about once per block those need.
        bs = self.wl.block_size
        for r in self.all:
            older = [q for q in self.all if q.sort_key < r.sort_key]
            cap = 2 * (1 + sum(-(-(q.num_prompt_tokens + q.params.max_tokens) // bs) for q in older))
            assert r.num_preemptions <= cap, f"{r.req_id} preempted {r.num_preemptions} times"
        for r in self.all:
            assert r.finished and r.priority == self.wl.specs[int(r.req_id[1:])].priority
            if r.finish_reason is FinishReason.LENGTH:
                assert len(r.output_token_ids) == r.params.max_tokens or r.num_tokens == self.wl.max_model_len

    def _req(self, rid: str) -> Request:
        return next(r for r in self.all if r.req_id == rid)


# ---- properties ---------------------------------------------------------------------------------

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(workloads())
def test_random_workloads(wl: Workload):
    sim = Sim(wl)
    sim.run()
    for name, n in sim.stats.items():
        if n:
            event(name)


@settings(SETTINGS, max_examples=300)
@given(workloads(scarce=True))
def test_scarce_kv(wl: Workload):
    """Many requests over a few blocks: preemption, swap and re-admission every few steps."""
    sim = Sim(wl)
    sim.run()
    for name, n in sim.stats.items():
        if n:
            event(name)


@settings(SETTINGS, max_examples=150)
@given(workloads(priorities=[0], aging=False, aborts=False))
def test_equal_priorities_fcfs(wl: Workload):
    """With one priority, requests are admitted first come first served and the oldest running
    request is never preempted (checked every step); every request ends."""
    sim = Sim(wl)
    sim.run()
    first = {r.req_id: r.first_scheduled_time for r in sim.all}
    by_arrival = sorted(sim.all, key=lambda r: r.sort_key)
    assert [first[r.req_id] for r in by_arrival] == sorted(first[r.req_id] for r in by_arrival)


@settings(SETTINGS, max_examples=100)
@given(workloads())
def test_same_clock_same_plans(wl: Workload):
    """Nothing reads the wall clock: the same workload and ``now`` sequence give the same plans,
    even with every clock function unavailable."""

    def no_clock(*_a, **_k):
        raise AssertionError("the scheduler read the wall clock")

    runs = []
    for _ in range(2):
        sim = Sim(wl, check=False)
        with (
            mock.patch.object(time, "time", no_clock),
            mock.patch.object(time, "monotonic", no_clock),
            mock.patch.object(time, "perf_counter", no_clock),
        ):
            sim.run()
        runs.append(sim.plans)
    assert runs[0] == runs[1]
    if not wl.priority_aging_s:  # then ``now`` only stamps times: a different clock, same plans
        other = Sim(wl, dt=7.0, check=False)
        other.run()
        assert other.plans == runs[0]


# ---- targeted examples --------------------------------------------------------------------------


def _wl(specs, **kw) -> Workload:
    base = {"num_swap_blocks": 0, "prefix_caching": True, "cost": "cost", "priority_aging_s": None, "aborts": ()}
    return Workload(specs=tuple(Spec(*s) for s in specs), **{**base, **kw})


# Minimal workloads hypothesis found, one per scheduler bug fixed (each failed before its fix).
REGRESSIONS = {
    # A prompt needing every block never started: the admission watermark applied with nothing running.
    "watermark-alone": _wl(
        [(0, (1, 2, 3, 4, 5), 1, 0)], num_blocks=3, block_size=2, max_num_seqs=1, max_num_batched_tokens=5
    ),
    # Aged priorities preempted running requests of equal priority: two requests preempted each
    # other forever.
    "aging-livelock": _wl(
        [(0, (0,), 5, 0), (0, (0,), 5, 0)],
        num_blocks=3, block_size=3, max_num_seqs=2, max_num_batched_tokens=2, priority_aging_s=0.2,
    ),
    # Swap-in reserved one block past the swapped ones, but a preempted prefill needs more: the
    # scheduler raised NoFreeBlocks (or, with nothing else running, never swapped it back in).
    "swap-in-growth": _wl(
        [(0, (1, 2, 3, 0, 0, 0, 0, 0), 3, 0), (0, (0, 0, 0, 0, 0, 0, 0), 1, 0)]
        + [(0, (0,), 1, 0)] * 3,
        num_blocks=8, block_size=2, num_swap_blocks=1, max_num_seqs=2, max_num_batched_tokens=9,
    ),
    # A swap-out after a swap-in in the same step reused the swap blocks the swap-in still had
    # to read (the runner copies out before in).
    "swap-block-reuse": _wl(
        [(1, (0,), 1, 0), (1, (0, 0, 0, 0), 1, 1), (1, (0,), 1, 0), (1, (0,), 1, 0), (3, (0,), 1, 0), (3, (0,), 1, 0)],
        num_blocks=3, block_size=2, num_swap_blocks=2, max_num_seqs=2, max_num_batched_tokens=2,
        priority_aging_s=0.2,
    ),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regressions(name: str):
    Sim(REGRESSIONS[name]).run()


def _sched(num_blocks=16, block_size=4, num_swap=16, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**kw), BlockManager(num_blocks, block_size, num_swap))


def _req(rid: str, n: int, t: float, priority: int = 0, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(100 + n, 100 + 2 * n)), SamplingParams(max_tokens=max_tokens), t, priority)


def _run_step(s: Scheduler, reqs: dict[str, Request], now: float) -> StepPlan:
    plan = s.schedule(now)
    s.commit(plan, reqs)
    for c in plan.chunks:
        if c.sample:
            reqs[c.req_id].output_token_ids.append(0)
    return plan


def test_long_prompt_is_chunked_behind_running_decodes():
    s = _sched(max_num_batched_tokens=8, max_num_seqs=8)
    reqs = {r.req_id: r for r in (_req("a", 3, 0.0), _req("b", 2, 0.0))}
    for r in reqs.values():
        s.add(r)
    _run_step(s, reqs, 0.0)  # both prefilled: now decoding
    reqs["long"] = _req("long", 40, 1.0)
    s.add(reqs["long"])
    for step in range(4):
        plan = _run_step(s, reqs, 1.0 + step)
        assert [c.req_id for c in plan.chunks] == ["a", "b", "long"]
        assert [c.num_tokens for c in plan.chunks] == [1, 1, 6]
        assert plan.chunks[2].start == 6 * step


def test_better_priority_preempts_when_kv_is_scarce():
    s = _sched(num_blocks=4, block_size=4, num_swap=0, max_num_batched_tokens=64)
    low = _req("low", 10, 0.0, priority=1)
    reqs = {"low": low}
    s.add(low)
    _run_step(s, reqs, 0.0)
    urgent = _req("urgent", 10, 1.0, priority=0)
    reqs["urgent"] = urgent
    s.add(urgent)
    plan = _run_step(s, reqs, 1.0)
    assert plan.preempted == [("low", PreemptionMode.RECOMPUTE)]
    assert [c.req_id for c in plan.chunks] == ["urgent"]
    assert low.status is Status.WAITING and low.priority == 1 and low.num_preemptions == 1
    s.bm.check()


def test_preemption_picks_the_cheaper_of_swap_and_recompute():
    swap, recompute = PreemptionMode.SWAP, PreemptionMode.RECOMPUTE
    cost = PreemptionCost(recompute_s_per_token=1e-3, swap_s_per_block=4e-3)
    assert cost.choose(num_computed_tokens=160, num_blocks=10, swap_blocks_free=100) is swap  # 40 ms vs 160 ms
    assert cost.choose(num_computed_tokens=3, num_blocks=1, swap_blocks_free=100) is recompute  # 4 ms vs 3 ms
    cheap_prefill = PreemptionCost(recompute_s_per_token=1e-4, swap_s_per_block=4e-3)
    assert cheap_prefill.choose(160, 10, 100) is recompute  # 40 ms vs 16 ms
    assert cost.choose(160, 10, swap_blocks_free=9) is recompute  # no room in the swap pool
    assert cost.choose(0, 0, 100) is recompute
    assert PreemptionCost(force=swap).choose(3, 1, 100) is swap
    assert PreemptionCost(force=swap).choose(160, 10, 9) is recompute


@pytest.mark.parametrize("cost, mode", [
    (PreemptionCost(recompute_s_per_token=1e-3, swap_s_per_block=1e-4), PreemptionMode.SWAP),
    (PreemptionCost(recompute_s_per_token=1e-5, swap_s_per_block=1e-2), PreemptionMode.RECOMPUTE),
])
def test_scheduler_preempts_by_the_cheaper_mode(cost, mode):
    s = _sched(num_blocks=4, block_size=4, num_swap=16, max_num_batched_tokens=64, preemption_cost=cost)
    low = _req("low", 10, 0.0, priority=1)
    reqs = {"low": low}
    s.add(low)
    _run_step(s, reqs, 0.0)
    reqs["urgent"] = _req("urgent", 10, 1.0, priority=0)
    s.add(reqs["urgent"])
    plan = _run_step(s, reqs, 1.0)
    assert plan.preempted == [("low", mode)]
    assert low.status is (Status.SWAPPED if mode is PreemptionMode.SWAP else Status.WAITING)
    s.bm.check()


def test_better_priority_preempts_when_max_num_seqs_are_running():
    """KV to spare, but every sequence slot taken by low-priority decodes: the urgent request
    takes the slot of the lowest-priority, latest one, which is re-admitted first afterwards."""
    s = _sched(num_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    reqs = {r.req_id: r for r in (_req("low1", 5, 0.0, priority=2), _req("low2", 5, 0.1, priority=1))}
    for r in reqs.values():
        s.add(r)
    _run_step(s, reqs, 0.0)
    reqs["urgent"] = _req("urgent", 5, 1.0, priority=0)
    reqs["later"] = _req("later", 5, 1.1, priority=2)
    s.add(reqs["urgent"])
    s.add(reqs["later"])
    plan = _run_step(s, reqs, 1.0)
    assert [rid for rid, _ in plan.preempted] == ["low1"]  # the lowest priority, not the latest
    assert "urgent" in [c.req_id for c in plan.chunks] and len(s.running) == 2
    reqs["equal"] = _req("equal", 5, 2.0, priority=0)
    s.add(reqs["equal"])
    assert [rid for rid, _ in _run_step(s, reqs, 2.0).preempted] == ["low2"]
    reqs["equal2"] = _req("equal2", 5, 3.0, priority=0)
    s.add(reqs["equal2"])
    assert not _run_step(s, reqs, 3.0).preempted  # equal priority never preempts
    # the preempted keep their priority and arrival: re-admitted by (priority, arrival) as before
    order = sorted(s.waiting + s.swapped, key=lambda r: s._effective_priority(r, 3.0))
    assert [r.req_id for r in order] == ["equal2", "low2", "low1", "later"]
    assert reqs["low1"].priority == 2 and reqs["low1"].num_preemptions == 1
    s.bm.check()
