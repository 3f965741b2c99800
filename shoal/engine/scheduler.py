"""The engine scheduler: decides, each step, which tokens of which requests run.

It returns a :class:`StepPlan` (plain data); the model runner, or the simulator's cost model,
executes it. One token budget per step is spent on running decodes first, then on prefill chunks
(chunked prefill: a long prompt never stalls the decodes).

Admission order is the scheduling policy's: ``fcfs`` by arrival alone; ``priority`` by priority,
then arrival; ``vtc`` by priority, then the tenant's virtual token counter (weighted fair share,
:mod:`shoal.engine.fair_share`), then arrival. When KV blocks run out, the running request that
order ranks last is preempted, by swap or by recompute as the cost model says. A waiting request
also preempts a running one it outranks, for KV or for a slot when ``max_num_seqs`` are running:
one of strictly worse priority, or under ``vtc`` one of the same priority whose tenant is ahead by
more than ``fair_preempt_tokens`` or holding more than its weighted share of the slots while the
waiting one's holds less (FastSwitch's preemption-driven fairness). Under ``vtc`` a tenant behind
in fair share may also get a first-token step: its new prompts run while the running work of the
tenants ahead of it waits one step (``fair_first_token``), and the prefill of the tenants ahead
may be capped, to a few tokens a step or to a fraction of the step's time, so that the step its
newcomers wait out stays short (``fair_prefill_tokens``, ``fair_prefill_stretch``). A preempted request
keeps its priority and arrival time, so it is re-admitted in the same order as before. Agent
programs (:mod:`shoal.engine.programs`): under ``continuum`` a turn is ordered by its program's
arrival (with aging), and a finished turn's KV may stay pinned for the next one; pins yield to
running requests before anyone is preempted. Nothing here reads a clock: ``now`` is handed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from shoal.engine.block_manager import BlockManager
from shoal.engine.cost_model import plan_features
from shoal.engine.fair_share import VirtualTokenCounter
from shoal.engine.preemption import PreemptionCost, PreemptionMode
from shoal.engine.programs import ProgramConfig, ProgramTable
from shoal.engine.request import Request, Status
from shoal.engine.step_budget import PrefillStretch, StepTimeBudget, longest_fit


ADMISSION_ORDERS = ("fcfs", "deadline")
FAIR_PREFILL_FLOOR = 16
"""Prefill tokens the tenants ahead get in a step however few their time stretch allows (a step
with little else in it), so their prompts keep moving."""
FIRST_TOKEN_STEPS_IN_A_ROW = 2
"""Under ``fair_first_token``: the most steps in a row a running request sits out for other tenants'
first tokens. Two, not one, so that two prompts of a light tenant arriving a step apart both start
alone (with one, the second rode a full step of every other tenant's decodes); the price is a
second step of waiting for the deferred decodes, now and then."""
SCHEDULING_POLICIES = ("fcfs", "priority", "vtc")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    preemption_cost: PreemptionCost = field(default_factory=PreemptionCost)
    priority_aging_s: float | None = None
    """If set, a waiting request's priority improves by one level per this many seconds waited
    (for admission order only), so low-priority work cannot wait forever under a steady stream
    of urgent requests."""
    watermark_blocks: int = 1
    """Blocks kept free when admitting new requests, so running decodes are not preempted at once."""
    admission: str = "fcfs"
    """``fcfs``: by priority, then arrival. ``deadline``: at equal priority, requests whose first
    token is not yet overdue (``Request.deadline``, from the SLO) go before overdue ones: under
    overload the requests that can still meet the SLO are served, not the ones that already missed."""
    step_time_budget: StepTimeBudget | None = None
    """If set, prefill chunks are also cut to keep a step with decodes within its time limit
    (Sarathi-Serve's SLO-sized budget); ``max_num_batched_tokens`` still caps every step."""
    policy: str = "vtc"
    """``fcfs`` (priorities ignored), ``priority``, or ``vtc`` (priority, then weighted fair share
    between tenants; with a single tenant the same as ``priority``)."""
    fair_preempt_tokens: float | None = 2048
    """Under ``vtc``: a waiting request preempts a running one of the same priority when the running
    one's tenant has received this many (weighted) tokens more than its own, or holds more than its
    weighted share of the ``max_num_seqs`` slots while its own holds less; None: never."""
    urgent_slack_s: float | None = None
    """Under deadline admission: a request whose first token is due within this many seconds (and
    not yet overdue) is admitted one priority level ahead (HexGen-Text2SQL's urgency)."""
    vtc_output_weight: float = 1.0
    """The price of one output token in the tenants' counters, against 1 for a prompt token."""
    resident_swap: bool = True
    """A request preempted for its slot (not for KV) leaves its cached prefix blocks in the prefix
    cache and swaps only the rest; False: it swaps every block (whole-request swaps)."""
    fair_first_token: bool = True
    """Under ``vtc``: when the tenant furthest behind in fair share (least counter among those waiting
    at the first priority level) has only new prompts waiting, no more than its slot share has room
    for, the step runs their prefill without the running work of the tenants ahead of it, which waits
    that step (at most ``FIRST_TOKEN_STEPS_IN_A_ROW`` in a row). A tenant that sends little then
    waits for a step of its own for its first token, not for one that carries every other tenant's
    decodes."""
    fair_prefill_tokens: int | None = None
    """Under ``vtc``: while a tenant behind in fair share has work here, the prefill chunks of the
    tenants ahead of it get at most this many tokens a step, so the step a newcomer of the tenant
    behind waits out stays short; None: no cap. A lone tenant is never capped."""
    fair_prefill_stretch: PrefillStretch | None = None
    """Under ``vtc``, as ``fair_prefill_tokens`` but in time: while a tenant behind has work, the
    prefill of the tenants ahead may lengthen a step by at most a fraction of a full decode step
    (``max_num_seqs`` decodes) under the instance's cost model (at least ``FAIR_PREFILL_FLOOR``
    tokens a step). With both set, the tighter one holds."""
    programs: ProgramConfig = field(default_factory=ProgramConfig)
    """Agent programs: program-level FCFS and KV time-to-live pins (``continuum``), or ``none``."""

    def __post_init__(self) -> None:
        if self.admission not in ADMISSION_ORDERS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_ORDERS)}, got {self.admission!r}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.policy!r}")
        if self.fair_prefill_tokens is not None and self.fair_prefill_tokens < 1:
            raise ValueError(f"fair_prefill_tokens must be None or at least 1, got {self.fair_prefill_tokens!r}")
        for name in ("fair_preempt_tokens", "urgent_slack_s"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_tokens`` tokens of one request, starting at position ``start``."""

    req_id: str
    start: int
    token_ids: list[int]
    block_table: list[int]
    sample: bool  # the chunk reaches the end of the known tokens: sample the next one
    num_drafts: int = 0  # speculative tokens at the end of token_ids, scored in the same pass

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class StepPlan:
    """What one engine step does. Copies run in order: swap-out and tier-out (they read device
    blocks), swap-in and tier-in (they write them), then the forward pass over ``chunks`` (decodes
    first)."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, swap block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (swap block, device block)
    tier_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, tier slot): demotions
    tier_in: list[tuple[int, int]] = field(default_factory=list)  # (tier slot, device block): loads
    preempted: list[tuple[str, PreemptionMode]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decodes(self) -> int:
        return sum(1 for c in self.chunks if c.num_tokens == 1 and c.sample)

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.swap_out or self.swap_in or self.tier_out or self.tier_in)


class Scheduler:
    """Continuous batching over waiting, running and swapped requests."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.num_preemptions = 0
        self.num_swapped_out_blocks = 0  # KV blocks copied to the swap pool by preemptions, ever
        self.fair = VirtualTokenCounter(output_weight=config.vtc_output_weight)
        self.programs = ProgramTable(config.programs, block_manager)
        self._deferred: Counter = Counter()  # running requests left out for first tokens: steps in a row
        self._ahead: set = set()  # this step: tenants whose prefill is capped (``fair_prefill_*``)
        self._ahead_tokens = 0  # this step: prefill tokens they got
        self._ahead_s: float | None = None  # this step: seconds their prefill may still add (stretch)

    # ---- queue management ---------------------------------------------------------------------

    def add(self, req: Request) -> None:
        if self.config.policy == "vtc":
            self.fair.arrive(req.tenant, {r.tenant for q in (self.waiting, self.running, self.swapped) for r in q})
        req.status = Status.WAITING
        self.waiting.append(req)
        self.programs.arrive(req)

    def finish(self, req: Request, now: float, completed: bool) -> None:
        """A request ended (``completed``: by stop or length): its program may keep its KV pinned
        for the next turn; then it is removed."""
        self.programs.finished(req, now, completed)
        self.remove(req)

    def remove(self, req: Request) -> None:
        """Take a request out of every queue and release its KV (finish, abort)."""
        self.detach(req)
        self.bm.free(req.req_id)

    def detach(self, req: Request) -> None:
        """Take a request out of every queue, keeping its KV (a migration in progress)."""
        for queue in (self.waiting, self.running, self.swapped):
            if req in queue:
                queue.remove(req)

    def attach(self, req: Request) -> None:
        """Put a detached request back in the queue matching its status."""
        {Status.WAITING: self.waiting, Status.RUNNING: self.running, Status.SWAPPED: self.swapped}[req.status].append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def _effective_priority(self, req: Request, now: float) -> tuple:
        """The admission order's key (smallest first)."""
        cfg = self.config
        due = cfg.admission == "deadline" and req.deadline is not None and not req.output_token_ids
        late = due and now > req.deadline
        arrival = self.programs.order_time(req)
        if cfg.policy == "fcfs":
            return (late, arrival, req.req_id)
        prio = float(req.priority)
        if cfg.priority_aging_s:
            prio -= (now - req.arrival_time) // cfg.priority_aging_s
        if due and not late and cfg.urgent_slack_s is not None and req.deadline - now <= cfg.urgent_slack_s:
            prio -= 1
        if cfg.policy == "vtc":
            return (prio, late, self.fair.value(req.tenant), arrival, req.req_id)
        return (prio, late, arrival, req.req_id)

    def _victim(self, candidates: list[Request]) -> Request:
        """The running request the policy ranks last: worst priority, then (``vtc``) the tenant
        furthest ahead, then the latest arrival (of its program, under ``continuum``). The oldest
        request of the best priority is never picked while another candidate exists."""
        order = self.programs.order_time
        if self.config.policy == "fcfs":
            return max(candidates, key=lambda r: (order(r), r.req_id))
        if self.config.policy == "vtc":
            return max(candidates, key=lambda r: (r.priority, self.fair.value(r.tenant), order(r), r.req_id))
        return max(candidates, key=lambda r: (r.priority, order(r), r.req_id))

    def _outranked(self, req: Request) -> list[Request]:
        """The running requests a waiting ``req`` may preempt: any of strictly worse priority;
        under ``vtc`` also one of the same priority from another tenant that is ahead of ``req``'s
        by more than ``fair_preempt_tokens``, or that is ahead at all and holds more than its weighted
        share of the ``max_num_seqs`` slots while ``req``'s holds less (the move leaves both on
        their side of their shares and of each other, so two tenants never take a slot back and
        forth)."""
        policy = self.config.policy
        if policy == "fcfs":
            return []
        lower = [r for r in self.running if r.priority > req.priority]
        gap = self.config.fair_preempt_tokens
        if policy != "vtc" or gap is None:
            return lower
        peers = [r for r in self.running if r.priority == req.priority and r.tenant != req.tenant]
        if not peers:
            return lower
        slots, share = self._slot_shares()
        mine = self.fair.value(req.tenant)
        below_share = slots[req.tenant] + 1 <= share(req.tenant)
        return lower + [r for r in peers if self.fair.value(r.tenant) - mine > gap or (
            below_share and slots[r.tenant] - 1 >= share(r.tenant) and self.fair.value(r.tenant) > mine)]

    def _slot_shares(self) -> tuple[Counter, Callable[[str | None], float]]:
        """The running requests per tenant, and each tenant's weighted share of the ``max_num_seqs``
        slots among the tenants with work here."""
        weights = {r.tenant: r.weight for q in (self.waiting, self.swapped, self.running) for r in q}
        total = sum(weights.values())
        return Counter(r.tenant for r in self.running), lambda t: self.config.max_num_seqs * weights[t] / total

    def _first_token_first(self, now: float) -> tuple[list[Request], set]:
        """Under ``fair_first_token``: the new prompts to run in a step of their own (in admission
        order), and the tenants whose running work waits for them (see :class:`SchedulerConfig`)."""
        if not (self.config.fair_first_token and self.config.policy == "vtc" and self.waiting and self.running):
            return [], set()
        running = {r.tenant for r in self.running}
        if len(running) == 1 and all(r.tenant in running for r in self.waiting):
            return [], set()  # one tenant: nobody to go first
        keyed = [(self._effective_priority(r, now), r) for r in self.swapped + self.waiting]
        top = min(key[:2] for key, _ in keyed)  # priority and lateness first: fair share only within them
        level = [(key, r) for key, r in keyed if key[:2] == top]
        queued = Counter(r.tenant for _, r in level)
        tenant = min(queued, key=lambda t: (self.fair.value(t), queued[t]))
        first = [r for _, r in sorted(level, key=lambda kr: kr[0]) if r.tenant == tenant]
        slots, share = self._slot_shares()
        if len(first) > max(1.0, share(tenant) - slots[tenant]) or any(
                r.status is not Status.WAITING or r.output_token_ids or r.num_preemptions for r in first):
            return [], set()
        mine = self.fair.value(tenant)
        ahead = {r.tenant for r in self.running if r.tenant != tenant and self.fair.value(r.tenant) >= mine}
        if not ahead or any(self._deferred[r.req_id] >= FIRST_TOKEN_STEPS_IN_A_ROW
                            for r in self.running if r.tenant in ahead):
            return [], set()
        return first, ahead

    # ---- the step plan ------------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        self._ahead, self._ahead_tokens, self._ahead_s = self._tenants_ahead(), 0, None
        self.programs.expire(now)
        # 0. A first-token step (``fair_first_token``): a tenant behind in fair share starts its new
        #    prompts while the tenants ahead of it wait.
        first, waits = self._first_token_first(now)
        started = set()
        if first:
            self._ahead.discard(first[0].tenant)  # never capped in its own first-token step
            budget = self._admit(plan, budget, now, first)
            started = {c.req_id for c in plan.chunks}
            if not started:  # none could start: an ordinary step
                waits = set()
        self._deferred = Counter({r.req_id: self._deferred[r.req_id] + 1 for r in self.running if r.tenant in waits})

        # 1. Running requests: decodes first, in priority order, then prefill chunks in the admission
        #    order (under vtc the tenant behind first: a light tenant's half-done prompt does not wait
        #    on the heavy tenant's older ones).
        for req in sorted(self.running, key=lambda r: (True, self._effective_priority(r, now)) if r.is_prefilling
                          else (False, r.sort_key)):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            if req.tenant in waits or req.req_id in started:
                continue
            known = req.num_tokens - req.num_computed_tokens
            drafts = len(req.draft_token_ids) if known == 1 else 0
            n = self._chunk_tokens(plan, req.num_computed_tokens, min(known + drafts, budget),
                                  req.tenant if req.is_prefilling else None)
            if n == 0:
                continue
            if n > known and self.bm.slots_needed(req.req_id, req.num_computed_tokens + n) > self.bm.num_free:
                n = known  # drafts never preempt anyone
            fits = lambda: self.bm.slots_needed(req.req_id, req.num_computed_tokens + n) <= self.bm.num_free  # noqa: E731
            while not fits() and not self.programs.yield_until(fits):
                victim = self._victim(self.running)
                budget += self._preempt(victim, plan)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue
            self.bm.ensure_slots(req.req_id, req.num_computed_tokens + n)
            self._add_chunk(plan, req, n, now, max(0, n - known))
            budget -= n

        # 2. Admit swapped and waiting requests in priority order, unless we just had to preempt.
        if not plan.preempted and not waits:
            self._admit(plan, budget, now)
        # Decodes first in the batch (the runner batches them together).
        plan.chunks.sort(key=lambda c: not (c.num_tokens == 1 and c.sample))
        plan.tier_out, plan.tier_in = self.bm.take_tier_copies()
        return plan

    def _admit(self, plan: StepPlan, budget: int, now: float, candidates: list[Request] | None = None) -> int:
        """Admit swapped and waiting requests (or only ``candidates``) in the policy's order while
        the budget, the slots and the KV allow; returns the budget left."""
        if candidates is None:
            candidates = sorted(self.swapped + self.waiting, key=lambda r: self._effective_priority(r, now))
        vtc = self.config.policy == "vtc"
        while candidates:
            # Under VTC each admission charges its tenant, which may reorder the rest.
            req = min(candidates, key=lambda r: self._effective_priority(r, now)) if vtc else candidates[0]
            candidates.remove(req)
            if budget == 0:
                return budget
            capped = req.is_prefilling and req.tenant in self._ahead
            start = self._start(req) if capped else None  # reused below unless req's status changes
            if capped and not self._ahead_room(plan, start, 1):
                if not self._ahead_room(plan, 0, 1):  # spent for this step: none of their prompts start
                    candidates = [r for r in candidates if not (r.is_prefilling and r.tenant in self._ahead)]
                continue
            if len(self.running) >= self.config.max_num_seqs:
                # Full of sequences: an urgent request takes the slot of the lowest-priority running
                # one (vLLM #40004: otherwise it waits behind low-priority decodes for as long as they run).
                lower = self._outranked(req)
                if not lower:
                    return budget
                budget += self._preempt(self._victim(lower), plan, for_slot=True)
            if req.status is Status.SWAPPED and self.bm.resident_blocks(req.req_id) is None:
                self.recompute_instead(req)  # its resident prefix was evicted while it waited
                start = None
            if req.status is Status.SWAPPED:
                n = self._chunk_tokens(plan, req.num_computed_tokens, min(req.num_tokens - req.num_computed_tokens, budget), req.tenant)
                if n == 0:
                    return budget
                # Blocks the chunk needs beyond those swapped back in count like the watermark.
                grow = max(0, self.bm.blocks_needed(req.num_computed_tokens + n) - self.bm.num_swapped_blocks(req.req_id))
                if not self._make_room(req, lambda: self.bm.can_swap_in(req.req_id, grow + self._watermark()), plan):
                    return budget
                plan.swap_in.extend(self.bm.swap_in(req.req_id))
                self.swapped.remove(req)
            else:
                tokens, salt = req.all_token_ids, req.cache_salt
                cached = self._start(req) if start is None else start
                n = self._chunk_tokens(plan, cached, min(req.num_tokens - cached, budget), req.tenant)
                if n == 0:
                    return budget
                # Beside programs' pins a turn starts only if its whole prompt fits: its later
                # chunks would otherwise take the pinned blocks from the programs that wait.
                whole = req.num_tokens if self.bm.num_pinned and self.programs.config.enabled else cached + n
                if not self._make_room(req, lambda: self.bm.can_allocate(tokens, whole, self._watermark(), salt), plan):
                    return budget
                req.num_computed_tokens = self.bm.allocate(req.req_id, tokens, cached + n, salt)
                self.programs.admitted(req)
                if req.num_preemptions == 0:
                    req.num_cached_tokens = req.num_computed_tokens
                    if vtc:
                        self.fair.charge(req.tenant, req.num_tokens - req.num_computed_tokens, 0, req.weight)
                self.waiting.remove(req)
            req.status = Status.RUNNING
            self.running.append(req)
            self.bm.ensure_slots(req.req_id, req.num_computed_tokens + n)
            self._add_chunk(plan, req, n, now)
            budget -= n
        return budget

    def _chunk_tokens(self, plan: StepPlan, start: int, want: int, tenant: str | None) -> int:
        """``want`` tokens from ``start``, or fewer if the step's time budget or ``tenant``'s
        prefill cap (``fair_prefill_tokens``, ``fair_prefill_stretch``) says so."""
        if want <= 1:
            return want
        if tenant in self._ahead:
            want = self._ahead_room(plan, start, want)
        tb = self.config.step_time_budget
        return want if tb is None or want <= 1 else tb.chunk_tokens(plan, start, want)

    def _start(self, req: Request) -> int:
        """Where ``req``'s next chunk starts if admitted now: a waiting prompt after its cached prefix."""
        if req.status is Status.SWAPPED:
            return req.num_computed_tokens
        return len(self.bm.cached_prefix(req.all_token_ids, req.cache_salt)) * self.bm.block_size

    def _ahead_room(self, plan: StepPlan, start: int, want: int) -> int:
        """The most of ``want`` prefill tokens from ``start`` that the caps on the tenants ahead
        leave them in this step, with ``plan`` planned so far."""
        cap = self.config.fair_prefill_tokens
        n = want if cap is None else max(0, min(want, cap - self._ahead_tokens))
        stretch = self.config.fair_prefill_stretch
        if stretch is None or n == 0:
            return n
        base = plan_features(plan)
        now_s = stretch.cost_model.time(base)
        if self._ahead_s is None:  # the first of their chunks this step
            self._ahead_s = stretch.seconds(base, self.config.max_num_seqs)
        fit = longest_fit(stretch.cost_model, base, start, n, now_s + self._ahead_s)
        return max(fit, min(n, FAIR_PREFILL_FLOOR - self._ahead_tokens))

    def _tenants_ahead(self) -> set:
        """Under ``vtc`` with a prefill cap: the tenants with work here whose counter is above that
        of the tenant furthest behind and who hold more of the running batch than it does, per
        weight (none while one tenant has work). The second test keeps the cap on the tenants that
        fill the batch: a light tenant whose one long prompt, charged when admitted, lifts its
        counter past a heavy one's for a while is not capped for it."""
        if self.config.policy != "vtc" or (self.config.fair_prefill_tokens is None
                                          and self.config.fair_prefill_stretch is None):
            return set()
        tenants = {r.tenant for q in (self.waiting, self.running, self.swapped) for r in q}
        if len(tenants) < 2:
            return set()
        slots, share = self._slot_shares()
        behind = min(tenants, key=self.fair.value)
        held = lambda t: slots[t] / share(t)  # noqa: E731  (the batch it holds, per weight)
        return {t for t in tenants if self.fair.value(t) > self.fair.value(behind) and held(t) > held(behind)}

    def _watermark(self) -> int:
        """Blocks kept free when admitting; none while nothing runs, so that a request which
        needs every block can still start."""
        return self.config.watermark_blocks if self.running else 0

    def _make_room(self, req: Request, fits: Callable[[], bool], plan: StepPlan) -> bool:
        """Make ``fits()`` true for an arriving request by preempting strictly lower-priority
        running requests (or, while nothing runs, by dropping pins: an idle engine never waits for a
        program's return); False if it cannot."""
        while not fits():
            # Plain priorities: aging orders admission only; letting it preempt equal-priority
            # running requests makes two aged requests preempt each other forever.
            lower = self._outranked(req)
            if not lower:
                return not self.running and self.programs.yield_until(fits)
            self._preempt(self._victim(lower), plan)
        return True

    def _preempt(self, victim: Request, plan: StepPlan, for_slot: bool = False) -> int:
        """Preempt a running request, dropping its chunk from the plan if it already has one.
        Returns the tokens of that chunk (budget given back). Preempted ``for_slot`` (not for KV),
        its cached prefix stays in the cache and only the rest is swapped (``resident_swap``)."""
        chunk = next((c for c in plan.chunks if c.req_id == victim.req_id), None)
        if chunk is not None:
            plan.chunks.remove(chunk)
        keep_cached = for_slot and self.config.resident_swap
        # Swap-outs run before swap-ins: swap blocks a swap-in of this step frees are not free yet.
        swap_free = 0 if plan.swap_in else self.bm.num_free_swap
        mode = self.config.preemption_cost.choose(
            victim.num_computed_tokens, self.bm.swap_copies(victim.req_id, keep_cached), swap_free)
        if self.bm.loading(victim.req_id):
            mode = PreemptionMode.RECOMPUTE  # swap-outs run before its loads from the tier

        self.running.remove(victim)
        if mode is PreemptionMode.SWAP:
            copies = self.bm.swap_out(victim.req_id, keep_cached)
            plan.swap_out.extend(copies)
            self.num_swapped_out_blocks += len(copies)
            victim.status = Status.SWAPPED
            self.swapped.append(victim)
        else:
            self.bm.free(victim.req_id)
            victim.num_computed_tokens = 0
            victim.status = Status.WAITING
            self.waiting.append(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append((victim.req_id, mode))
        return chunk.num_tokens if chunk is not None else 0

    def recompute_instead(self, req: Request) -> None:
        """Turn a swapped-out request into a waiting one that computes its KV again."""
        self.bm.free(req.req_id)
        self.swapped.remove(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        self.waiting.append(req)

    def _add_chunk(self, plan: StepPlan, req: Request, n: int, now: float, num_drafts: int = 0) -> None:
        """Plan ``n`` tokens of ``req`` from its first uncomputed one, the last ``num_drafts`` of
        them drafts, and charge them to the caps on the tenants ahead if they are its prefill."""
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        capped = req.is_prefilling and not num_drafts and req.tenant in self._ahead  # decodes are never capped
        stretch = self.config.fair_prefill_stretch
        before = stretch.cost_model.time(plan_features(plan)) if capped and stretch else 0.0
        start = req.num_computed_tokens
        end = start + n - num_drafts
        plan.chunks.append(ScheduledChunk(
            req_id=req.req_id,
            start=start,
            token_ids=req.token_slice(start, end) + req.draft_token_ids[:num_drafts],
            block_table=self.bm.table(req.req_id),
            sample=end == req.num_tokens,
            num_drafts=num_drafts,
        ))
        if capped:
            self._ahead_tokens += n
            if stretch is not None and self._ahead_s is not None:
                self._ahead_s -= stretch.cost_model.time(plan_features(plan)) - before

    # ---- after the step -----------------------------------------------------------------------

    def commit(self, plan: StepPlan, requests: dict[str, Request], num_accepted: dict[str, int] | None = None) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache. A chunk
        with drafts counts only the ``num_accepted[req_id]`` drafts the verifier kept; the KV
        blocks past them are given back."""
        vtc = self.config.policy == "vtc"
        for chunk in plan.chunks:
            req = requests[chunk.req_id]
            kept = num_accepted.get(chunk.req_id, 0) if chunk.num_drafts and num_accepted else 0
            req.num_computed_tokens += chunk.num_tokens - chunk.num_drafts + kept
            if vtc and chunk.sample:
                self.fair.charge(req.tenant, 0, 1 + kept, req.weight)
            if chunk.num_drafts > kept:
                self.bm.truncate(req.req_id, req.num_computed_tokens + 1)
            if self.bm.has_new_full_blocks(req.req_id, req.num_computed_tokens):
                # accepted drafts are not among the request's tokens until the engine appends them
                tokens = req.all_token_ids + chunk.token_ids[chunk.num_tokens - chunk.num_drafts:][:kept]
                self.bm.commit(req.req_id, tokens, req.num_computed_tokens)
