"""How long moving KV between simulated instances takes, and the record of each move.

A :class:`Link` charges ``latency_s + bytes / bandwidth`` per copy. The bytes are those of the KV
tensors the engine itself hands out for the move (``EngineCore.read_blocks`` / ``export``); in the
simulator they are meta tensors shaped ``[2, layers, kv_heads, blocks, block_size, head_dim]`` by
the instance's model dimensions, so nothing is allocated. One link serves every pair of instances
and moves do not slow each other down (no contention is modelled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.bench.report import stats


@dataclass(frozen=True)
class Link:
    """The interconnect between instances. Defaults: a 10 Gbit/s network with 1 ms per copy."""

    bandwidth_gbps: float = 10.0  # gigabits per second
    latency_s: float = 0.001

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes * 8 / (self.bandwidth_gbps * 1e9)


def kv_bytes(kv: torch.Tensor | None) -> int:
    return 0 if kv is None else kv.numel() * kv.element_size()


@dataclass
class Transfer:
    """One request moved (or tried to be) from instance ``src`` to ``dst``."""

    req_id: str
    kind: str  # "migration" (live, Llumnix) or "pd" (prefill -> decode handoff)
    reason: str  # the migration policy's reason; "pd" for handoffs
    src: int
    dst: int
    start_s: float  # decided (migration) / first token produced (pd)
    end_s: float | None = None  # committed or rolled back
    staged_bytes: int = 0  # copied while the request kept decoding on the source
    tail_bytes: int = 0  # copied while it was stopped
    downtime_s: float = 0.0  # stopped: link time of the tail, then the destination's step in flight
    outcome: str = "in_flight"  # done | rolled_back | finished_first


def summarize_transfers(transfers: list[Transfer]) -> dict:
    """Counts by reason and outcome, KV bytes moved, and downtime percentiles (ms) of the moves
    that completed, for live migrations and P/D handoffs separately."""
    out = {}
    for kind, key in (("migration", "migrations"), ("pd", "pd_transfers")):
        mine = [t for t in transfers if t.kind == kind]
        done = [t for t in mine if t.outcome == "done"]
        by_reason: dict[str, dict[str, int]] = {}
        for t in mine:
            counts = by_reason.setdefault(t.reason, {})
            counts[t.outcome] = counts.get(t.outcome, 0) + 1
        out[key] = {"done": len(done), "attempted": len(mine), "by_reason": by_reason,
                    "kv_bytes": sum(t.staged_bytes + t.tail_bytes for t in done),
                    "downtime_ms": stats([t.downtime_s for t in done])}
    return out
