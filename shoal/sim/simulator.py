"""Discrete-event simulation of a cluster of engines on a virtual clock.

Each simulated instance is a real :class:`EngineCore` — the same scheduler, block manager,
preemption policy and request bookkeeping as a real engine — whose executor predicts the step's
duration with a cost model instead of running the model. Dispatch and live migration use the
cluster's policy objects, and instances take the cluster's roles (``both``, ``prefill``,
``decode``). The result is the same JSON as ``shoal bench serve``.

Simplification: an instance's step is applied when it starts (its outputs carry the step's end
time), so a decision made during a step sees that step's effect on load a little early.

Moving a request between instances goes through the engines' own ``read_blocks`` / ``stage_kv`` /
``export`` / ``import_`` / ``release`` / ``restore`` / ``unstage``, so KV blocks really leave one
block manager and enter another. Each copy takes ``Link.seconds(bytes)`` (``transfer.py``:
latency + bytes / bandwidth, no contention); the bytes come from the instance's model dimensions.

- Live migration (as ``ClusterEngine.migrate``). Every ``control_interval_s`` of virtual time,
  while any instance works, ``migration.plan`` sees every instance's load and running requests
  (those being moved left out). The chosen request's full computed blocks are staged on the
  destination in up to ``max_migration_stages`` rounds; a round's blocks are allocated there when
  it starts, and it takes the link time while the request keeps decoding on the source. After the
  last round (or one that finds no new full block) the source exports the request, which counts
  from the end of the source's step in flight; copying the tail blocks is the downtime, when the
  request produces nothing; then the destination imports it and the source frees its blocks. If
  the destination has no room (staging or import), its staged blocks are dropped and the request
  continues on the source (after the lost downtime, when the import failed).
- P/D disaggregation (as ``ClusterEngine._pd_transfer``). New requests go to ``prefill`` and
  ``both`` instances only. On a ``prefill`` instance a request is suspended after the step that
  gives its first token; its whole KV is copied to the ``decode`` / ``both`` instance with the
  most free blocks net of queued prompts, where it resumes after the link time; if it does not
  fit there it continues on the prefill instance.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shoal.bench.agent import AgentProgram, AgentWorkload, TurnRecord
from shoal.bench.report import RequestRecord
from shoal.bench.workloads import RequestSpec, Workload
from shoal.control.global_scheduler import ENTRY_ROLES, GlobalScheduler
from shoal.control.moves import SRC, RequestGone, live_migration, pd_handoff
from shoal.control.moves import Protocol as MoveProtocol
from shoal.control.predictor import InstanceProfile
from shoal.engine.metadata import SLO, RequestMetadata
from shoal.control.policies import (
    DEFAULT_DISPATCH,
    MIGRATION_ROLES,
    DispatchPolicy,
    DispatchRequest,
    MigrationPolicy,
    check_roles,
    make_dispatch_policy,
)
from shoal.engine.block_manager import BlockManager
from shoal.engine.core import EngineCore
from shoal.engine.kv_tier import PrefixTier, TierCost
from shoal.engine.sampler import SampleResult, SamplingState
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import SchedulerConfig, StepPlan
from shoal.engine.step_budget import PrefillStretch, StepTimeBudget
from shoal.engine.cost_model import CostModel
from shoal.engine.programs import ProgramConfig
from shoal.progress import Progress
from shoal.sim.fast_forward import advance, steady_decode_steps, step_times
from shoal.sim.transfer import Link, Transfer, kv_bytes

class VirtualClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class CostModelExecutor:
    """Executes a plan by advancing the virtual clock by the cost model's step time. Every sampled
    token is ``token_id`` (the simulator runs with ``ignore_eos``, so values do not matter). KV
    reads return meta tensors (shape only, no memory) of ``kv_layout`` = (layers, kv heads, block
    size, head dim), so migrated bytes are counted as for the real model."""

    def __init__(self, cost_model: CostModel, clock: VirtualClock, token_id: int = 0,
                 kv_layout: tuple[int, int, int, int] = (30, 3, 16, 64), kv_dtype: torch.dtype = torch.bfloat16,
                 tier_s_per_block: float = 0.0) -> None:
        self.cost_model = cost_model
        self.tier_s_per_block = tier_s_per_block  # each second-tier copy (the fitted profile has none)
        self.clock = clock
        self.token_id = token_id
        self.kv_layout = kv_layout
        self.kv_dtype = kv_dtype
        self.busy_s = 0.0

    def execute(self, plan: StepPlan, states: list[SamplingState]) -> SampleResult:
        dt = self.cost_model.step_time(plan) + self.tier_s_per_block * (len(plan.tier_out) + len(plan.tier_in))
        self.clock.t += dt
        self.busy_s += dt
        return SampleResult(token_ids=[self.token_id] * len(states), logprobs=[None] * len(states))

    def read_kv(self, block_ids: list[int], swapped: bool = False) -> torch.Tensor:
        layers, heads, block_size, dim = self.kv_layout
        return torch.empty((2, layers, heads, len(block_ids), block_size, dim), dtype=self.kv_dtype, device="meta")

    def write_kv(self, block_ids: list[int], data: torch.Tensor) -> None:
        if data.shape[3] != len(block_ids):
            raise ValueError("KV block count mismatch")

    def copy_tier(self, copies_out: list[tuple[int, int]], copies_in: list[tuple[int, int]]) -> None:
        """Outside a step only migrations write KV; the link's time covers their copies."""

    def reset(self) -> None:
        """Nothing is carried between simulated steps."""


@dataclass
class InstanceSpec:
    """Shape of one simulated instance. The KV dimensions (default SmolLM2-135M) size the KV that
    migrations and P/D handoffs copy."""

    cost_model: CostModel
    num_blocks: int = 4096
    block_size: int = 16
    num_swap_blocks: int = 4096
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    vocab_size: int = 49152
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    kv_dtype: torch.dtype = torch.bfloat16
    step_time_limit_s: float | None = None  # SLO-sized steps (Sarathi-Serve); None: the token budget only
    admission: str = "fcfs"  # or "deadline" (SchedulerConfig.admission)
    scheduling_policy: str = "vtc"  # SchedulerConfig.policy: fcfs | priority | vtc
    fair_preempt_tokens: float | None = 2048  # SchedulerConfig.fair_preempt_tokens
    urgent_slack_s: float | None = None  # SchedulerConfig.urgent_slack_s
    resident_swap: bool = True  # SchedulerConfig.resident_swap
    fair_first_token: bool = True  # SchedulerConfig.fair_first_token
    fair_prefill_tokens: int | None = None  # SchedulerConfig.fair_prefill_tokens
    fair_prefill_stretch: float | None = None  # SchedulerConfig.fair_prefill_stretch, under cost_model
    programs: ProgramConfig = ProgramConfig()  # SchedulerConfig.programs
    num_tier_blocks: int = 0  # the second KV tier (evicted prefix blocks; 0: none)
    tier_bytes_per_s: float = 5e9  # its copy speed (host memory)
    recompute_s_per_token: float = 5e-4  # what the tier's load-or-recompute choice weighs a block against

    def tier(self) -> PrefixTier | None:
        """A fresh second tier of this shape, or None."""
        if not self.num_tier_blocks:
            return None
        return PrefixTier(self.num_tier_blocks, TierCost(self.kv_bytes_per_block / self.tier_bytes_per_s,
                                                         self.recompute_s_per_token))

    @property
    def step_time_budget(self) -> StepTimeBudget | None:
        return None if self.step_time_limit_s is None else StepTimeBudget(self.cost_model, self.step_time_limit_s)

    @property
    def profile(self) -> InstanceProfile:
        """What the global scheduler knows of how this instance computes."""
        return InstanceProfile(self.cost_model, self.max_num_batched_tokens, self.step_time_budget)

    @property
    def kv_bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * self.kv_dtype.itemsize


class SimInstance:
    """One engine on its own virtual clock, with its role and what it did."""

    def __init__(self, spec: InstanceSpec, role: str = "both") -> None:
        self.clock = VirtualClock()
        self.executor = CostModelExecutor(spec.cost_model, self.clock,
                                          kv_layout=(spec.num_layers, spec.num_kv_heads, spec.block_size, spec.head_dim),
                                          kv_dtype=spec.kv_dtype,
                                          tier_s_per_block=spec.kv_bytes_per_block / spec.tier_bytes_per_s)
        self.engine = EngineCore(
            self.executor,
            BlockManager(spec.num_blocks, spec.block_size, spec.num_swap_blocks, tier=spec.tier()),
            SchedulerConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
                            step_time_budget=spec.step_time_budget, admission=spec.admission,
                            policy=spec.scheduling_policy, fair_preempt_tokens=spec.fair_preempt_tokens,
                            urgent_slack_s=spec.urgent_slack_s, resident_swap=spec.resident_swap,
                            fair_first_token=spec.fair_first_token, fair_prefill_tokens=spec.fair_prefill_tokens,
                            fair_prefill_stretch=None if spec.fair_prefill_stretch is None else PrefillStretch(
                                spec.cost_model, spec.fair_prefill_stretch),
                            programs=spec.programs),
            max_model_len=spec.max_model_len,
            vocab_size=spec.vocab_size,
            clock=self.clock,
        )
        self.role = role
        self.busy = False
        self.busy_until = 0.0  # end of the last step started
        self.hold: set[str] = set()  # P/D: suspend these after their first token
        self.tokens = 0  # output tokens produced here
        self.transfers: list[Transfer] = []  # requests sent away from here (migrations, P/D)


@dataclass
class _Move:
    """A request on its way between instances: the record, and the protocol carrying it out."""

    rec: Transfer
    protocol: MoveProtocol


class Cluster:
    """The event loop. Events: arrivals (in workload order), control events (ticks, migration
    stages, KV landing; a heap) and instances finishing a step (a heap); at equal times in that
    order. :func:`simulate` runs it to the end; a driver with events of its own (the gateway's
    simulator) steps it with :meth:`next_time` / :meth:`advance`, adds arrivals as they come
    (:meth:`add_arrival`), hears of each request ended (``on_end``) and bounds fast-forwarding by
    its own next event (``horizon``)."""

    def __init__(self, workload: Workload | AgentWorkload, specs: list[InstanceSpec], dispatch: DispatchPolicy | str,
                 seed: int = 0, fast_forward: bool = True, migration: MigrationPolicy | None = None,
                 roles: list[str] | None = None, link: Link | None = None, control_interval_s: float = 0.25,
                 max_migration_stages: int = 4, slo: SLO | None = None, progress: Progress | None = None) -> None:
        self.sims = [SimInstance(s, r) for s, r in zip(specs, check_roles(roles, len(specs)))]
        self.arrivals = [] if isinstance(workload, AgentWorkload) else workload.requests
        self.records: list[RequestRecord] = [
            RequestRecord(r.arrival_s, r.prompt_len, r.output_len, start_s=r.arrival_s, tenant=r.tenant)
            for r in self.arrivals]
        self.by_id: dict[str, RequestRecord] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.group_prefixes: dict[int, list[int]] = {}  # prefix group -> its shared leading tokens
        self.vocab = specs[0].vocab_size
        # the cluster's own decision maker; instance ids are positions here (simulated ones never die)
        profiles: dict[int, InstanceProfile] = {i: spec.profile for i, spec in enumerate(specs)}
        if isinstance(dispatch, str):
            dispatch = make_dispatch_policy(dispatch, profiles, slo)
        self.scheduler = GlobalScheduler(dispatch, migration, profiles=profiles, slo=slo)
        for i, (sim, spec) in enumerate(zip(self.sims, specs)):
            self.scheduler.add_instance(i, sim.role, sim.engine.load(), spec.profile)
        self.slo = slo
        self.migration, self.link = migration, link or Link()
        self.fast_forward = fast_forward
        self.interval = control_interval_s
        self.max_stages = max_migration_stages
        self.pd = any(s.role == "prefill" for s in self.sims)
        self.ai = 0  # next arrival
        self.order = 0  # tie-breaker within a heap
        self.free: list[tuple[float, int, int]] = []  # (time, order, instance): a step ends
        self.control: list[tuple[float, int, Callable[[float, Any], None], Any]] = []
        self.moving: dict[str, _Move] = {}
        self.ticks = 0  # index of the last tick scheduled
        self.tick_pending = False
        self.turns: dict[str, tuple[AgentProgram, int, list[int]]] = {}  # turn in flight -> program, index, prompt
        self.progress = progress
        self.on_end: Callable[[str, RequestRecord], None] | None = None  # hears of each request ended
        self.horizon: Callable[[], float] | None = None  # a driver's next event: fast-forward no further
        self.ended = 0  # requests (turns) finished or refused
        self.total = (sum(len(p.turns) for p in workload.programs) if isinstance(workload, AgentWorkload)
                      else len(self.arrivals))
        if isinstance(workload, AgentWorkload):
            for prog in workload.programs:
                self._at(prog.arrival_s, self._turn, (prog, 0, []))

    @property
    def duration(self) -> float:
        """Simulated seconds until the last request ended."""
        return max((r.end_s for r in self.records if r.end_s is not None), default=0.0)

    def run(self) -> None:
        while self.advance():
            pass
        if self.progress is not None:
            self.progress(self.total, self.total)  # a failed turn ends its program's later turns

    def _next(self) -> tuple[float, int] | None:
        """The earliest pending event: (time, kind), or None."""
        nxt = []
        if self.ai < len(self.arrivals):
            nxt.append((self.arrivals[self.ai].arrival_s, 0))
        if self.control:
            nxt.append((self.control[0][0], 1))
        if self.free:
            nxt.append((self.free[0][0], 2))
        return min(nxt, default=None)

    def next_time(self) -> float:
        """When the next event happens (inf: none is pending)."""
        nxt = self._next()
        return float("inf") if nxt is None else nxt[0]

    def advance(self) -> bool:
        """Carry out the earliest event; False when there was none."""
        nxt = self._next()
        if nxt is None:
            return False
        t, kind = nxt
        if kind == 0:
            self._arrive(t)
        elif kind == 1:
            _, _, handler, arg = heapq.heappop(self.control)
            handler(t, arg)
        else:
            _, _, i = heapq.heappop(self.free)
            self.sims[i].busy = False
            self._wake(i, t)
        return True

    def add_arrival(self, spec: RequestSpec) -> tuple[str, RequestRecord]:
        """Append a request arriving at ``spec.arrival_s`` (no earlier than the last arrival, nor
        than an event already carried out); its id and record."""
        if self.arrivals and spec.arrival_s < self.arrivals[-1].arrival_s:
            raise ValueError("arrivals must be added in time order")
        self.arrivals.append(spec)
        rec = RequestRecord(spec.arrival_s, spec.prompt_len, spec.output_len, start_s=spec.arrival_s, tenant=spec.tenant)
        self.records.append(rec)
        self.total += 1
        return f"r{len(self.arrivals) - 1}", rec

    def _at(self, t: float, handler: Callable[[float, Any], None], arg: Any) -> None:
        self.order += 1
        heapq.heappush(self.control, (t, self.order, handler, arg))

    # ---- requests and steps -------------------------------------------------------------------

    def _arrive(self, now: float) -> None:
        idx = self.ai
        self.ai += 1
        spec, rec = self.arrivals[idx], self.records[idx]
        prompt = torch.randint(1, self.vocab, (spec.prompt_len,), generator=self.gen).tolist()
        if spec.prefix_group is not None and spec.prefix_len:
            shared = self.group_prefixes.setdefault(
                spec.prefix_group, torch.randint(1, self.vocab, (spec.prefix_len,), generator=self.gen).tolist())
            prompt[: spec.prefix_len] = shared[: spec.prefix_len]
        self._submit(f"r{idx}", prompt, RequestMetadata(tenant=spec.tenant, weight=spec.weight, slo=self.slo),
                     spec.output_len, rec, now)

    def _turn(self, now: float, arg: tuple[AgentProgram, int, list[int]]) -> None:
        """Turn ``k`` of an agent program is sent: its context so far plus its new tokens."""
        prog, k, context = arg
        turn = prog.turns[k]
        prompt = context + torch.randint(1, self.vocab, (turn.prompt_tokens,), generator=self.gen).tolist()
        rid = prog.turn_id(k)
        rec = prog.turn_record(k, len(prompt), now)
        self.records.append(rec)
        self.turns[rid] = (prog, k, prompt)
        metadata = prog.turn_metadata(k, self.slo)
        self._submit(rid, prompt, metadata, turn.output_tokens, rec, now)
        if rec.error is not None:
            del self.turns[rid]

    def _turn_ended(self, i: int, rid: str, end: float, error: str | None) -> None:
        """Send the program's next turn after the tool's pause (a failed turn ends the program)."""
        prog, k, prompt = self.turns.pop(rid)
        if error is None and k + 1 < len(prog.turns):
            reply = [self.sims[i].executor.token_id] * self.by_id[rid].output_tokens
            self._at(end + prog.turns[k].tool_s, self._turn, (prog, k + 1, prompt + reply))

    def _submit(self, rid: str, prompt: list[int], metadata: RequestMetadata, output_len: int,
                rec: RequestRecord, now: float) -> None:
        """Dispatch a request and queue it on the chosen instance."""
        self._observe(ENTRY_ROLES)
        request = DispatchRequest(rid, prompt, metadata)
        target = self.scheduler.dispatch(request)
        self.by_id[rid] = rec
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        try:
            self.sims[target].engine.add(prompt, params, req_id=rid, arrival_time=now, metadata=metadata)
        except ValueError as exc:
            self.scheduler.undo_dispatch(target, request)
            rec.error = str(exc)
            self._ended(rid)
            return
        if self.sims[target].role == "prefill":
            self.sims[target].hold.add(rid)
        self._wake(target, now)
        self._maybe_tick(now)

    def _ended(self, rid: str) -> None:
        self.ended += 1
        if self.progress is not None:
            self.progress(self.ended, self.total)
        if self.on_end is not None:
            self.on_end(rid, self.by_id[rid])

    def _observe(self, roles: tuple[str, ...]) -> None:
        """Hand the scheduler these instances' snapshots, as the cluster's pumps do after a step
        (here they are exact at every event)."""
        for i, sim in enumerate(self.sims):
            if sim.role in roles:
                self.scheduler.observe(i, sim.engine.load())

    def _wake(self, i: int, now: float) -> None:
        if not self.sims[i].busy and self.sims[i].engine.has_unfinished():
            self._step(i, now)

    def _busy(self, i: int, end: float) -> None:
        self.sims[i].busy, self.sims[i].busy_until = True, end
        self.order += 1
        heapq.heappush(self.free, (end, self.order, i))

    def _horizon(self, i: int) -> float:
        """Fast-forward no further than the next event that could change instance ``i``'s batch."""
        h = self.arrivals[self.ai].arrival_s if self.ai < len(self.arrivals) else float("inf")
        if self.control:
            h = min(h, self.control[0][0])
        if self.horizon is not None:
            h = min(h, self.horizon())
        if self.pd and self.sims[i].role != "prefill":  # a prefill step not yet started may hand over a request
            h = min([h] + [s.busy_until + self.link.latency_s for s in self.sims if s.busy and s.role == "prefill"])
        return h

    def _step(self, i: int, now: float) -> None:
        sim = self.sims[i]
        sim.clock.t = max(sim.clock.t, now)
        k = steady_decode_steps(sim.engine, 1 << 30) if self.fast_forward else 0
        if k > 1:
            horizon = self._horizon(i)
            times, t = [], sim.clock.t
            for dt in step_times(sim.engine, sim.executor.cost_model, k):
                if t >= horizon:
                    break
                t += dt
                times.append(t)
            if len(times) > 1:
                sim.executor.busy_s += t - sim.clock.t
                sim.clock.t = t
                for rid in advance(sim.engine, len(times), sim.executor.token_id, times):
                    self.by_id[rid].token_times_s.extend(times)
                    sim.tokens += len(times)
                self._busy(i, t)
                return
        outputs = sim.engine.step()
        end = sim.clock.t
        if sim.engine.last_plan is None or sim.engine.last_plan.empty:
            return  # nothing could run: wait for the next event instead of spinning
        for out in outputs:
            rec = self.by_id[out.req_id]
            if out.new_token_ids:
                sim.tokens += len(out.new_token_ids)
                if rec.first_token_s is None:
                    rec.first_token_s = end
                rec.token_times_s.append(end)
                if out.req_id in sim.hold:
                    sim.hold.discard(out.req_id)
                    if not out.finished and out.req_id not in self.moving:  # a migration moves it anyway
                        self._handoff(i, out.req_id, end)
            if out.finished:
                rec.end_s = end
                rec.output_tokens = out.num_output_tokens
                if out.error:
                    rec.error = out.error
                self._ended(out.req_id)
                if isinstance(rec, TurnRecord):
                    rec.cached_tokens = out.num_cached_tokens
                    self._turn_ended(i, out.req_id, end, out.error)
        self._busy(i, end)

    # ---- moving requests ----------------------------------------------------------------------

    def _maybe_tick(self, now: float) -> None:
        """Schedule the next control tick (a multiple of the interval) while anything works."""
        if self.migration is None or len(self.sims) < 2 or self.tick_pending:
            return
        if not (self.moving or any(s.busy for s in self.sims)):
            return  # idle: the next arrival starts the ticks again
        n = max(self.ticks + 1, int(now // self.interval) + 1)
        while n * self.interval <= now:
            n += 1
        self.ticks, self.tick_pending = n, True
        self._at(n * self.interval, self._tick, None)

    def _tick(self, now: float, _: Any) -> None:
        self.tick_pending = False
        assert self.migration is not None
        self._observe(MIGRATION_ROLES)
        for m in self.scheduler.migration_plan(exclude=self.moving):
            if m.req_id not in self.moving and m.src != m.dst:
                mv = _Move(Transfer(m.req_id, "migration", m.reason, m.src, m.dst, now),
                           live_migration(m.req_id, self.max_stages))
                self.sims[mv.rec.src].transfers.append(mv.rec)
                self.moving[m.req_id] = mv
                self._drive(now, (mv, None, None))
        self._maybe_tick(now)

    def _drive(self, now: float, arg: tuple[_Move, Any, BaseException | None]) -> None:
        """Run the move's protocol (``control/moves.py``) on the engines from virtual time ``now``
        until it waits on the link: staged blocks and the stopped tail take ``Link.seconds``
        of their bytes, the tail from the end of the source's step in flight."""
        mv, value, error = arg
        src, dst = self.sims[mv.rec.src], self.sims[mv.rec.dst]
        while True:
            try:
                op = mv.protocol.throw(error) if error is not None else mv.protocol.send(value)
            except StopIteration as done:
                self._end(mv, now, done.value)
                return
            value, error = None, None
            side = src if op.side == SRC else dst
            if op.needs_live_request and mv.rec.req_id not in src.engine.requests:
                error = RequestGone()
                continue
            try:
                value = getattr(side.engine, op.call)(*op.args)
            except ValueError as exc:
                error = exc
                continue
            wait = 0.0
            if op.call == "stage_kv":
                n = kv_bytes(op.args[1])
                mv.rec.staged_bytes += n
                wait = self.link.seconds(n)
            elif op.call == "export":
                mv.rec.tail_bytes = kv_bytes(value.kv)
                mv.rec.downtime_s = self.link.seconds(mv.rec.tail_bytes)  # + dst's step in flight, on landing
                wait = max(now, src.busy_until) - now + mv.rec.downtime_s
            elif op.call == "import_":
                mv.rec.downtime_s += max(0.0, dst.busy_until - now)  # it joins dst's next step
            elif op.call == "release":
                src.hold.discard(mv.rec.req_id)
            if wait > 0:
                self._at(now + wait, self._drive, (mv, value, None))
                return

    def _handoff(self, i: int, rid: str, now: float) -> None:
        """P/D: send a request that just got its first token on prefill instance ``i`` onward."""
        state = self.sims[i].engine.export(rid, 0, release=False)
        self._observe(("decode", "both"))
        dst = self.scheduler.pd_destination(i, len(state.prompt_token_ids) + len(state.output_token_ids))
        if dst is None:  # decoding here is predicted better: it continues where it is
            self.sims[i].engine.restore(rid)
            return
        n = kv_bytes(state.kv)
        mv = _Move(Transfer(rid, "pd", "pd", i, dst, now, tail_bytes=n, downtime_s=self.link.seconds(n)),
                   pd_handoff(rid, state))
        self.sims[i].transfers.append(mv.rec)
        self.moving[rid] = mv
        self._at(now + mv.rec.downtime_s, self._drive, (mv, None, None))  # its first step: the import

    def _end(self, mv: _Move, now: float, outcome: str) -> None:
        """Record the outcome; both sides may run again (blocks were freed, or a request arrived)."""
        mv.rec.end_s, mv.rec.outcome = now, outcome
        del self.moving[mv.rec.req_id]
        self._wake(mv.rec.src, now)
        self._wake(mv.rec.dst, now)


def simulate(
    workload: Workload | AgentWorkload,
    instances: list[InstanceSpec],
    dispatch: DispatchPolicy | str = DEFAULT_DISPATCH,
    seed: int = 0,
    fast_forward: bool = True,
    *,
    migration: MigrationPolicy | None = None,
    roles: list[str] | None = None,
    link: Link | None = None,
    control_interval_s: float = 0.25,
    max_migration_stages: int = 4,
    slo: SLO | None = None,
    progress: Progress | None = None,
) -> tuple[list[RequestRecord], float, list[SimInstance]]:
    """Run the workload to completion. Returns per-request records, the simulated duration and
    the instances (for their statistics: ``transfers``, ``tokens``, ``executor.busy_s``).
    ``fast_forward`` applies runs of forced decode steps at once (same result, much faster).
    ``migration``, ``roles``, ``control_interval_s`` and ``max_migration_stages`` are as in
    ``ClusterEngine``; ``link`` times the KV copies (default :class:`Link`). A ``dispatch`` given
    by name is built over the instances' profiles and ``slo``, which every request carries in its
    metadata (engines with deadline admission order by it). ``progress`` hears of each request ended."""
    run = Cluster(workload, instances, dispatch, seed, fast_forward, migration, roles, link,
                  control_interval_s, max_migration_stages, slo, progress)
    run.run()
    return run.records, run.duration, run.sims
