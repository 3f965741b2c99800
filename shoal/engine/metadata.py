"""What a request says about itself, beyond its tokens: one typed object from HTTP to the engine.

The gateway builds it from the OpenAI body and headers (see the README's table); the global
scheduler decides from it; the engine orders admission by it and hands it back on every output;
``shoal sim`` workloads carry it too. Nothing on the way rebuilds it from loose fields.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from shoal.engine.request import PRIORITY_MAX, PRIORITY_MIN


@dataclass(frozen=True)
class SLO:
    """Latency objectives: time to first token and mean time per output token, in seconds."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO times must be positive, got TTFT {self.ttft_s} s / TPOT {self.tpot_s} s")


DEFAULT_SLO = SLO(1.0, 0.1)
"""The objectives of ``shoal serve``'s defaults (``--slo-ttft-ms 1000 --slo-tpot-ms 100``)."""


@dataclass(frozen=True)
class RequestMetadata:
    """``priority``: lower runs first. ``tenant``: who the request is for (OpenAI's ``user``).
    ``session_id``: the conversation or agent program it belongs to (affinity, KV reuse).
    ``slo``: its latency objectives; with deadline admission its first token is due
    ``slo.ttft_s`` after arrival. ``cache_salt``: the prefix cache shares KV only between
    requests with the same salt (one tenant's cached prompt is invisible to another's).
    ``weight``: the tenant's share under fair (VTC) scheduling; a tenant of weight 3 is served three
    times the tokens of one of weight 1 while both are backlogged. ``more_turns``: the program
    (``session_id``) sends another turn after this one (an agent about to call a tool): its KV is
    kept for a time-to-live. ``tool``: the tool this turn's reply calls, whose past pauses set
    that time-to-live."""

    priority: int = 0
    tenant: str | None = None
    session_id: str | None = None
    slo: SLO | None = None
    cache_salt: str | None = None
    weight: float = 1.0
    more_turns: bool = False
    tool: str | None = None

    @cached_property
    def salt(self) -> int | None:
        """``cache_salt`` as the seed of the prefix-cache hash chain (hashed once: the scheduler
        asks on every admission attempt)."""
        return salt_seed(self.cache_salt)

    def __post_init__(self) -> None:
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"priority must be an integer, got {self.priority!r}")
        if not PRIORITY_MIN <= self.priority <= PRIORITY_MAX:
            raise ValueError(f"priority must be in [{PRIORITY_MIN}, {PRIORITY_MAX}], got {self.priority}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0 < self.weight < float("inf"):
            raise ValueError(f"weight must be a finite number > 0, got {self.weight!r}")
        if not isinstance(self.more_turns, bool):
            raise TypeError(f"more_turns must be a boolean, got {self.more_turns!r}")


def salt_seed(cache_salt: str | None) -> int | None:
    """The hash-chain seed of a cache salt (None: unsalted)."""
    if cache_salt is None:
        return None
    import hashlib

    return int.from_bytes(hashlib.sha256(b"shoal-cache-salt\0" + cache_salt.encode()).digest(), "big")


def with_slo(metadata: RequestMetadata | None, slo: SLO | None) -> RequestMetadata:
    """``metadata`` (default: none given) with ``slo`` filled in unless it has its own."""
    metadata = metadata or RequestMetadata()
    return metadata if metadata.slo is not None or slo is None else replace(metadata, slo=slo)
