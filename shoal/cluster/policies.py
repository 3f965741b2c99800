"""Dispatch policies: which instance gets a new request.

Small, pure objects over :class:`InstanceLoad` snapshots, shared by the real cluster and the
simulator (the same objects, not copies). None reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, Sequence

from shoal.engine.outputs import InstanceLoad


@dataclass(frozen=True)
class DispatchRequest:
    """What a dispatch policy may know about a request."""

    req_id: str
    prompt_token_ids: Sequence[int]
    session_id: str | None = None
    priority: int = 0


class DispatchPolicy(Protocol):
    name: str

    def choose(self, loads: Sequence[InstanceLoad], request: DispatchRequest) -> int:
        """Index of the instance (into ``loads``) that should serve ``request``."""
        ...


def freeness(load: InstanceLoad) -> float:
    """Llumnix's freeness: KV blocks left per request once queued demand is counted. Higher is
    freer; negative means the queue alone already wants more blocks than are free."""
    queued = -(-load.waiting_prompt_tokens // load.block_size)
    return (load.num_free_blocks + load.num_cached_blocks - queued) / (load.num_running + load.num_waiting + 1)


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, loads: Sequence[InstanceLoad], request: DispatchRequest) -> int:
        i = self._next % len(loads)
        self._next += 1
        return i


class LeastLoad:
    """The freest instance by :func:`freeness` (ties: fewest waiting, then lowest index)."""

    name = "least_load"

    def choose(self, loads: Sequence[InstanceLoad], request: DispatchRequest) -> int:
        return max(range(len(loads)), key=lambda i: (freeness(loads[i]), -loads[i].num_waiting, -i))


class PrefixAware:
    """Send a request where its prompt's prefix was sent before (its KV is likely cached there),
    unless that instance is much busier than the freest one: then fall back to least-load.

    Remembers the chained hashes of recent prompts' leading blocks per instance (LRU-bounded), in
    the spirit of SGLang's cache-aware router."""

    name = "prefix_aware"

    def __init__(self, block_size: int = 16, load_guard: float = 2.0, capacity: int = 100_000) -> None:
        self.block_size = block_size
        self.load_guard = load_guard
        self.capacity = capacity
        self._where: OrderedDict[int, int] = OrderedDict()  # prefix hash -> instance
        self._fallback = LeastLoad()

    def _hashes(self, tokens: Sequence[int]) -> list[int]:
        out, h, bs = [], None, self.block_size
        for i in range(len(tokens) // bs):
            h = hash((h, tuple(tokens[i * bs : (i + 1) * bs])))
            out.append(h)
        return out

    def choose(self, loads: Sequence[InstanceLoad], request: DispatchRequest) -> int:
        hashes = self._hashes(request.prompt_token_ids)
        best = self._fallback.choose(loads, request)
        for h in reversed(hashes):  # longest known prefix first
            i = self._where.get(h)
            if i is not None and i < len(loads):
                busy = loads[i].num_running + loads[i].num_waiting
                least = loads[best].num_running + loads[best].num_waiting
                if busy <= self.load_guard * least + 1:
                    best = i
                break
        for h in hashes:
            self._where[h] = best
            self._where.move_to_end(h)
        while len(self._where) > self.capacity:
            self._where.popitem(last=False)
        return best


class SessionAffinity:
    """Keep a session on the instance that served it before (its KV is there), unless that
    instance is overloaded; new sessions and sessionless requests go least-load."""

    name = "session_affinity"

    def __init__(self, load_guard: float = 2.0) -> None:
        self.load_guard = load_guard
        self._home: dict[str, int] = {}
        self._fallback = LeastLoad()

    def choose(self, loads: Sequence[InstanceLoad], request: DispatchRequest) -> int:
        best = self._fallback.choose(loads, request)
        sid = request.session_id
        if sid is None:
            return best
        home = self._home.get(sid)
        if home is not None and home < len(loads):
            busy = loads[home].num_running + loads[home].num_waiting
            least = loads[best].num_running + loads[best].num_waiting
            if busy <= self.load_guard * least + 1:
                return home
        self._home[sid] = best
        return best


DISPATCH_POLICIES = {p.name: p for p in (RoundRobin, LeastLoad, PrefixAware, SessionAffinity)}


def make_dispatch_policy(name: str) -> DispatchPolicy:
    if name not in DISPATCH_POLICIES:
        raise ValueError(f"unknown dispatch policy {name!r}; choose one of {', '.join(DISPATCH_POLICIES)}")
    return DISPATCH_POLICIES[name]()
