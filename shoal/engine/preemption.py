"""Preemption policy: which running request gives up its KV, and whether by swap or recompute.

Pure functions over plain values, shared by the engine scheduler and the simulator.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Protocol, TypeVar


class PreemptionMode(enum.Enum):
    SWAP = "swap"  # copy the KV blocks to the swap pool and back later
    RECOMPUTE = "recompute"  # drop the KV and prefill prompt + output again later


class Sheddable(Protocol):
    @property
    def priority(self) -> int: ...

    @property
    def arrival_time(self) -> float: ...


S = TypeVar("S", bound=Sheddable)


def pick_shed_victim(queued: Iterable[S], priority: int) -> S | None:
    """Under overload, the queued request a newcomer of ``priority`` displaces: the worst priority
    strictly worse than its own, the latest arrival among equals; None if there is none (then the
    newcomer is the one refused). Shared by one engine and the cluster's gateway."""
    worse = [r for r in queued if r.priority > priority]
    return max(worse, key=lambda r: (r.priority, r.arrival_time)) if worse else None


@dataclass(frozen=True)
class PreemptionCost:
    """Cost model for choosing between swap and recompute.

    ``recompute_s_per_token``: time to prefill one token again. ``swap_s_per_block``: time to copy
    one KV block out *and* back in.
    """

    recompute_s_per_token: float = 5e-4
    swap_s_per_block: float = 2e-4
    force: PreemptionMode | None = None  # always this mode when possible

    def choose(self, num_computed_tokens: int, num_blocks: int, swap_blocks_free: int) -> PreemptionMode:
        """Swap or recompute a request of ``num_computed_tokens`` whose swap copies ``num_blocks``."""
        if num_computed_tokens == 0 or num_blocks > swap_blocks_free:
            return PreemptionMode.RECOMPUTE
        if self.force is not None:
            return self.force
        swap = num_blocks * self.swap_s_per_block
        recompute = num_computed_tokens * self.recompute_s_per_token
        return PreemptionMode.SWAP if swap < recompute else PreemptionMode.RECOMPUTE
