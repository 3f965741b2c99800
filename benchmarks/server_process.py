"""`shoal serve` in a subprocess, for the benchmarks that measure a real server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`shoal serve` in a subprocess on a free loopback port, its output in ``log_dir/name.log``.
    ``command`` replaces ``shoal serve`` (another OpenAI server; it gets ``--port PORT`` appended);
    ``checkout`` serves the Shoal of another source tree (a ``git worktree``) instead of the installed one."""

    def __init__(self, *args: str, log_dir: Path, name: str, command: list[str] | None = None,
                 env: dict[str, str] | None = None, checkout: Path | None = None) -> None:
        if checkout is not None:
            command = [sys.executable, "-m", "shoal", "serve"]
            env = {**(env or os.environ), "PYTHONPATH": str(checkout.resolve())}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"{name}.log", "w")
        cmd = [*(command or ["shoal", "serve"]), *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not come up")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def measure_levels(url: str, tokenizer, levels: dict[int, int], prompt_len: int, output_len: int) -> dict:
    """Output tok/s, TTFT p50 and failures of closed-loop runs at each ``{concurrency: requests}``."""
    import asyncio

    from shoal.bench import report
    from shoal.bench.serve import run_workload
    from shoal.bench.workloads import closed_loop

    out: dict = {}
    for c, n in levels.items():
        wl = closed_loop(n, c, prompt_len, output_len)
        records, _, duration = asyncio.run(run_workload(url, wl, tokenizer, concurrency=c))
        r = report.summarize(records, wl.description, 2000, 200, duration_s=duration)
        out[c] = {"tok_s": round(r["output_token_throughput"], 1), "ttft_p50_ms": round(r["ttft_ms"]["p50"], 1),
                  "failed": r["failed"]}
    return out
