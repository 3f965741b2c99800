"""The live dashboard (``/dashboard``): a static page (vanilla JS, SVG charts, no CDN) that polls
``/dashboard/state`` every second for the instances' rows, a rolling history of throughput and
latency, and the cluster's events (migrations, P/D transfers, scaling, deaths).

The state reveals load only, never a prompt or a key; it needs the API key when ``/metrics`` does.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from shoal.engine.outputs import InstanceLoad, RequestOutput
from shoal.server.lifecycle import Lifecycle

STATIC_DIR = Path(__file__).with_name("dashboard_static")
COLUMNS = ("tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0-1) of ``values``, linearly interpolated (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class _Bucket:
    """What one interval saw: tokens out, requests finished, and their TTFT / TPOT samples."""

    key: int  # the interval's index: floor(time / interval)
    tokens: int = 0
    requests: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)


class RollingHistory:
    """Per interval (``interval_s``) over the last ``window_s`` seconds: output tokens/s, finished
    requests/s, and the TTFT and TPOT p50 / p90 of the requests finished in it; plus totals since
    start. TTFT runs from arrival to the first token seen here, TPOT from that token to the last
    (as ``/metrics`` measures them). Fed the outputs as they come; safe from any thread."""

    def __init__(self, window_s: float = 600.0, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._points: deque[tuple[int, tuple[float | None, ...]]] = deque(maxlen=max(1, round(window_s / interval_s)))
        self._open: _Bucket | None = None
        self._first: dict[str, tuple[float, float]] = {}  # in-flight req_id -> (first token seen, its TTFT)
        self.total_tokens = 0
        self.total_requests = 0
        self._lock = threading.Lock()

    def observe(self, outputs: Iterable[RequestOutput], now: float) -> None:
        """Account one step's outputs at ``now`` (the clock of the outputs' ``arrival_time``)."""
        with self._lock:
            bucket = self._advance(now)
            for out in outputs:
                if out.new_token_ids:
                    bucket.tokens += len(out.new_token_ids)
                    self.total_tokens += len(out.new_token_ids)
                    self._first.setdefault(out.req_id, (now, now - out.arrival_time))
                if out.finished:
                    bucket.requests += 1
                    self.total_requests += 1
                    first = self._first.pop(out.req_id, None)
                    if first is not None:
                        bucket.ttft.append(first[1])
                        if out.num_output_tokens > 1:
                            bucket.tpot.append((now - first[0]) / (out.num_output_tokens - 1))

    def snapshot(self, now: float) -> dict[str, Any]:
        """The closed intervals as columns: ``t`` is each one's end in seconds relative to ``now``
        (<= 0); a percentile without samples is None."""
        with self._lock:
            self._advance(now)
            points = list(self._points)
            totals = {"output_tokens": self.total_tokens, "requests": self.total_requests}
        series: dict[str, list] = {"t": [round((k + 1) * self.interval_s - now, 3) for k, _ in points]}
        for i, name in enumerate(COLUMNS):
            series[name] = [None if p[i] is None else round(p[i], 6) for _, p in points]
        return {"interval_s": self.interval_s, "window_s": self._points.maxlen * self.interval_s,
                "series": series, "totals": totals}

    def _advance(self, now: float) -> _Bucket:
        """The interval ``now`` falls in; a passed one is closed first, skipped ones recorded as idle."""
        key = math.floor(now / self.interval_s)
        if self._open is None:
            self._open = _Bucket(key)
        elif key > self._open.key:  # an earlier ``now`` (another thread's) stays in the open interval
            self._points.append((self._open.key, self._close(self._open)))
            idle = min(key - self._open.key - 1, self._points.maxlen or 0)
            self._points.extend((k, (0.0, 0.0, None, None, None, None)) for k in range(key - idle, key))
            self._open = _Bucket(key)
        return self._open

    def _close(self, b: _Bucket) -> tuple[float | None, ...]:
        return (b.tokens / self.interval_s, b.requests / self.interval_s, percentile(b.ttft, 0.5),
                percentile(b.ttft, 0.9), percentile(b.tpot, 0.5), percentile(b.tpot, 0.9))


def instance_row(instance_id: int, role: str, state: str, load: InstanceLoad | None) -> dict[str, Any]:
    """One row of the instances table (a starting or dead instance has no load: None counts)."""
    counts = {"running": None, "waiting": None, "swapped": None, "kv_usage": None} if load is None else {
        "running": load.num_running, "waiting": load.num_waiting, "swapped": load.num_swapped,
        "kv_usage": round(load.kv_usage, 4)}
    return {"id": instance_id, "role": role, "state": state, **counts}


def instance_rows(engine: Any, accepting: bool) -> list[dict[str, Any]]:
    """A cluster's rows from its ``instance_states()``; else the one engine's (draining once the
    server stops accepting)."""
    if hasattr(engine, "instance_states"):
        return [instance_row(*s) for s in engine.instance_states()]
    state = "dead" if engine.dead else "running" if accepting else "draining"
    return [instance_row(0, "both", state, engine.load())]


def add_dashboard(app: FastAPI, engine: Any, history: RollingHistory, lifecycle: Lifecycle, model_name: str) -> None:
    """Serve the page at ``/dashboard``, its assets under ``/dashboard/static/``, and the JSON it
    polls at ``/dashboard/state`` (``events`` are the backend's own, a cluster's, newest last)."""

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/state", include_in_schema=False)
    async def dashboard_state() -> dict[str, Any]:
        return {"model": model_name, "time": time.time(), "instances": instance_rows(engine, lifecycle.accepting),
                "events": list(getattr(engine, "events", ())), **history.snapshot(time.monotonic())}

    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
