"""Many engine instances (Ray actors) behind one global scheduler, in the gateway process.

``ClusterEngine`` has the same face as :class:`shoal.server.async_engine.AsyncEngine` (``submit``,
``abort``, ``load``, ...), so the OpenAI server runs on either. Every decision (dispatch, live
migration, P/D destination, drain target, scaling) is made by :class:`GlobalScheduler`, the object
the simulator drives too; this module only carries them out with Ray calls, and survives an
instance dying.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from shoal.cluster.instance import Instance
from shoal.control.global_scheduler import ENTRY_ROLES, GlobalScheduler
from shoal.control.policies import (
    MIGRATION_ROLES,
    ROLES,
    DEFAULT_DISPATCH,
    Autoscaler,
    DispatchPolicy,
    DispatchRequest,
    MigrationPolicy,
    check_roles,
    make_dispatch_policy,
)
from shoal.control.moves import SRC, RequestGone, live_migration, pd_handoff
from shoal.control.moves import Protocol as MoveProtocol
from shoal.control.predictor import InstanceProfile
from shoal.engine.config import EngineConfig
from shoal.engine.cost_model import instance_cost_model
from shoal.engine.metadata import SLO, RequestMetadata, with_slo
from shoal.engine.outputs import SHED_ERROR, InstanceLoad, RequestOutput, failed_output
from shoal.engine.preemption import pick_shed_victim
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.step_budget import StepTimeBudget
from shoal.streams import QueueFull, RequestStream

log = logging.getLogger(__name__)



def start_local_ray(num_cpus: int) -> None:
    """Start Ray on this machine for the instances. Ray runs its workers at nice 15 by default,
    so on a busy CPU (the gateway, a client, a neighbour) an instance's steps and even its
    start-up starve; Shoal's instances run at the gateway's priority instead."""
    ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False,
             _system_config={"worker_niceness": 0})


@dataclass
class Member:
    """One instance's actor as the gateway holds it (what the scheduler knows of it is in
    ``GlobalScheduler.instances``)."""

    id: int
    handle: ray.actor.ActorHandle
    role: str
    alive: bool = True
    pump: asyncio.Task | None = None


@dataclass
class Tracked:
    """A request the gateway is serving."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metadata: RequestMetadata
    member: int
    queue: asyncio.Queue
    streamed_tokens: int = 0
    migrating: bool = False
    aborted: bool = False
    pd_moved: bool = False
    dispatching: bool = False  # its instance's add() has not answered yet (outputs may come first)
    redispatches: int = 0  # times re-sent after its instance died (bounded: it may be what killed it)
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def priority(self) -> int:
        return self.metadata.priority

    @property
    def unsettled(self) -> bool:
        """Being dispatched or moved: no instance is known to hold it for good, so nothing else
        (shedding, migration, drain) may act on it meanwhile."""
        return self.dispatching or self.migrating


@dataclass
class ClusterStats:
    migrations: dict[str, int] = field(default_factory=dict)  # outcome -> count
    downtimes_s: list[float] = field(default_factory=list)


class DeclinedMoves:
    """``shoal:migrations_declined_total{reason,why}``, read at scrape time from the global scheduler's
    counts of the moves (and P/D hand-offs) its migration gate declined."""

    def __init__(self, scheduler: GlobalScheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        family = CounterMetricFamily("shoal:migrations_declined", "Moves the migration gate declined, by the "
                                     "move's reason and why.", labels=["reason", "why"])
        for reason, counts in self.scheduler.declined.items():
            for why, n in counts.items():
                family.add_metric([reason, why], n)
        yield family


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry, scheduler: GlobalScheduler) -> None:
        self.instance_running = Gauge("shoal:instance_requests_running", "Running requests per instance.", ["instance"], registry=registry)
        self.instance_waiting = Gauge("shoal:instance_requests_waiting", "Waiting requests per instance.", ["instance"], registry=registry)
        self.instance_kv = Gauge("shoal:instance_kv_cache_usage_perc", "KV usage per instance.", ["instance"], registry=registry)
        self.instances = Gauge("shoal:instances", "Instances by state.", ["state"], registry=registry)
        self.dispatches = Counter("shoal:dispatches", "Requests dispatched, by policy.", ["policy"], registry=registry)
        self.migrations = Counter("shoal:migrations", "Live migrations, by reason and outcome.", ["reason", "outcome"], registry=registry)
        self.migration_bytes = Counter("shoal:migration_kv_bytes", "KV bytes moved by migrations.", registry=registry)
        self.downtime = Histogram("shoal:migration_downtime_seconds", "Stop-and-copy time of a migration.",
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=registry)
        self.pd_transfers = Counter("shoal:pd_transfers", "Requests moved from a prefill to a decode instance.", registry=registry)
        self.scale_events = Counter("shoal:scale_events", "Instances added (up) or removed (down).", ["direction"], registry=registry)
        self.redispatched = Counter("shoal:requests_redispatched", "Requests re-sent after their instance died.", registry=registry)
        registry.register(DeclinedMoves(scheduler))


class ClusterEngine:
    """The global scheduler over N instances."""

    def __init__(
        self,
        config: EngineConfig,
        num_instances: int,
        dispatch: DispatchPolicy | str = DEFAULT_DISPATCH,
        *,
        tokenizer=None,
        roles: list[str] | None = None,
        migration: MigrationPolicy | None = None,
        autoscaler: Autoscaler | None = None,
        ray_address: str | None = None,
        max_waiting: int | None = None,
        control_interval_s: float = 0.25,
        max_migration_stages: int = 4,
        slo: SLO | None = None,
        instance_threads: list[int] | None = None,
    ) -> None:
        roles = check_roles(roles, num_instances)
        self.config = config
        self.slo = slo  # given to requests that bring none
        profiles: dict[int, InstanceProfile] = {}
        if isinstance(dispatch, str):
            dispatch = make_dispatch_policy(dispatch, profiles, slo)
        self.scheduler = GlobalScheduler(dispatch, migration, autoscaler, profiles, slo)
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self.control_interval_s = control_interval_s
        self.max_migration_stages = max_migration_stages
        self._initial_roles = roles
        self._ray_address = ray_address
        self.members: dict[int, Member] = {}
        self.requests: dict[str, Tracked] = {}
        self.step_listeners: list = []
        self.stats = ClusterStats()
        self.metrics: ClusterMetrics | None = None
        self.dead: str | None = None
        self._next_member = 0
        self._tasks: list[asyncio.Task] = []
        self.info: dict = {}
        self.events: deque[dict] = deque(maxlen=256)  # moves, scaling, deaths as they happen (the dashboard's feed)
        self._starting: dict[int, str] = {}  # instances starting up: id -> role
        cpus = os.cpu_count() or 1
        if instance_threads is not None and (len(instance_threads) != num_instances or min(instance_threads) < 1):
            raise ValueError(f"instance threads must be {num_instances} positive counts")
        self._threads = instance_threads or [max(1, cpus // max(1, num_instances))] * num_instances

    # ---- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if not ray.is_initialized():
            if self._ray_address:
                ray.init(address=self._ray_address, log_to_driver=False)
            else:
                start_local_ray(max(os.cpu_count() or 1, len(self._initial_roles)))
        for role, threads in zip(self._initial_roles, self._threads):
            await self._add_member(role, threads)
        self._tasks.append(asyncio.create_task(self._control_loop()))

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = ClusterMetrics(registry, self.scheduler)

    async def _add_member(self, role: str = "both", threads: int | None = None) -> Member:
        mid = self._next_member
        self._next_member += 1
        threads = threads or min(self._threads)
        actor = ray.remote(num_cpus=0, max_concurrency=16)(Instance)
        self._starting[mid] = role
        try:
            handle = actor.remote(self.config, f"instance-{mid}", threads)
            info = await handle.info.remote()
            self.info = self.info or info
            self.scheduler.add_instance(mid, role, await handle.load.remote(), self._profile(threads))
        finally:
            del self._starting[mid]
        member = Member(mid, handle, role)
        self.members[mid] = member
        member.pump = asyncio.create_task(self._pump(member))
        log.warning("instance %d (%s) ready", mid, role)
        return member

    def _profile(self, threads: int) -> InstanceProfile:
        """An instance's cost profile (``EngineConfig.cost_model`` at its thread count)."""
        scaled = instance_cost_model(self.config.cost_model, threads)
        budget = self.config.step_time_limit_s
        return InstanceProfile(scaled, self.config.max_num_batched_tokens,
                               None if budget is None else StepTimeBudget(scaled, budget))

    def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        for m in self.members.values():
            if m.pump:
                m.pump.cancel()
            if m.alive:
                ray.kill(m.handle)
        self.members.clear()

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    def live(self, roles: tuple[str, ...] = ROLES, include_draining: bool = False) -> list[Member]:
        return [m for m in self.members.values()
                if m.alive and m.role in roles and (include_draining or not self._draining(m))]

    def _draining(self, member: Member) -> bool:
        """Whether the global scheduler has this instance draining (it alone keeps that)."""
        view = self.scheduler.instances.get(member.id)
        return view is not None and view.draining

    def load(self) -> InstanceLoad:
        """The cluster's load: every live instance's snapshot summed."""
        return self.scheduler.total_load()

    def instance_states(self) -> list[tuple[int, str, str, InstanceLoad | None]]:
        """Each instance's id, role, state (starting, running, draining or dead) and load (None
        when starting or dead), for the dashboard."""
        rows = [(mid, role, "starting", None) for mid, role in self._starting.items()]
        for m in self.members.values():
            view = self.scheduler.instances.get(m.id)
            state = "dead" if not m.alive or view is None else "draining" if view.draining else "running"
            rows.append((m.id, m.role, state, view.load if state != "dead" else None))
        return sorted(rows, key=lambda row: row[0])

    def _event(self, kind: str, **fields) -> None:
        self.events.append({"time": time.time(), "kind": kind, **fields})

    # ---- requests -----------------------------------------------------------------------------

    async def submit(self, prompt_token_ids: list[int], params: SamplingParams, req_id: str,
                     metadata: RequestMetadata | None = None) -> RequestStream:
        if req_id in self.requests:  # it is tracked before its instance could refuse it: never replace it
            raise ValueError(f"request id {req_id!r} is already in use")
        metadata = with_slo(metadata, self.slo)
        if self.max_waiting is not None and (waiting := self.load().waiting_for_room()) >= self.max_waiting:
            # Full: a better-priority request takes the place of the worst one that has produced
            # nothing yet (it ends with SHED_ERROR: a 429), as one engine's queue does.
            victim = pick_shed_victim((t for t in self.requests.values() if not t.streamed_tokens and not t.unsettled
                                       and not t.pd_moved and not t.aborted), metadata.priority)
            if victim is None:
                raise QueueFull(f"{waiting} requests are waiting (limit {self.max_waiting})")
            self.abort(victim.req_id)
            self._fail(victim, SHED_ERROR)
        tracked = Tracked(req_id, list(prompt_token_ids), params, metadata, -1, asyncio.Queue())
        await self._dispatch(tracked)
        return RequestStream(self.abort, req_id, tracked.queue)

    async def _dispatch(self, tracked: Tracked) -> None:
        """Send a request to the instance the global scheduler picks. It is tracked before the
        instance is called: on a busy machine the instance's first outputs can reach the pump
        before ``add`` answers, and the pump drops outputs of requests it does not know."""
        request = DispatchRequest(tracked.req_id, tracked.prompt_token_ids, tracked.metadata)
        tracked.dispatching = True
        self.requests[tracked.req_id] = tracked
        try:
            while True:
                member = self.members[self.scheduler.dispatch(request)]
                tracked.member = member.id
                try:
                    await member.handle.add.remote(tracked.prompt_token_ids, tracked.params, tracked.req_id,
                                                   tracked.metadata, member.role == "prefill")
                    break
                except ray.exceptions.RayActorError as exc:  # died before its pump noticed: try another
                    await self._member_died(member, exc)
                except ray.exceptions.RayTaskError as exc:  # the engine refused the request: its own
                    self.scheduler.undo_dispatch(member.id, request)
                    cause = exc.cause  # error, without Ray's traceback (actor id, pid, address)
                    raise (cause if isinstance(cause, Exception) else RuntimeError("the instance refused the request")) from None
        except BaseException as exc:
            if self.requests.get(tracked.req_id) is tracked:
                del self.requests[tracked.req_id]
            member = self.members.get(tracked.member)
            if isinstance(exc, asyncio.CancelledError) and member is not None and member.alive:
                member.handle.abort.remote(tracked.req_id)  # the client left: its add may still land
            raise
        finally:
            tracked.dispatching = False
        if self.metrics:
            self.metrics.dispatches.labels(policy=self.scheduler.dispatch_policy.name).inc()

    def fail_all(self, error: str) -> None:
        """End every open request with ``error`` (a shutdown whose drain timed out)."""
        for tracked in list(self.requests.values()):
            self.abort(tracked.req_id)
            self._fail(tracked, error)

    def _fail(self, tracked: Tracked, error: str) -> None:
        self.requests.pop(tracked.req_id, None)
        tracked.queue.put_nowait(failed_output(tracked.req_id, error, len(tracked.prompt_token_ids),
                                               tracked.streamed_tokens, tracked.metadata))

    def abort(self, req_id: str) -> None:
        tracked = self.requests.get(req_id)
        if tracked is None:
            return
        tracked.aborted = True
        member = self.members.get(tracked.member)
        if member is not None and member.alive and not tracked.migrating:
            member.handle.abort.remote(req_id)

    # ---- outputs ------------------------------------------------------------------------------

    async def _pump(self, member: Member) -> None:
        while True:
            try:
                outs, load = await member.handle.poll.remote(0.05)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the actor died
                await self._member_died(member, exc)
                return
            self.scheduler.observe(member.id, load)
            for out in outs:
                self._deliver(out, member)
            for listener in self.step_listeners:
                listener(outs)

    def _deliver(self, out: RequestOutput, member: Member) -> None:
        tracked = self.requests.get(out.req_id)
        if tracked is None:
            return
        tracked.queue.put_nowait(out)
        tracked.streamed_tokens += len(out.new_token_ids)
        if out.finished:
            self.requests.pop(out.req_id, None)
        elif member.role == "prefill" and out.new_token_ids and not tracked.pd_moved and not tracked.migrating:
            tracked.pd_moved = True  # prefill done here: continue on a decode instance
            self._tasks.append(asyncio.create_task(self._pd_transfer(tracked, member)))

    async def _member_died(self, member: Member, exc: Exception) -> None:
        """Take a dead (or broken) instance out: re-send its requests that have streamed nothing
        yet, at most twice each, and end the others with an error. Clients see the instance's
        number only; the actor's details go to the log."""
        if not member.alive:
            return
        member.alive = False
        self.scheduler.remove_instance(member.id)
        self.dead = None if self.live() else "all instances died"
        log.error("instance %d died: %s", member.id, exc)
        self._event("instance_died", instance=member.id)
        ray.kill(member.handle)  # a broken instance's actor may still be alive
        # Requests still being dispatched to it are re-sent by their own dispatch.
        for tracked in [t for t in self.requests.values() if t.member == member.id and not t.dispatching]:
            error = f"instance {member.id} died mid-request"
            if tracked.streamed_tokens == 0 and tracked.redispatches < 2 and self.live(ENTRY_ROLES):
                tracked.redispatches += 1
                if self.metrics:
                    self.metrics.redispatched.inc()
                self._event("redispatch", **{"from": member.id})
                try:
                    await self._dispatch(tracked)
                    continue
                except Exception as err:  # nowhere to go
                    log.warning("re-dispatch of %s failed: %s", tracked.req_id, err)
                    error = f"instance {member.id} died and no other instance could take the request"
            self._fail(tracked, error)

    # ---- migration ----------------------------------------------------------------------------

    async def migrate(self, req_id: str, dst_id: int, reason: str = "manual", staged: bool = True) -> bool:
        """Move a running request to instance ``dst_id`` while it keeps decoding (the protocol of
        ``control/moves.py``: staged full blocks, then stop-and-copy of the tail, import there,
        free here; any failure rolls back and the request continues on the source). True if moved."""
        tracked = self.requests.get(req_id)
        dst = self.members.get(dst_id)
        if tracked is None or dst is None or tracked.unsettled or tracked.member == dst_id:
            return False
        src = self.members[tracked.member]
        if src.role not in MIGRATION_ROLES or dst.role not in MIGRATION_ROLES:  # prefill ones hand off by P/D
            return False
        protocol = live_migration(req_id, self.max_migration_stages if staged else 0)
        return await self._move(tracked, src, dst, protocol, reason)

    async def _pd_transfer(self, tracked: Tracked, src: Member) -> None:
        """Move a request parked on a prefill instance (after its first token) to the decode
        instance the global scheduler picks; if it picks none, or the move fails, it continues on
        the prefill instance."""
        tracked.migrating = True  # until it runs again somewhere: an abort meanwhile is sent there after
        try:
            state = await src.handle.take_handoff.remote(tracked.req_id)
            dst_id = self.scheduler.pd_destination(src.id, len(state.prompt_token_ids) + len(state.output_token_ids))
        except Exception as exc:  # not parked after all (the instance restarted, or died): never leave it hanging
            tracked.migrating = False
            log.warning("P/D hand-off of %s failed: %s", tracked.req_id, exc)
            if self.requests.get(tracked.req_id) is tracked:  # not already ended by _member_died
                src.handle.abort.remote(tracked.req_id)
                self._fail(tracked, f"instance {src.id} could not hand the request off")
            return
        if dst_id is None:
            try:
                await src.handle.restore.remote(tracked.req_id)
            finally:
                tracked.migrating = False
                self._count_move("pd", "rolled_back", src.id, None)
            if tracked.aborted:
                src.handle.abort.remote(tracked.req_id)
            return
        await self._move(tracked, src, self.members[dst_id], pd_handoff(tracked.req_id, state), "pd")

    async def _move(self, tracked: Tracked, src: Member, dst: Member, protocol: MoveProtocol, reason: str) -> bool:
        """Carry a move's protocol out with actor calls. Downtime runs from the source letting the
        request go (its step in flight is over) to the destination's commit."""
        tracked.migrating = True
        outcome, nbytes, value, error = "rolled_back", 0, None, None
        t_stop = t_done = None
        t_started = time.perf_counter()
        try:
            while True:
                try:
                    op = protocol.throw(error) if error is not None else protocol.send(value)
                except StopIteration as done:
                    outcome = done.value
                    break
                value, error = None, None
                side = src if op.side == SRC else dst
                if op.needs_live_request and tracked.req_id not in self.requests:
                    error = RequestGone()
                    continue
                try:
                    value = await getattr(side.handle, op.call).remote(*op.args)
                except Exception as exc:  # refused (no room, request gone) or the call failed
                    log.info("%s of %s: %s failed, the protocol rolls back: %s", reason, tracked.req_id, op.call, exc)
                    error = ValueError(str(exc))
                    continue
                if op.call == "stage_kv":
                    nbytes += op.args[1].numel() * op.args[1].element_size()
                elif op.call == "export":  # the Instance hands back outputs its last step made too
                    value, pending = value
                    t_stop = time.perf_counter()
                    for out in pending:
                        self._deliver(out, src)
                elif op.call == "import_":
                    t_done = time.perf_counter()
                    if op.args[0].kv is not None:
                        nbytes += op.args[0].kv.numel() * op.args[0].kv.element_size()
            if outcome == "done":
                tracked.member = dst.id
                self.stats.downtimes_s.append(t_done - (t_stop or t_started))
                if self.metrics:
                    self.metrics.migration_bytes.inc(nbytes)
                    self.metrics.downtime.observe(self.stats.downtimes_s[-1])
                    if reason == "pd":
                        self.metrics.pd_transfers.inc()
            return outcome == "done"
        finally:
            tracked.migrating = False
            self._count_move(reason, outcome, src.id, dst.id)
            if tracked.aborted and outcome != "finished_first":  # the client left mid-move: end it where it runs now
                (dst if outcome == "done" else src).handle.abort.remote(tracked.req_id)

    def _count_move(self, reason: str, outcome: str, src: int, dst: int | None) -> None:
        self.stats.migrations[outcome] = self.stats.migrations.get(outcome, 0) + 1
        if self.metrics:
            self.metrics.migrations.labels(reason=reason, outcome=outcome).inc()
        self._event("pd_transfer" if reason == "pd" else "migration", reason=reason, outcome=outcome,
                    **{"from": src, "to": dst})

    async def drain(self, member_id: int) -> None:
        """Stop sending work to an instance, migrate its requests away, then remove it. A prefill
        instance is not migrated from: its requests finish prefilling and hand off as usual."""
        member = self.members[member_id]
        self.scheduler.set_draining(member_id)
        while any(t.member == member_id for t in self.requests.values()):
            for t in [t for t in self.requests.values() if t.member == member_id and not t.unsettled]:
                dst = self.scheduler.drain_target(member_id)
                if dst is not None:
                    self._tasks.append(asyncio.create_task(self.migrate(t.req_id, dst, reason="drain")))
            await asyncio.sleep(self.control_interval_s)
        member.alive = False
        self.scheduler.remove_instance(member_id)
        if member.pump:
            member.pump.cancel()
        ray.kill(member.handle)
        del self.members[member_id]
        if self.metrics:
            self.metrics.scale_events.labels(direction="down").inc()
        self._event("scale", direction="down", instance=member_id)

    async def _control_loop(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(self.control_interval_s)
            ticks += 1
            try:
                await self._control_once(ticks)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control loop")

    async def _control_once(self, ticks: int) -> None:
        members = self.live(include_draining=True)
        if self.metrics:
            states = [("dead" if not m.alive else "draining" if self._draining(m) else "alive") for m in self.members.values()]
            for state in ("alive", "draining", "dead"):
                self.metrics.instances.labels(state=state).set(states.count(state))
            for m in members:
                load = self.scheduler.instances[m.id].load
                self.metrics.instance_running.labels(instance=str(m.id)).set(load.num_running)
                self.metrics.instance_waiting.labels(instance=str(m.id)).set(load.num_waiting)
                self.metrics.instance_kv.labels(instance=str(m.id)).set(load.kv_usage)
        decoders = [m for m in members if m.role in MIGRATION_ROLES]  # prefill instances hand off instead
        if self.scheduler.migration_policy is not None and len(decoders) > 1:
            # the running requests come with each instance's snapshot: no call that a wedged instance could stall
            moving = {rid for m in decoders for rid in (r.req_id for r in self.scheduler.instances[m.id].load.running)
                      if rid not in self.requests or self.requests[rid].unsettled}
            for mig in self.scheduler.migration_plan(exclude=moving):
                self._tasks.append(asyncio.create_task(self.migrate(mig.req_id, mig.dst, mig.reason)))
        if ticks % 4 == 0:
            direction, victim = self.scheduler.scale()
            if direction > 0:
                added = await self._add_member()
                if self.metrics:
                    self.metrics.scale_events.labels(direction="up").inc()
                self._event("scale", direction="up", instance=added.id)
            elif victim is not None:
                self._tasks.append(asyncio.create_task(self.drain(victim)))
        self._tasks = [t for t in self._tasks if not t.done()]
