"""Workloads: when requests arrive and how long their prompts and outputs are.

Shared by ``shoal bench serve`` (real server) and the simulator, so both replay the same requests.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float  # seconds after the start of the run
    prompt_len: int
    output_len: int
    prefix_group: int | None = None  # requests of one group share their first ``prefix_len`` tokens
    prefix_len: int = 0
    tenant: str | None = None  # who sends it (``user`` over HTTP)
    weight: float = 1.0  # its tenant's fair-share weight (a keys file's, on a real server)


@dataclass
class Workload:
    kind: str
    requests: list[RequestSpec]
    description: dict = field(default_factory=dict)  # goes into the result JSON as is

    def of_tenant(self, tenant: str | None) -> "Workload":
        """The requests ``tenant`` sends, alone (e.g. to measure what it gets without the others)."""
        return Workload(self.kind, [r for r in self.requests if r.tenant == tenant], self.description)


def synthetic(
    kind: str,
    num_requests: int,
    rate: float,
    prompt_len: int,
    output_len: int,
    burstiness: float = 1.0,
    seed: int = 0,
    len_jitter: float = 0.0,
) -> Workload:
    """Poisson (exponential gaps) or Gamma arrivals at mean ``rate`` req/s.

    Gamma gaps have shape ``burstiness`` and the same mean: below 1 traffic comes in bursts (as
    BurstGPT's authors fit real traffic), 1 is Poisson, above 1 is smoother. ``len_jitter`` draws
    lengths uniformly within +-that fraction."""
    if kind not in ("poisson", "gamma"):
        raise ValueError(f"unknown arrival process {kind!r}")
    if rate <= 0 or num_requests <= 0 or burstiness <= 0:
        raise ValueError("rate, num_requests and burstiness must be positive")
    rng = np.random.default_rng(seed)
    shape = 1.0 if kind == "poisson" else burstiness
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=num_requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, round(mean * (1 - len_jitter))), max(1, round(mean * (1 + len_jitter)))
        return rng.integers(lo, hi + 1, size=num_requests)

    p, o = lengths(prompt_len), lengths(output_len)
    reqs = [RequestSpec(float(a), int(x), int(y)) for a, x, y in zip(arrivals, p, o)]
    desc = {"kind": kind, "rate": rate, "num_requests": num_requests, "prompt_len": prompt_len,
            "output_len": output_len, "seed": seed}
    if kind == "gamma":
        desc["burstiness"] = burstiness
    return Workload(kind, reqs, desc)


def with_prefix_groups(workload: Workload, groups: int, prefix_len: int, seed: int = 0) -> Workload:
    """The same requests, each in one of ``groups`` prefix groups (drawn Zipf-like: a few system
    prompts / conversations are much more common than the rest) whose members share their first
    ``prefix_len`` prompt tokens (fewer for prompts that short: at least one token stays their
    own). What prefix-aware dispatch and the prefix cache can exploit, as multi-turn chat and
    shared system prompts do."""
    if groups < 1 or prefix_len < 1:
        raise ValueError("prefix groups and prefix length must be positive")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, groups + 1)
    picks = rng.choice(groups, size=len(workload.requests), p=weights / weights.sum())
    reqs = [replace(r, prefix_group=int(g), prefix_len=min(prefix_len, r.prompt_len - 1))
            for r, g in zip(workload.requests, picks)]
    return Workload(workload.kind, reqs, {**workload.description, "prefix_groups": groups, "prefix_len": prefix_len})


def parse_shares(text: str, what: str) -> dict[str, float]:
    """``"heavy=10,light=1"`` as ``{"heavy": 10.0, "light": 1.0}``; ValueError naming ``what``."""
    shares: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not name or not number > 0 or number == float("inf") or name in shares:
            raise ValueError(f"{what}: expected NAME=NUMBER pairs (numbers > 0, names once), got {part.strip()!r}")
        shares[name] = number
    return shares


def with_tenants(workload: Workload, shares: dict[str, float], weights: dict[str, float] | None = None,
                 seed: int = 0) -> Workload:
    """The same arrivals, each sent by a tenant drawn in proportion to ``shares`` (splitting a
    Poisson stream this way gives each tenant a Poisson stream of its share of the rate), with its
    fair-share weight from ``weights`` (default 1)."""
    weights = weights or {}
    unknown = set(weights) - set(shares)
    if unknown:
        raise ValueError(f"tenant weights name tenants with no share: {sorted(unknown)}")
    names = list(shares)
    p = np.array([shares[n] for n in names], dtype=np.float64)
    picks = np.random.default_rng(seed + 1).choice(len(names), size=len(workload.requests), p=p / p.sum())
    reqs = [replace(r, tenant=names[k], weight=weights.get(names[k], 1.0)) for r, k in zip(workload.requests, picks)]
    desc = {**workload.description, "tenants": shares}
    if weights:
        desc["tenant_weights"] = weights
    return Workload(workload.kind, reqs, desc)


def closed_loop(num_requests: int, concurrency: int, prompt_len: int, output_len: int) -> Workload:
    """Fixed concurrency: all requests are ready at 0; the runner keeps ``concurrency`` in flight."""
    reqs = [RequestSpec(0.0, prompt_len, output_len) for _ in range(num_requests)]
    return Workload("concurrency", reqs, {"kind": "concurrency", "concurrency": concurrency,
                                          "num_requests": num_requests, "prompt_len": prompt_len,
                                          "output_len": output_len})


def load_trace(
    path: str | Path,
    time_scale: float = 1.0,
    max_context: int | None = None,
    num_requests: int | None = None,
    start_s: float = 0.0,
    max_duration_s: float | None = None,
) -> Workload:
    """Replay a CSV trace in the Azure LLM inference format (``arrived_at, num_prefill_tokens,
    num_decode_tokens``) or BurstGPT's (``Timestamp, Request tokens, Response tokens``).

    Arrival gaps are multiplied by ``time_scale`` (0.5 = twice the rate). Requests longer than
    ``max_context`` are clipped (prompt first cut to leave room for the output, output cut to at
    most half the context), and how many were clipped is reported."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file not found: {path}")
    if time_scale <= 0:
        raise ValueError("time_scale must be positive")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if {"arrived_at", "num_prefill_tokens", "num_decode_tokens"} <= cols:
            keys, fmt = ("arrived_at", "num_prefill_tokens", "num_decode_tokens"), "azure"
        elif {"Timestamp", "Request tokens", "Response tokens"} <= cols:
            keys, fmt = ("Timestamp", "Request tokens", "Response tokens"), "burstgpt"
        else:
            raise ValueError(f"{path}: unknown trace columns {sorted(cols)}; expected the Azure or BurstGPT schema")
        rows = []
        for row in reader:
            t = float(row[keys[0]])
            if t < start_s:
                continue
            if max_duration_s is not None and t - start_s > max_duration_s / time_scale:
                break
            p, o = int(float(row[keys[1]])), int(float(row[keys[2]]))
            if p <= 0 or o <= 0:  # BurstGPT logs failed requests with 0 response tokens
                continue
            rows.append((t, p, o))
            if num_requests is not None and len(rows) >= num_requests:
                break
    if not rows:
        raise ValueError(f"{path}: no requests in the selected window")
    t0 = rows[0][0]
    clipped = 0
    reqs = []
    for t, p, o in rows:
        if max_context is not None and p + o > max_context:
            clipped += 1
            o = min(o, max_context // 2)
            p = min(p, max_context - o)
        reqs.append(RequestSpec((t - t0) * time_scale, p, o))
    duration = reqs[-1].arrival_s
    return Workload("trace", reqs, {
        "kind": "trace", "trace": path.name, "format": fmt, "time_scale": time_scale, "start_s": start_s,
        "num_requests": len(reqs), "span_s": duration, "rate": len(reqs) / duration if duration else None,
        "max_context": max_context, "clipped_requests": clipped,
    })
