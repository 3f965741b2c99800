"""Capacity as DistServe measures it: the highest arrival rate at which a target fraction of
requests meets both SLOs.

The rate is varied through the trace's time scale (arrival gaps multiplied by it: smaller is
busier), so the requests themselves stay the same. :func:`find_capacity` bisects the time scale
between a busy and a light bound on a monotone assumption (attainment falls as load rises).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class CapacityResult:
    time_scale: float  # the busiest time scale found that meets the target
    rate_rps: float  # its arrival rate
    result: dict  # the run's result JSON at that time scale
    probes: list[tuple[float, float]]  # (time scale, attainment) of every run, in order


def find_capacity(run: Callable[[float], dict], target: float = 0.9, lo: float = 0.25, hi: float = 4.0,
                  rel_tol: float = 0.02) -> CapacityResult | None:
    """``run(time_scale)`` returns a result JSON with ``slo_attainment`` and ``workload.rate``.
    Searches ``[lo, hi]`` until the bounds are within ``rel_tol`` of each other. None when even
    ``hi`` (the lightest load) misses the target."""
    if not 0 < target <= 1:
        raise ValueError(f"the attainment target must be in (0, 1], got {target}")
    if not 0 < lo < hi:
        raise ValueError("the time-scale bounds must satisfy 0 < lo < hi")
    probes: list[tuple[float, float]] = []
    results: dict[float, dict] = {}

    def meets(ts: float) -> bool:
        results[ts] = run(ts)
        probes.append((ts, results[ts]["slo_attainment"]))
        return results[ts]["slo_attainment"] >= target

    if not meets(hi):
        return None
    if meets(lo):
        hi = lo
    else:
        while hi / lo > 1 + rel_tol:
            mid = (lo * hi) ** 0.5  # geometric: the rate is 1 / time scale
            if meets(mid):
                hi = mid
            else:
                lo = mid
    best = results[hi]
    return CapacityResult(hi, best["workload"].get("rate") or 0.0, best, probes)
