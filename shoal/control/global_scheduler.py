"""The global scheduler: every cluster-level decision, in one synchronous object (Llumnix's shape).

Keyed by instance id, it holds each instance's role, whether it drains, and its latest load
snapshot, and decides: where a request goes (with the optimistic bump that keeps a burst from
being herded onto one instance before the next snapshot), which migrations to start (a gated
policy's moves only where :class:`MigrationGate` predicts they raise SLO attainment), where a
prefilled request decodes, where a draining instance's requests go, and when to scale and which
instance to remove. No Ray, no asyncio, no clock: the Ray cluster and the simulator both drive this
one object, so what the simulator shows is what the cluster decides.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Container, Sequence

from shoal.control.migration_gate import MigrationGate, moved
from shoal.control.predictor import InstanceProfile
from shoal.control.policies import (
    MIGRATION_ROLES,
    Autoscaler,
    DispatchPolicy,
    DispatchRequest,
    Migration,
    MigrationPolicy,
    can_remove,
    decode_room,
    priority_view,
)
from shoal.engine.metadata import SLO
from shoal.engine.outputs import InstanceLoad

ENTRY_ROLES = ("both", "prefill")  # instances that take new requests


@dataclass
class InstanceView:
    """What the global scheduler knows of one instance: its latest snapshot, and the requests
    dispatched there that the snapshot may not show yet (a snapshot taken while an add was on its
    way must not erase it: 16 concurrent arrivals would all see the same idle instance)."""

    id: int
    role: str
    snapshot: InstanceLoad
    draining: bool = False
    expected_added: int = 0  # the engine's ``num_added`` once every dispatch here has landed
    recent_prompts: deque = field(default_factory=lambda: deque(maxlen=4096))  # prompt lengths, newest last

    def __post_init__(self) -> None:
        self.expected_added = self.snapshot.num_added

    @property
    def load(self) -> InstanceLoad:
        """The snapshot, with the dispatches it does not count yet counted as waiting."""
        unseen = min(len(self.recent_prompts), max(0, self.expected_added - self.snapshot.num_added))
        if unseen == 0:
            return self.snapshot
        tokens = sum(itertools.islice(reversed(self.recent_prompts), unseen))
        return dataclasses.replace(self.snapshot, num_waiting=self.snapshot.num_waiting + unseen,
                                   waiting_prompt_tokens=self.snapshot.waiting_prompt_tokens + tokens)


class GlobalScheduler:
    """Dispatch, migration, P/D destination, drain target and scaling over instances by id."""

    def __init__(self, dispatch: DispatchPolicy, migration: MigrationPolicy | None = None,
                 autoscaler: Autoscaler | None = None, profiles: dict[int, InstanceProfile] | None = None,
                 slo: SLO | None = None) -> None:
        self.dispatch_policy = dispatch
        self.migration_policy = migration
        self.autoscaler = autoscaler
        self.instances: dict[int, InstanceView] = {}
        # each instance's cost profile (the very dict a predicted-latency policy reads)
        self.profiles: dict[int, InstanceProfile] = {} if profiles is None else profiles
        # moves are judged against ``slo`` (the requests' default): a gated migration policy's, and P/D hand-offs
        self.gate = MigrationGate(self.profiles, slo) if slo is not None else None
        self.declined: dict[str, dict[str, int]] = {}  # moves the gate declined: reason ("pd" too) -> why -> count
        # prompts dispatched and their tokens: the gate's typical request is their mean
        self._dispatched = 0
        self._dispatched_tokens = 0

    # ---- membership and snapshots ---------------------------------------------------------------

    def add_instance(self, instance_id: int, role: str, load: InstanceLoad,
                     profile: InstanceProfile | None = None) -> None:
        self.instances[instance_id] = InstanceView(instance_id, role, load)
        if profile is not None:
            self.profiles[instance_id] = profile

    def remove_instance(self, instance_id: int) -> None:
        """An instance died or finished draining: it is no longer a candidate for anything."""
        self.instances.pop(instance_id, None)
        self.profiles.pop(instance_id, None)

    def set_draining(self, instance_id: int) -> None:
        self.instances[instance_id].draining = True

    def observe(self, instance_id: int, load: InstanceLoad) -> None:
        """The instance's latest snapshot (dispatches it already counts stop being bumped)."""
        if instance_id in self.instances:
            self.instances[instance_id].snapshot = load

    def loads(self, roles: Sequence[str], include_draining: bool = False) -> dict[int, InstanceLoad]:
        return {i: v.load for i, v in self.instances.items()
                if v.role in roles and (include_draining or not v.draining)}

    # ---- decisions -----------------------------------------------------------------------------

    def dispatch(self, request: DispatchRequest) -> int:
        """The instance for a new request, counted there at once (see :meth:`undo_dispatch`).
        Raises RuntimeError when no instance takes new requests."""
        loads = self.loads(ENTRY_ROLES)
        if not loads:
            raise RuntimeError("no live instance can take requests")
        loads = {i: priority_view(load, request.priority) for i, load in loads.items()}
        chosen = self.dispatch_policy.choose(loads, request)
        self._count_queued(chosen, len(request.prompt_token_ids), +1)
        self._dispatched += 1
        self._dispatched_tokens += len(request.prompt_token_ids)
        return chosen

    def undo_dispatch(self, instance_id: int, request: DispatchRequest) -> None:
        """The instance refused the request: take back its optimistic count."""
        self._count_queued(instance_id, len(request.prompt_token_ids), -1)

    def _count_queued(self, instance_id: int, prompt_len: int, sign: int) -> None:
        view = self.instances.get(instance_id)
        if view is None:
            return
        view.expected_added += sign
        if sign > 0:
            view.recent_prompts.append(prompt_len)
        elif prompt_len in view.recent_prompts:
            view.recent_prompts.remove(prompt_len)

    def pd_destination(self, src: int | None = None, context_len: int = 0) -> int | None:
        """Where a request of ``context_len`` tokens prefilled on prefill instance ``src`` decodes:
        with an SLO and profiles, among the instances predicted to keep its TPOT within the SLO the
        most decode room, else the one predicted to miss it least — or None (it stays on ``src``)
        when decoding there is predicted better than anywhere else. Without them, the most room."""
        loads = self.loads(("decode", "both"))
        if not loads:
            return None
        room = lambda i: (decode_room(loads[i]), -i)  # noqa: E731
        if self.gate is None or not self.profiles or src not in self.instances:
            return max(loads, key=room)
        misses = {i: self.gate.decode_violation(i, load, context_len) for i, load in loads.items()}
        meets = [i for i, v in misses.items() if v <= 1.0]
        if meets:
            return max(meets, key=room)
        best = min(misses, key=lambda i: (misses[i], i))
        if self.gate.gains(misses[best], self.gate.decode_violation(src, self.instances[src].load, context_len)):
            return best
        self._decline("pd", "no_gain")
        return None

    def drain_target(self, source: int) -> int | None:
        """Where a draining instance's requests move (None: a prefill instance hands off instead,
        or nowhere to go)."""
        if self.instances[source].role not in MIGRATION_ROLES:
            return None
        loads = {i: l for i, l in self.loads(MIGRATION_ROLES).items() if i != source}
        return max(loads, key=lambda i: (loads[i].num_free_blocks, -i)) if loads else None

    def migration_plan(self, exclude: Container[str] = ()) -> list[Migration]:
        """Live migrations to start, among decode-capable instances (prefill ones hand off), of
        the running requests their snapshots list, less ``exclude`` (already moving, or ended)."""
        if self.migration_policy is None:
            return []
        loads = self.loads(MIGRATION_ROLES, include_draining=True)
        if len(loads) < 2:
            return []
        running = {i: [r for r in load.running if r.req_id not in exclude] for i, load in loads.items()}
        draining = frozenset(i for i in loads if self.instances[i].draining)
        plan = self.migration_policy.plan(loads, running, draining)
        if self.gate is None or not getattr(self.migration_policy, "gated", False) or not self.profiles or not plan:
            return plan
        return self._gated(plan, dict(loads))

    def _gated(self, plan: list[Migration], loads: dict[int, InstanceLoad]) -> list[Migration]:
        """The planned moves the gate keeps, each judged on the loads the kept ones before it leave."""
        probe_len = self._dispatched_tokens // self._dispatched if self._dispatched else 128
        kept = []
        for m in plan:
            req = next(r for r in loads[m.src].running if r.req_id == m.req_id)
            why = self.gate.judge(m.reason, req, m.src, m.dst, loads, probe_len)
            if why is None:
                kept.append(m)
                loads[m.src], loads[m.dst] = moved(loads[m.src], req, -1), moved(loads[m.dst], req, +1)
            else:
                self._decline(m.reason, why)
        return kept

    def _decline(self, reason: str, why: str) -> None:
        counts = self.declined.setdefault(reason, {})
        counts[why] = counts.get(why, 0) + 1

    def scale(self) -> tuple[int, int | None]:
        """(+1, None) to add an instance, (-1, victim id) to drain one, (0, None) to hold. The
        victim is the least busy instance whose removal leaves a serving cluster."""
        if self.autoscaler is None:
            return 0, None
        active = [v for v in self.instances.values() if not v.draining]
        decision = self.autoscaler.decide([v.load for v in active])
        if decision > 0:
            return 1, None
        if decision < 0 and len(active) > 1:
            removable = [v for v in active if can_remove([a.role for a in active if a is not v])]
            if removable:
                victim = min(removable, key=lambda v: (v.load.num_running + v.load.num_waiting, -v.id))
                return -1, victim.id
        return 0, None

    def total_load(self) -> InstanceLoad:
        """Every instance's snapshot summed (draining ones included: they still hold requests)."""
        loads = [v.load for v in self.instances.values()]
        if not loads:
            return InstanceLoad(0, 0, 0, 1, 0, 0, 0, 0, 16, 0, 0, 0)
        total = {f.name: sum(getattr(l, f.name) for l in loads) for f in dataclasses.fields(InstanceLoad)
                 if f.name not in ("running", "lowest_waiting_priority")}
        total["block_size"] = loads[0].block_size
        total["lowest_waiting_priority"] = max((l.lowest_waiting_priority for l in loads
                                                if l.lowest_waiting_priority is not None), default=None)
        return InstanceLoad(**total)
