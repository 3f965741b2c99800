"""One result format for real and simulated serving runs, its verdict, plots and HTML page.

``summarize`` turns per-request records into the JSON object of ``design.md``; ``verdict`` judges
it in one line (overloaded, failing, or ok); ``latency_figure`` and ``timeline_figure`` draw the
latency CDFs and the throughput / queue timelines; ``write`` puts them all, with a self-contained
``report.html``, in a folder.
``shoal bench serve`` and ``shoal sim`` both use them, so a real run and a simulated one compare
line by line.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OVERLOADED_BELOW = 0.5  # SLO attainment under which a run is called overloaded
DURATION_LIMIT_ERRORS = ("not sent before the duration limit", "cancelled at the duration limit")
SECONDS_ABOVE_MS = 5000.0  # axes and text switch from ms to s past this


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


def _num(x: float) -> str:
    """Three significant digits, never in exponent form: 0.125, 12.5, 1390."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_ms(ms: float) -> str:
    """A latency for people: "850 ms", "12.3 s" (seconds past :data:`SECONDS_ABOVE_MS`)."""
    return f"{_num(ms / 1e3)} s" if ms > SECONDS_ABOVE_MS else f"{_num(ms)} ms"


def verdict(result: dict, advice: str) -> dict:
    """The run judged in one line: ``{"status", "message"}`` with status ``failing`` (requests
    failed other than by running out of time: the first errors are named), ``overloaded`` (under
    :data:`OVERLOADED_BELOW` of the requests met both SLOs, or some were not done by the duration
    limit; ``advice`` says what to change) or ``ok``."""
    n, failed, att = result["num_requests"], result["failed"], result["slo_attainment"]
    errors = result.get("errors") or []
    real_errors = [e for e in errors if e not in DURATION_LIMIT_ERRORS]
    slo = result["slo"]
    latencies = (f"TTFT p50 {fmt_ms(result['ttft_ms']['p50'])} for an SLO of {fmt_ms(slo['ttft_ms'])}, "
                 f"TPOT p50 {fmt_ms(result['tpot_ms']['p50'])} for {fmt_ms(slo['tpot_ms'])}")
    if real_errors:
        return {"status": "failing", "message": f"Failing: {failed} of {n} requests failed ({'; '.join(real_errors[:2])})"}
    if failed or att < OVERLOADED_BELOW:
        late = f"{failed} of {n} requests not done by the duration limit; " if failed else ""
        return {"status": "overloaded",
                "message": f"Overloaded: {late}{att:.0%} of requests met both SLOs ({latencies}); {advice}"}
    return {"status": "ok", "message": f"OK: {att:.0%} of requests met both SLOs ({latencies})"}


def run_title(result: dict) -> str:
    """The run in one line: its workload (kind, rate or time scale, size) and its SLO."""
    wl = result.get("workload") or {}
    parts = [str(wl.get("kind", "workload"))]
    if wl.get("trace"):
        parts.append(str(wl["trace"]))
    if wl.get("concurrency"):
        parts.append(f"concurrency {wl['concurrency']}")
    elif wl.get("rate"):
        parts.append(f"{wl['rate']:.3g} req/s")
    if wl.get("time_scale") not in (None, 1.0):
        parts.append(f"time scale {wl['time_scale']:g}")
    parts.append(f"{result['num_requests']} requests")
    where = f"simulated, {result['instances']} instance{'s' * (result['instances'] != 1)}" \
        if result.get("simulated") else result.get("url", "")
    slo = result["slo"]
    title = f"{', '.join(parts)} | SLO TTFT {fmt_ms(slo['ttft_ms'])}, TPOT {fmt_ms(slo['tpot_ms'])}"
    return f"{title} | {where}" if where else title


def time_unit(max_ms: float) -> tuple[str, float]:
    """The unit an axis of latencies up to ``max_ms`` reads best in, and the factor from ms to it."""
    return ("s", 1e-3) if max_ms > SECONDS_ABOVE_MS else ("ms", 1.0)


def cdf_steps(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF of ``values`` as the corners of a step plot (``where="post"``) from (0, 0):
    nothing is below the fastest request, and each request adds 1/n where it ends."""
    xs = np.sort(np.asarray(values, dtype=np.float64))
    return np.concatenate([[0.0], xs]), np.arange(len(xs) + 1) / max(len(xs), 1)


def integer_ticks(ax: Axes) -> None:
    """Counts (requests, tokens) get whole-number ticks on the y axis."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def latency_figure(result: dict, records: list[RequestRecord]) -> Figure:
    """TTFT, TPOT and E2E CDFs: steps from 0, the SLO drawn, p50 / p90 / p99 marked."""
    from matplotlib.figure import Figure

    ok = [r for r in records if r.ok]
    slo = result["slo"]
    fig = Figure(figsize=(15, 4.5))
    axes = fig.subplots(1, 3)
    series = [("TTFT", [r.ttft * 1e3 for r in ok], slo["ttft_ms"]),
              ("TPOT", [t * 1e3 for r in ok if (t := r.tpot) is not None], slo["tpot_ms"]),
              ("E2E", [r.e2e * 1e3 for r in ok], None)]
    for ax, (name, ms, limit) in zip(axes, series):
        unit, k = time_unit(max(ms + [limit or 0.0]))
        if ms:
            x, y = cdf_steps([v * k for v in ms])
            ax.step(x, y, where="post", color="C0")
            for q, pct in zip(np.percentile(x[1:], [50, 90, 99]), (50, 90, 99)):
                ax.plot([q], [pct / 100], "o", color="C1", markersize=4)
                ax.annotate(f"p{pct} {_num(q)} {unit}", (q, pct / 100), textcoords="offset points", xytext=(6, -10),
                            fontsize=8)
        if limit is not None:
            ax.axvline(limit * k, color="C3", linestyle="--", label=f"SLO {fmt_ms(limit)}")
            ax.legend(loc="best")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"{name} ({unit})")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{name} CDF ({len(ms)} requests)")
        ax.grid(alpha=0.3)
    fig.suptitle(run_title(result), fontsize=10)
    fig.tight_layout()
    return fig


def timeline_figure(result: dict, records: list[RequestRecord], queue_samples: list[tuple[float, float]]) -> Figure:
    """Output tokens per second, and the requests in flight (client) and waiting (server), over time."""
    from matplotlib.figure import Figure

    ok = [r for r in records if r.ok]
    fig = Figure(figsize=(11, 6.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    times = [t for r in ok for t in r.token_times_s]
    if times:
        counts, edges = np.histogram(times, bins=np.arange(0.0, np.floor(max(times)) + 2.0))  # 1 s bins
        ax1.stairs(counts, edges)
    ax1.set_ylabel("output tokens / s")
    integer_ticks(ax1)
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
        ax2.step(qt, qv, where="post", label="waiting (server)")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("requests")
    ax2.set_xlim(left=0)
    ax2.set_ylim(bottom=0)
    integer_ticks(ax2)
    if events or queue_samples:
        ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(run_title(result), fontsize=10)
    fig.tight_layout()
    return fig


PLOTS = ("latency_cdf.png", "timeline.png")


def write(out_dir: Path, result: dict, records: list[RequestRecord],
          queue_samples: list[tuple[float, float]] | None = None) -> None:
    """Write result.json, requests.jsonl, the plots (:data:`PLOTS`) and report.html into ``out_dir``."""
    from shoal.bench import html_report

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    with (out_dir / "requests.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    latency_figure(result, records).savefig(out_dir / PLOTS[0], dpi=100)
    timeline_figure(result, records, queue_samples or []).savefig(out_dir / PLOTS[1], dpi=100)
    html_report.write(out_dir / "report.html", result, [out_dir / name for name in PLOTS])
