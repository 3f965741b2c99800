"""One result format for real and simulated serving runs, and its plots.

``summarize`` turns per-request records into the JSON object of ``design.md``; ``plot`` draws the
latency CDFs and the throughput / queue timelines. ``shoal bench serve`` and ``shoal sim`` both
use them, so a real run and a simulated one compare line by line.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RequestRecord:
    """What happened to one request; times in seconds from the start of the run."""

    arrival_s: float
    prompt_len: int
    output_len: int  # requested
    start_s: float | None = None  # when it was actually sent
    first_token_s: float | None = None
    end_s: float | None = None
    output_tokens: int = 0
    token_times_s: list[float] = field(default_factory=list)
    error: str | None = None
    tenant: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None and self.output_tokens > 0

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.start_s  # type: ignore[operator]

    @property
    def e2e(self) -> float:
        return self.end_s - self.start_s  # type: ignore[operator]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for single-token outputs)."""
        if self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)  # type: ignore[operator]

    @property
    def itls(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]


def stats(xs: list[float], scale: float = 1e3) -> dict[str, float]:
    """mean / p50 / p90 / p99 of ``xs`` times ``scale`` (ms by default); zeros when empty."""
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    q = np.percentile(np.asarray(xs, dtype=np.float64), [50, 90, 99])
    return {"mean": statistics.fmean(xs) * scale, "p50": q[0] * scale, "p90": q[1] * scale, "p99": q[2] * scale}


def summarize(records: list[RequestRecord], workload: dict, slo_ttft_ms: float, slo_tpot_ms: float,
              duration_s: float | None = None, extra: dict | None = None) -> dict:
    """The result JSON: throughput, latency percentiles, goodput (DistServe: requests per second
    meeting both the TTFT and the TPOT SLO) and SLO attainment."""
    ok = [r for r in records if r.ok]
    if duration_s is None:
        ends = [r.end_s for r in records if r.end_s is not None]
        duration_s = max(ends) if ends else 0.0
    duration_s = max(duration_s, 1e-9)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = [r for r in ok if r.ttft * 1e3 <= slo_ttft_ms and (r.tpot is None or r.tpot * 1e3 <= slo_tpot_ms)]
    out_tokens = sum(r.output_tokens for r in ok)
    result = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_token_throughput": out_tokens / duration_s,
        "input_token_throughput": sum(r.prompt_len for r in ok) / duration_s,
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats(tpots),
        "itl_ms": stats([x for r in ok for x in r.itls]),
        "e2e_ms": stats([r.e2e for r in ok]),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput_rps": len(good) / duration_s,
        "slo_attainment": len(good) / len(records) if records else 0.0,
        "workload": workload,
    }
    if any(r.tenant is not None for r in records):
        result["tenants"] = per_tenant(records)
    errors = sorted({r.error for r in records if r.error})
    if errors:
        result["errors"] = errors[:10]
    if extra:
        result.update(extra)
    return result


def per_tenant(records: list[RequestRecord]) -> dict[str, dict]:
    """Each tenant's requests, failures, TTFT and E2E, and the tokens it was served while every
    tenant was still sending (up to the earliest last arrival): under saturation, the fair-share
    split."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(str(r.tenant), []).append(r)
    window = min(max(r.arrival_s for r in rs) for rs in groups.values())
    out = {}
    for name, rs in sorted(groups.items()):
        ok = [r for r in rs if r.ok]
        served = sum(r.prompt_len for r in rs if r.first_token_s is not None and r.first_token_s <= window) + \
            sum(1 for r in rs for t in r.token_times_s if t <= window)
        out[name] = {"num_requests": len(rs), "completed": len(ok), "failed": len(rs) - len(ok),
                     "ttft_ms": stats([r.ttft for r in ok]), "e2e_ms": stats([r.e2e for r in ok]),
                     "output_tokens": sum(r.output_tokens for r in ok),
                     "tokens_served_while_all_send": served}
    return {"window_s": window, "by_tenant": out}


def write(out_dir: Path, result: dict, records: list[RequestRecord],
          queue_samples: list[tuple[float, float]] | None = None) -> None:
    """Write result.json, requests.jsonl and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    with (out_dir / "requests.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    plot(out_dir, records, queue_samples or [])


def plot(out_dir: Path, records: list[RequestRecord], queue_samples: list[tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    series = [("TTFT", [r.ttft for r in ok]), ("TPOT", [t for r in ok if (t := r.tpot) is not None]),
              ("E2E", [r.e2e for r in ok])]
    for ax, (name, xs) in zip(axes, series):
        if xs:
            xs = np.sort(np.asarray(xs) * 1e3)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=100)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    times = [t for r in ok for t in r.token_times_s]
    if times:
        bins = np.arange(0, max(times) + 1.0, 1.0)
        counts, edges = np.histogram(times, bins=bins) if len(bins) > 1 else (np.array([len(times)]), np.array([0, 1]))
        ax1.plot(edges[:-1], counts)
    ax1.set_ylabel("output tokens / s")
    ax1.grid(alpha=0.3)
    events = sorted([(r.start_s, 1) for r in records if r.start_s is not None]
                    + [(r.end_s, -1) for r in records if r.end_s is not None and r.start_s is not None])
    if events:
        ts, level = [0.0], [0]
        for t, d in events:
            ts.append(t)
            level.append(level[-1] + d)
        ax2.step(ts, level, where="post", label="in flight (client)")
    if queue_samples:
        qt, qv = zip(*queue_samples)
        ax2.plot(qt, qv, label="waiting (server)")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("requests")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "timeline.png", dpi=100)
    plt.close(fig)
