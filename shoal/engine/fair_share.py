"""Weighted fair share between tenants: the Virtual Token Counter (VTC; Sheng et al., "Fairness in
Serving Large Language Models", OSDI 2024).

Each tenant has a counter of the service it received: prompt tokens when one of its requests is
admitted, output tokens as they are generated, each divided by the tenant's weight. The scheduler
admits from the tenant with the smallest counter, so backlogged tenants receive tokens in
proportion to their weights. A tenant that was idle cannot bank credit: when it becomes backlogged
again its counter is lifted to the smallest counter among the tenants already backlogged. Nothing
is reserved, so a lone tenant gets the whole engine (work-conserving).

Pure bookkeeping over tenant names; the scheduler decides when to charge and whom to admit.
"""

from __future__ import annotations

from typing import Iterable

MAX_IDLE_COUNTERS = 4096
"""Counters of tenants with nothing queued kept at most (the ``user`` field names tenants freely;
a dropped counter is only the lift's floor, which the next arrival recomputes)."""


class VirtualTokenCounter:
    """Per-tenant virtual counters. ``prompt_weight`` and ``output_weight`` price one prompt and
    one output token (VTC's ``w_p`` and ``w_q``)."""

    def __init__(self, prompt_weight: float = 1.0, output_weight: float = 1.0) -> None:
        if not (prompt_weight >= 0 and output_weight >= 0):
            raise ValueError("VTC token weights must be non-negative")
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self.counters: dict[str | None, float] = {}

    def value(self, tenant: str | None) -> float:
        return self.counters.get(tenant, 0.0)

    def arrive(self, tenant: str | None, backlogged: Iterable[str | None]) -> None:
        """A request of ``tenant`` joins the queue; ``backlogged`` are the tenants that already have
        queued or running requests. A tenant that was idle is lifted to the least counter among
        them (to the greatest counter seen when none is), so idling earns it nothing."""
        backlogged = set(backlogged)
        if tenant in backlogged:
            return
        if len(self.counters) > MAX_IDLE_COUNTERS:
            self.counters = {t: c for t, c in self.counters.items() if t in backlogged}
        floor = min((self.value(t) for t in backlogged), default=max(self.counters.values(), default=0.0))
        self.counters[tenant] = max(self.value(tenant), floor)

    def charge(self, tenant: str | None, prompt_tokens: int, output_tokens: int, weight: float) -> None:
        """Count service given to ``tenant`` (whose weight is ``weight``)."""
        cost = prompt_tokens * self.prompt_weight + output_tokens * self.output_weight
        self.counters[tenant] = self.value(tenant) + cost / weight
