"""``shoal plan``: the cheapest GPU mix that meets the SLO (Mélange), checked by simulation (APEX).

1. Split the workload's requests into size buckets (by prompt + output tokens).
2. For each bucket and GPU type, and each candidate engine configuration (max batch, chunk size),
   find by simulation the highest request rate one instance sustains with the SLO attainment
   target met; keep the best configuration per GPU type.
3. Solve Mélange's integer program: choose instance counts ``n_g`` and the share ``x_bg`` of
   bucket ``b`` sent to type ``g`` minimizing cost, with every bucket fully served and every type's
   load within its instances' capacity (``scipy.optimize.milp``).
4. Simulate the whole workload on the chosen mix and report its goodput and attainment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from shoal.bench.report import summarize
from shoal.bench.workloads import RequestSpec, Workload
from shoal.control.policies import LeastLoad
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
    verification: dict | None = None


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


def make_plan(workload: Workload, model: ModelShape, gpus: dict[str, GPU], slo_ttft_ms: float,
              slo_tpot_ms: float, target: float = 0.9, num_buckets: int = 3, sample: int = 150,
              seed: int = 0, verify: bool = True) -> Plan:
    from scipy.optimize import Bounds, LinearConstraint, milp

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
    slo = (slo_ttft_ms, slo_tpot_ms)
    caps: dict[str, list[float]] = {}
    configs: dict[str, dict] = {}
    specs: dict[str, InstanceSpec] = {}
    for name, gpu in gpus.items():
        cost = RooflineCostModel(gpu, model)
        blocks = cost.kv_blocks()
        if blocks < 64:
            continue  # the model does not fit with room for KV
        best = None
        for cfg in CONFIGS:
            spec = InstanceSpec(cost, num_blocks=blocks, num_swap_blocks=blocks, max_model_len=model.max_model_len,
                                vocab_size=model.vocab, **cfg)
            cap = [max_rate(br, spec, slo, target, seed) for br in bucket_reqs]
            if best is None or sum(cap) > sum(best[0]):
                best = (cap, cfg, spec)
        caps[name], configs[name], specs[name] = best
    names = [g for g in caps if any(c > 0 for c in caps[g])]
    if not names:
        raise ValueError("no GPU type in the catalog meets the SLO for this workload")
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
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(ng + nb * ng), np.concatenate([np.full(ng, 1000), np.ones(nb * ng)])))
    if not res.success:
        raise ValueError(f"the integer program found no plan: {res.message}")
    counts = {names[g]: int(round(res.x[g])) for g in range(ng) if round(res.x[g]) > 0}
    shares = {names[g]: [float(res.x[ng + b * ng + g]) for b in range(nb)] for g in range(ng) if names[g] in counts}
    plan = Plan(counts=counts, cost_per_hour=float(sum(gpus[g].price_per_hour * n for g, n in counts.items())),
                configs={g: configs[g] for g in counts}, capacity_rps={g: caps[g] for g in names},
                buckets=bucket_ranges, bucket_rps=bucket_rps, shares=shares)
    if verify:
        fleet = [replace(specs[g]) for g, n in counts.items() for _ in range(n)]
        records, duration, _ = simulate(workload, fleet, LeastLoad(), seed)
        plan.verification = summarize(records, workload.description, slo_ttft_ms, slo_tpot_ms, duration)
    return plan
