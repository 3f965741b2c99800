"""``shoal plan``: the cheapest GPU mix that meets the SLO (Mélange), checked by simulation (APEX).

1. Split the workload's requests into size buckets (by prompt + output tokens).
2. For each bucket and GPU type, and each candidate engine configuration (max batch, chunk size),
   find by simulation the highest request rate one instance sustains with the SLO attainment
   target met; keep the best configuration per GPU type.
3. Solve Mélange's integer program: choose instance counts ``n_g`` and the share ``x_bg`` of
   bucket ``b`` sent to type ``g`` minimizing cost, with every bucket fully served and every type's
   load within its instances' capacity (``scipy.optimize.milp``).
4. Simulate the whole workload on the chosen mix and report its goodput and attainment.
5. If that check misses the target (one instance's capacity, measured alone under Poisson
   arrivals, can overstate what a fleet sharing a burstier workload sustains), solve again with
   every capacity scaled down (a headroom) until a mix passes the check, within a few tries, and
   offer it as the suggestion.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from shoal.bench.report import summarize
from shoal.bench.workloads import RequestSpec, Workload
from shoal.control.policies import LeastLoad
from shoal.progress import Progress
from shoal.sim.catalog import GPU, ModelShape, RooflineCostModel
from shoal.sim.simulator import InstanceSpec, simulate

CONFIGS = ({"max_num_seqs": 32, "max_num_batched_tokens": 512}, {"max_num_seqs": 128, "max_num_batched_tokens": 2048})


@dataclass
class Plan:
    counts: dict[str, int]
    cost_per_hour: float
    configs: dict[str, dict]
    capacity_rps: dict[str, list[float]]  # per GPU type, per bucket
    buckets: list[tuple[int, int]]  # token-size range of each bucket
    bucket_rps: list[float]
    shares: dict[str, list[float]]  # per GPU type, the fraction of each bucket it serves
    headroom: float = 1.0  # the fraction of each measured capacity the integer program counted on
    verification: dict | None = None
    meets_target: bool | None = None  # whether the verification met the attainment target
    suggestion: Plan | None = None  # when it did not: a dearer mix (smaller headroom) that does, if found


@dataclass
class Capacities:
    """What the capacity search found: each bucket's size range and rate, and per usable GPU type
    its best engine configuration, that instance's spec and its capacity (req/s) per bucket."""

    buckets: list[tuple[int, int]]
    bucket_rps: list[float]
    caps: dict[str, list[float]]
    configs: dict[str, dict]
    specs: dict[str, InstanceSpec]


def instance_spec(gpu: GPU, model: ModelShape, config: dict) -> InstanceSpec | None:
    """One simulated instance of ``model`` on ``gpu`` with engine ``config`` (None when the weights
    leave too little room for KV)."""
    cost = RooflineCostModel(gpu, model)
    blocks = cost.kv_blocks()
    if blocks < 64:
        return None
    return InstanceSpec(cost, num_blocks=blocks, num_swap_blocks=blocks, max_model_len=model.max_model_len,
                        vocab_size=model.vocab, **config)


def _retime(reqs: list[RequestSpec], rate: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, len(reqs)))
    arrivals -= arrivals[0]
    return Workload("poisson", [RequestSpec(float(a), r.prompt_len, r.output_len) for a, r in zip(arrivals, reqs)],
                    {"kind": "poisson", "rate": rate})


def _attainment(reqs: list[RequestSpec], spec: InstanceSpec, rate: float, slo: tuple[float, float], seed: int) -> float:
    records, duration, _ = simulate(_retime(reqs, rate, seed), [spec], LeastLoad(), seed)
    return summarize(records, {}, slo[0], slo[1], duration)["slo_attainment"]


def max_rate(reqs: list[RequestSpec], spec: InstanceSpec, slo: tuple[float, float], target: float,
             seed: int = 0, iters: int = 7) -> float:
    """Highest Poisson rate (req/s) at which one instance meets ``target`` SLO attainment."""
    lo, hi = 0.0, 1.0
    while _attainment(reqs, spec, hi, slo, seed) >= target and hi < 1e4:
        lo, hi = hi, hi * 4
    if lo == 0.0 and _attainment(reqs, spec, 1e-3, slo, seed) < target:
        return 0.0  # even a trickle misses the SLO (requests too big for this GPU)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _attainment(reqs, spec, mid, slo, seed) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def capacities(workload: Workload, model: ModelShape, gpus: dict[str, GPU], slo: tuple[float, float],
               target: float, num_buckets: int = 3, sample: int = 150, seed: int = 0,
               progress: Progress | None = None) -> Capacities:
    """Steps 1 and 2: bucket the requests and measure each GPU type's capacity per bucket
    (``progress`` hears of each rate search)."""
    reqs = workload.requests
    span = max(reqs[-1].arrival_s - reqs[0].arrival_s, 1e-9)
    total_rate = len(reqs) / span
    sizes = np.array([r.prompt_len + r.output_len for r in reqs])
    edges = np.quantile(sizes, np.linspace(0, 1, num_buckets + 1))
    which = np.clip(np.searchsorted(edges, sizes, side="right") - 1, 0, num_buckets - 1)
    rng = np.random.default_rng(seed)
    bucket_reqs, bucket_rps, bucket_ranges = [], [], []
    for b in range(num_buckets):
        members = [reqs[i] for i in np.flatnonzero(which == b)]
        if not members:
            continue
        pick = rng.choice(len(members), size=min(sample, len(members)), replace=False)
        bucket_reqs.append([members[i] for i in pick])
        bucket_rps.append(total_rate * len(members) / len(reqs))
        bucket_ranges.append((int(min(r.prompt_len + r.output_len for r in members)),
                              int(max(r.prompt_len + r.output_len for r in members))))
    found = Capacities(bucket_ranges, bucket_rps, {}, {}, {})
    usable = {name: gpu for name, gpu in gpus.items() if instance_spec(gpu, model, CONFIGS[0]) is not None}
    steps, done = len(usable) * len(CONFIGS) * len(bucket_reqs), 0
    for name, gpu in usable.items():
        best = None
        for cfg in CONFIGS:
            spec = instance_spec(gpu, model, cfg)
            cap = []
            for br in bucket_reqs:
                cap.append(max_rate(br, spec, slo, target, seed))
                done += 1
                if progress is not None:
                    progress(done, steps)
            if best is None or sum(cap) > sum(best[0]):
                best = (cap, cfg, spec)
        found.caps[name], found.configs[name], found.specs[name] = best
    return found


@contextmanager
def _c_stdout_silenced() -> Iterator[None]:
    """Drop what C code prints to stdout (file descriptor 1) meanwhile: HiGHS, the MILP solver,
    prints debug lines with ``printf`` whatever ``disp`` says, and stdout carries results."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        try:
            ctypes.CDLL(None).fflush(None)  # C's buffered output goes before fd 1 is restored
        except (OSError, AttributeError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def solve(found: Capacities, gpus: dict[str, GPU], headroom: float = 1.0) -> Plan:
    """Step 3: the cheapest mix (counts and shares) counting on ``headroom`` times each capacity."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    caps = {g: [c * headroom for c in found.caps[g]] for g in found.caps}
    names = [g for g in caps if any(c > 0 for c in caps[g])]
    if not names:
        raise ValueError("no GPU type in the catalog meets the SLO for this workload")
    bucket_rps = found.bucket_rps
    nb, ng = len(bucket_rps), len(names)
    # variables: n_g (ng ints), then x_bg (nb * ng in [0, 1]), x index b * ng + g
    c = np.concatenate([[gpus[g].price_per_hour for g in names], np.zeros(nb * ng)])
    rows, lo, hi = [], [], []
    for b in range(nb):  # every bucket fully served
        row = np.zeros(ng + nb * ng)
        row[ng + b * ng : ng + (b + 1) * ng] = 1
        rows.append(row), lo.append(1), hi.append(1)
    for g, name in enumerate(names):  # load on type g within its instances' capacity
        row = np.zeros(ng + nb * ng)
        row[g] = -1
        for b in range(nb):
            cap = caps[name][b]
            row[ng + b * ng + g] = bucket_rps[b] / cap if cap > 0 else 1e9
        rows.append(row), lo.append(-np.inf), hi.append(0)
    integrality = np.concatenate([np.ones(ng), np.zeros(nb * ng)])
    with _c_stdout_silenced():
        res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
                   bounds=Bounds(np.zeros(ng + nb * ng), np.concatenate([np.full(ng, 1000), np.ones(nb * ng)])))
    if not res.success:
        raise ValueError(f"the integer program found no plan: {res.message}")
    counts = {names[g]: int(round(res.x[g])) for g in range(ng) if round(res.x[g]) > 0}
    shares = {names[g]: [float(res.x[ng + b * ng + g]) for b in range(nb)] for g in range(ng) if names[g] in counts}
    return Plan(counts=counts, cost_per_hour=float(sum(gpus[g].price_per_hour * n for g, n in counts.items())),
                configs={g: found.configs[g] for g in counts}, capacity_rps={g: found.caps[g] for g in names},
                buckets=found.buckets, bucket_rps=bucket_rps, shares=shares, headroom=headroom)


def verify(plan: Plan, workload: Workload, found: Capacities, slo: tuple[float, float], target: float,
           seed: int = 0, progress: Progress | None = None) -> None:
    """Step 4: simulate the whole workload on the plan's mix; sets its verification and meets_target."""
    fleet = [replace(found.specs[g]) for g, n in plan.counts.items() for _ in range(n)]
    records, duration, _ = simulate(workload, fleet, LeastLoad(), seed, progress=progress)
    plan.verification = summarize(records, workload.description, slo[0], slo[1], duration)
    plan.meets_target = plan.verification["slo_attainment"] >= target


def meet_target(plan: Plan, workload: Workload, found: Capacities, gpus: dict[str, GPU], slo: tuple[float, float],
                target: float, seed: int = 0, tries: int = 5, shrink: float = 0.85,
                progress: Progress | None = None) -> Plan | None:
    """Step 5: the first mix, solving with ever smaller headroom (times ``shrink`` a round), whose
    simulation meets ``target``; each new mix is one of at most ``tries`` simulations (``progress``
    hears of each). None if none does."""
    seen = {tuple(sorted(plan.counts.items()))}
    headroom = plan.headroom
    for k in range(tries):
        cand = plan
        while tuple(sorted(cand.counts.items())) in seen:  # the same mix again: no need to simulate it
            headroom *= shrink
            try:
                cand = solve(found, gpus, headroom)
            except ValueError:  # more instances than the integer program allows
                return None
        seen.add(tuple(sorted(cand.counts.items())))
        verify(cand, workload, found, slo, target, seed)
        if progress is not None:
            progress(k + 1, tries)
        if cand.meets_target:
            return cand
    return None


def make_plan(workload: Workload, model: ModelShape, gpus: dict[str, GPU], slo_ttft_ms: float,
              slo_tpot_ms: float, target: float = 0.9, num_buckets: int = 3, sample: int = 150,
              seed: int = 0, verify_plan: bool = True, tries: int = 5,
              progress: Progress | None = None) -> Plan:
    """Steps 1 to 5 (4 and 5 only with ``verify_plan``). ``progress`` counts the capacity search's
    rate searches, then the verification and each try of step 5."""
    slo = (slo_ttft_ms, slo_tpot_ms)
    tick = progress or (lambda done, total: None)
    found = capacities(workload, model, gpus, slo, target, num_buckets, sample, seed,
                       lambda done, total: tick(done, total + verify_plan))
    plan = solve(found, gpus)
    if verify_plan:
        steps = len(found.caps) * len(CONFIGS) * len(found.buckets) + 1
        verify(plan, workload, found, slo, target, seed)
        tick(steps, steps)
        if not plan.meets_target:
            plan.suggestion = meet_target(plan, workload, found, gpus, slo, target, seed, tries,
                                          progress=lambda done, total: tick(steps + done, steps + total))
    return plan
