"""The cluster's policies: dispatch, migration, P/D roles and autoscaling.

Small, pure objects over :class:`InstanceLoad` snapshots keyed by instance id (never by list
position, which names another instance once one dies or drains). :class:`GlobalScheduler`
composes them; the real cluster and the simulator share the very same objects. None reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Mapping, Protocol, Sequence

from shoal.control.predictor import InstanceProfile, LatencyPredictor, Prediction
from shoal.engine.metadata import SLO, RequestMetadata
from shoal.engine.block_manager import prefix_hashes
from shoal.engine.outputs import InstanceLoad, RunningRequest


@dataclass(frozen=True)
class DispatchRequest:
    """What a dispatch policy may know about a request."""

    req_id: str
    prompt_token_ids: Sequence[int]
    metadata: RequestMetadata = RequestMetadata()

    @property
    def session_id(self) -> str | None:
        return self.metadata.session_id

    @property
    def priority(self) -> int:
        return self.metadata.priority

    @property
    def slo(self) -> SLO | None:
        return self.metadata.slo


Loads = Mapping[int, InstanceLoad]  # instance id -> its latest snapshot


class DispatchPolicy(Protocol):
    name: str

    def choose(self, loads: Loads, request: DispatchRequest) -> int:
        """The id (a key of ``loads``) of the instance that should serve ``request``."""
        ...


class PrefixMemory:
    """Which instance each recently dispatched prompt prefix went to: the chained hashes of its
    leading blocks (LRU-bounded), in the spirit of SGLang's cache-aware router. Ids of instances
    gone since are simply not candidates."""

    def __init__(self, block_size: int = 16, capacity: int = 100_000) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self._where: OrderedDict[int, int] = OrderedDict()  # prefix hash -> instance id

    def hashes(self, request: "DispatchRequest") -> list[int]:
        """The request's prefix hashes, under its cache salt as the engines hash them."""
        salt = request.metadata.salt if request.metadata is not None else None
        return prefix_hashes(request.prompt_token_ids, self.block_size, salt=salt)

    def longest(self, hashes: Sequence[int], candidates: Loads) -> tuple[int | None, int]:
        """(instance, cached tokens) of the longest known prefix on a candidate instance."""
        for k in range(len(hashes), 0, -1):
            i = self._where.get(hashes[k - 1])
            if i is not None and i in candidates:
                return i, k * self.block_size
        return None, 0

    def record(self, hashes: Sequence[int], instance_id: int) -> None:
        for h in hashes:
            self._where[h] = instance_id
            self._where.move_to_end(h)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)


def queued_blocks(load: InstanceLoad) -> int:
    """KV blocks the prompts still to prefill there will take."""
    return -(-load.waiting_prompt_tokens // load.block_size)


def freeness(load: InstanceLoad) -> float:
    """Llumnix's freeness: KV blocks left per request once queued demand is counted. Higher is
    freer; negative means the queue alone already wants more blocks than are free."""
    return (load.num_free_blocks + load.num_cached_blocks - queued_blocks(load)) / (load.num_running + load.num_waiting + 1)


def priority_view(load: InstanceLoad, priority: int) -> InstanceLoad:
    """``load`` as a request of ``priority`` meets it: running requests of strictly worse priority
    do not count (the engine preempts them for it, at ``max_num_seqs`` as for KV), and their
    blocks count as free. Dispatch decides on this view, so an urgent request goes where the
    work ahead of it is least, not where the least work is."""
    worse = [r for r in load.running if r.priority > priority]
    if not worse:
        return load
    blocks = sum(-(-r.num_tokens // load.block_size) for r in worse)
    return replace(
        load, num_running=load.num_running - len(worse),
        tokens_in_flight=max(0, load.tokens_in_flight - sum(r.num_tokens for r in worse)),
        num_free_blocks=min(load.num_total_blocks, load.num_free_blocks + blocks),
        num_used_blocks=max(0, load.num_used_blocks - blocks),
        running=tuple(r for r in load.running if r.priority <= priority))


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, loads: Loads, request: DispatchRequest) -> int:
        ids = sorted(loads)
        i = ids[self._next % len(ids)]
        self._next += 1
        return i


class LeastLoad:
    """The freest instance by :func:`freeness` (ties: fewest waiting, then lowest id)."""

    name = "least_load"

    def choose(self, loads: Loads, request: DispatchRequest) -> int:
        return max(loads, key=lambda i: (freeness(loads[i]), -loads[i].num_waiting, -i))


class PrefixAware:
    """Send a request where its prompt's prefix was sent before (its KV is likely cached there),
    unless that instance is much busier than the freest one: then fall back to least-load.

    Remembers the chained hashes of recent prompts' leading blocks per instance (LRU-bounded), in
    the spirit of SGLang's cache-aware router."""

    name = "prefix_aware"

    def __init__(self, block_size: int = 16, load_guard: float = 2.0, capacity: int = 100_000) -> None:
        self.load_guard = load_guard
        self.memory = PrefixMemory(block_size, capacity)
        self._fallback = LeastLoad()

    def choose(self, loads: Loads, request: DispatchRequest) -> int:
        hashes = self.memory.hashes(request)
        best = self._fallback.choose(loads, request)
        i, _ = self.memory.longest(hashes, loads)
        if i is not None:
            busy = loads[i].num_running + loads[i].num_waiting
            least = loads[best].num_running + loads[best].num_waiting
            if busy <= self.load_guard * least + 1:
                best = i
        self.memory.record(hashes, best)
        return best


class SessionAffinity:
    """Keep a session on the instance that served it before (its KV is there), unless that
    instance is overloaded; new sessions and sessionless requests go least-load."""

    name = "session_affinity"

    def __init__(self, load_guard: float = 2.0) -> None:
        self.load_guard = load_guard
        self._home: dict[str, int] = {}  # session -> instance id
        self._fallback = LeastLoad()

    def choose(self, loads: Loads, request: DispatchRequest) -> int:
        best = self._fallback.choose(loads, request)
        sid = request.session_id
        if sid is None:
            return best
        home = self._home.get(sid)
        if home is not None and home in loads:
            busy = loads[home].num_running + loads[home].num_waiting
            least = loads[best].num_running + loads[best].num_waiting
            if busy <= self.load_guard * least + 1:
                return home
        self._home[sid] = best
        return best


class PredictedLatency:
    """Predict the request's TTFT and TPOT on every instance from that instance's profile
    (:class:`LatencyPredictor`; a prefix cached where :class:`PrefixMemory` says shortens its
    prefill there) and keep the instances predicted to meet both SLOs. Among those, the one that
    holds the prompt's prefix, else the one with the most KV headroom (Llumnix's freeness: packing
    the fastest instance until its prediction crosses the SLO preempts there); if none meets
    it, a session's turn stays where its prefix is (its program's KV and turn order are there:
    a move pays off only where the SLO is met), anything else goes where it misses least. Without an SLO every instance qualifies. An instance without
    a profile is predicted with the first profile given."""

    name = "predicted_latency"

    def __init__(self, profiles: Mapping[int, InstanceProfile], slo: SLO | None = None,
                 predictor: LatencyPredictor | None = None, block_size: int = 16) -> None:
        self.profiles = profiles  # the global scheduler's own mapping: instances added later appear
        self.slo = slo
        self.predictor = predictor or LatencyPredictor()
        self.memory = PrefixMemory(block_size)

    def predictions(self, loads: Loads, request: DispatchRequest, home: int | None = None,
                    cached: int = 0) -> dict[int, Prediction]:
        """Each instance's prediction; ``home`` holds ``cached`` tokens of the prompt's prefix."""
        fallback = next(iter(self.profiles.values()))
        n = len(request.prompt_token_ids)
        return {i: self.predictor.predict(self.profiles.get(i, fallback), load, n, cached if i == home else 0)
                for i, load in loads.items()}

    def choose(self, loads: Loads, request: DispatchRequest) -> int:
        hashes = self.memory.hashes(request)
        home, cached = self.memory.longest(hashes, loads)
        preds = self.predictions(loads, request, home, cached)
        slo = request.slo or self.slo
        ok = [i for i, p in preds.items() if p.meets(slo)]
        if home is not None and home in ok:  # its prefix is cached there and it still meets the SLO
            best = home
        elif ok:  # among those predicted to meet it, the most KV headroom (Llumnix's freeness)
            best = max(ok, key=lambda i: (freeness(loads[i]), -preds[i].ttft_s, -i))
        elif home is not None and request.session_id is not None:
            # a session's next turn that meets its SLO nowhere stays with its KV: moving would
            # recompute the history where no queue is shorter enough to win it back
            best = home
        else:
            best = min(preds, key=lambda i: (preds[i].violation(slo), i))
        self.memory.record(hashes, best)
        return best


DISPATCH_POLICIES = ("predicted_latency", "round_robin", "least_load", "prefix_aware", "session_affinity")
DEFAULT_DISPATCH = "predicted_latency"


def make_dispatch_policy(name: str, profiles: Mapping[int, InstanceProfile] | None = None,
                         slo: SLO | None = None) -> DispatchPolicy:
    """A policy by name; ``predicted_latency`` needs the instances' ``profiles`` (by id)."""
    simple = {p.name: p for p in (RoundRobin, LeastLoad, PrefixAware, SessionAffinity)}
    if name in simple:
        return simple[name]()
    if name == PredictedLatency.name:
        if profiles is None:
            raise ValueError("predicted_latency dispatch needs the instances' cost profiles")
        return PredictedLatency(profiles, slo)
    raise ValueError(f"unknown dispatch policy {name!r}; choose one of {', '.join(DISPATCH_POLICIES)}")


# ---- migration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    req_id: str
    src: int  # instance ids
    dst: int
    reason: str


class MigrationPolicy(Protocol):
    name: str
    gated: bool  # the global scheduler keeps only the moves predicted to raise SLO attainment

    def plan(self, loads: Loads, running: Mapping[int, Sequence[RunningRequest]],
             draining: frozenset[int] = frozenset()) -> list[Migration]:
        """Migrations to start now, given every instance's load and running requests (by id)."""
        ...


class LlumnixMigration:
    """Llumnix-style: drain marked instances; relieve an instance about to preempt (or already
    preempting); rebalance when an instance queues requests while another has none and their
    freeness differs by more than ``gap``; keep high-priority requests (priority < 0) on an
    instance with headroom by moving normal ones off it.

    Each decision moves the cheapest request (fewest tokens, lowest priority) from the least free
    instance to the freest one that is not draining, if its KV fits there; at most
    ``max_per_round`` at a time. ``gated``: the global scheduler keeps only the moves predicted to
    raise SLO attainment (:mod:`shoal.control.migration_gate`); ungated, every move is made."""

    def __init__(self, gap: float = 4.0, max_per_round: int = 2, gated: bool = True) -> None:
        self.gap = gap
        self.max_per_round = max_per_round
        self.gated = gated
        self.name = "llumnix" if gated else "llumnix_ungated"

    def plan(self, loads, running, draining=frozenset()):
        loads = dict(loads)
        targets = [i for i in sorted(loads) if i not in draining]
        if not targets:
            return []
        out: list[Migration] = []
        moved: set[str] = set()

        def freest(exclude: int) -> int | None:
            cands = [i for i in targets if i != exclude]
            return max(cands, key=lambda i: freeness(loads[i])) if cands else None

        def cheapest(i: int, keep_high: bool = False) -> RunningRequest | None:
            cands = [r for r in running[i] if r.req_id not in moved and not (keep_high and r.priority < 0)]
            return min(cands, key=lambda r: (-r.priority, r.num_tokens)) if cands else None

        def fits(req: RunningRequest, dst: int) -> bool:
            """Its KV and a block to grow into fit in what the destination has left once its own
            queue and a growth block for each of its running requests are set aside (a move into
            an instance that is itself about to preempt only bounces back)."""
            d = loads[dst]
            spare = d.num_free_blocks - queued_blocks(d) - d.num_running
            return spare >= -(-req.num_tokens // d.block_size) + 1

        def add(src: int, reason: str, keep_high: bool = False) -> None:
            dst = freest(src)
            req = cheapest(src, keep_high)
            if dst is not None and req is not None and fits(req, dst) and len(out) < self.max_per_round:
                out.append(Migration(req.req_id, src, dst, reason))
                moved.add(req.req_id)
                # the next decision of this round sees the move: two must not count on the same blocks
                blocks = -(-req.num_tokens // loads[dst].block_size)
                loads[dst] = replace(loads[dst], num_free_blocks=loads[dst].num_free_blocks - blocks,
                                     num_running=loads[dst].num_running + 1)
                loads[src] = replace(loads[src], num_free_blocks=loads[src].num_free_blocks + blocks,
                                     num_running=loads[src].num_running - 1)

        for i in sorted(draining & loads.keys()):
            for _ in running[i]:
                add(i, "drain")
        for i in targets:
            load = loads[i]
            about_to_preempt = load.num_swapped > 0 or load.num_free_blocks + load.num_cached_blocks < load.num_running
            if about_to_preempt and running[i]:
                add(i, "relieve")
            elif any(r.priority < 0 for r in running[i]) and len(running[i]) > 1 and freeness(load) < self.gap:
                add(i, "isolate_priority", keep_high=True)
        if len(targets) > 1 and len(out) < self.max_per_round:
            # rebalance only a real imbalance: the busiest instance queues work the freest does not
            lo = min(targets, key=lambda i: freeness(loads[i]))
            hi = max(targets, key=lambda i: freeness(loads[i]))
            left = [r for r in running[lo] if r.req_id not in moved]
            if (loads[lo].num_waiting > 0 and loads[hi].num_waiting == 0 and len(left) > 1
                    and freeness(loads[hi]) - freeness(loads[lo]) > self.gap):
                add(lo, "rebalance", keep_high=True)
        return out


MIGRATION_POLICIES = ("llumnix", "llumnix_ungated", "none")
DEFAULT_MIGRATION = "llumnix"


def make_migration_policy(name: str) -> MigrationPolicy | None:
    """One of :data:`MIGRATION_POLICIES`: Llumnix's moves kept where predicted to raise SLO
    attainment, all of Llumnix's moves, or none."""
    if name == "none":
        return None
    if name in ("llumnix", "llumnix_ungated"):
        return LlumnixMigration(gated=name == "llumnix")
    raise ValueError(f"unknown migration policy {name!r}; choose one of {', '.join(MIGRATION_POLICIES)}")


# ---- prefill/decode disaggregation ---------------------------------------------------------------

ROLES = ("both", "prefill", "decode")
MIGRATION_ROLES = ("both", "decode")  # live migration moves requests among these only


def check_roles(roles: Sequence[str] | None, n: int) -> list[str]:
    """Instance roles: ``n`` of :data:`ROLES` (default all ``both``); prefill instances need a
    decode (or both) instance to hand their requests to."""
    roles = list(roles or ["both"] * n)
    if len(roles) != n or any(r not in ROLES for r in roles):
        raise ValueError(f"roles must be {n} of {ROLES}")
    if "prefill" in roles and not any(r in ("decode", "both") for r in roles):
        raise ValueError("prefill instances need at least one decode (or both) instance")
    return roles


def can_remove(remaining_roles: Sequence[str]) -> bool:
    """Whether instances with these roles, left after a removal, still serve every request: one
    takes new requests (prefill / both) and, if any prefill, one decodes (decode / both)."""
    takes_new = any(r in ("prefill", "both") for r in remaining_roles)
    decodes = any(r in MIGRATION_ROLES for r in remaining_roles)
    return takes_new and (decodes or "prefill" not in remaining_roles)


def decode_room(load: InstanceLoad) -> float:
    """Where a prefilled request goes: the decode instance with the most free blocks net of the
    prompts it has queued."""
    return load.num_free_blocks - load.waiting_prompt_tokens / load.block_size


# ---- autoscaling ----------------------------------------------------------------------------------


@dataclass
class Autoscaler:
    """Scale out when the mean KV usage (or queue) stays above ``up`` for ``window`` observations,
    in when it stays below ``down``; within [min_instances, max_instances]."""

    min_instances: int = 1
    max_instances: int = 4
    up: float = 0.7
    down: float = 0.2
    window: int = 5
    _above: int = 0
    _below: int = 0

    def decide(self, loads: Sequence[InstanceLoad]) -> int:
        """+1 to add an instance, -1 to remove one, 0 to hold."""
        n = len(loads)
        if n == 0:
            return 1
        pressure = max(sum(l.kv_usage for l in loads) / n,
                       sum(min(1.0, l.num_waiting / 4) for l in loads) / n)
        self._above = self._above + 1 if pressure > self.up else 0
        self._below = self._below + 1 if pressure < self.down else 0
        if self._above >= self.window and n < self.max_instances:
            self._above = 0
            return 1
        if self._below >= self.window and n > self.min_instances:
            self._below = 0
            return -1
        return 0
