"""Reliability benchmark: `shoal serve` under fuzzers, bad input, disconnect storms, overload, a
soak, a killed cluster instance and SIGTERM. Loopback only; every stage is bounded in time.

    python benchmarks/reliability/run.py [--soak-s 600] [--only fuzz,corpus,...] [--out result.json]

Prints one line per stage and a JSON summary (also written to ``--out``). Stages: fuzz (schemathesis
over /openapi.json, every operation, ``--checks all``), corpus (corpus.py), storm (streams
disconnected mid-generation), overload (10x the engine's slots + queue), soak, sigterm, cluster
(an instance killed under load, then SIGTERM on the cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from corpus import cases  # noqa: E402
from server_process import Server  # noqa: E402

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
SLOTS, QUEUE = 8, 8  # --max-num-seqs and --max-waiting of the single-engine server


# ---- stages -----------------------------------------------------------------------------------------


def stage_fuzz(srv: Server, work: Path, examples: int, max_s: float) -> dict:
    har = work / "schemathesis.har"
    cmd = ["schemathesis", "run", f"{srv.url}/openapi.json", "--checks", "all", "--max-examples", str(examples),
           "--seed", "1", "--workers", "2", "--request-timeout", "60", "--max-time", str(int(max_s)),
           "--report", "har", "--report-har-path", str(har), "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_s + 300)
    (work / "schemathesis.txt").write_text(proc.stdout + proc.stderr)
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = [e["response"]["status"] for e in entries]
    checks = dict(re.findall(r"^\s*❌ (ST\d+ [^:]+): (\d+)$", proc.stdout, re.M))
    return {"requests": len(statuses), "5xx": sum(s >= 500 for s in statuses),
            "resets": sum(s == 0 for s in statuses), "exit_code": proc.returncode,
            "failed_checks": {k: int(v) for k, v in checks.items()}}


def stage_corpus(srv: Server) -> dict:
    results, fivexx, resets, not_openai = [], 0, 0, []
    with httpx.Client(base_url=srv.url, timeout=60) as client:  # one keep-alive connection
        for name, method, path, body in cases():
            try:
                r = client.request(method, path, content=body or None, headers={"content-type": "application/json"})
            except httpx.TransportError as exc:
                resets += 1
                results.append((name, f"reset: {exc!r}"))
                continue
            if r.status_code >= 500:
                fivexx += 1
            if r.headers.get("connection") == "close":
                resets += 1
            try:
                ok_shape = set(r.json()["error"]) == {"message", "type", "param", "code"}
            except Exception:
                ok_shape = False
            if not ok_shape:
                not_openai.append(name)
            results.append((name, r.status_code))
    return {"cases": len(results), "5xx": fivexx, "resets": resets, "not_openai_shape": not_openai,
            "statuses": {name: status for name, status in results}}


async def _storm(url: str, n: int, concurrency: int) -> dict:
    """``n`` streams that each hang up after two tokens; a 429 is retried until it gets in."""
    sem = asyncio.Semaphore(concurrency)
    counts = {"disconnected": 0, "retried_429": 0, "other": 0}
    body = {"messages": CHAT, "max_tokens": 128, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one() -> None:
            async with sem:
                while True:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code == 429:
                            counts["retried_429"] += 1
                        else:
                            seen = 0
                            async for line in r.aiter_lines():
                                seen += line.startswith("data: {")
                                if seen >= 3:  # role chunk + two tokens, then hang up
                                    counts["disconnected"] += 1
                                    return
                            counts["other"] += 1
                            return
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one() for _ in range(n)))
    return counts


def stage_storm(srv: Server, n: int) -> dict:
    t0 = time.monotonic()
    counts = asyncio.run(_storm(srv.url, n, SLOTS + QUEUE))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and srv.metric("shoal:num_requests_running") > 0:
        time.sleep(0.2)
    return {**counts, "duration_s": round(time.monotonic() - t0, 1),
            "running_after": srv.metric("shoal:num_requests_running"),
            "waiting_after": srv.metric("shoal:num_requests_waiting"),
            "kv_usage_after": srv.metric("shoal:kv_cache_usage_perc")}


async def _burst(url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    body = {"messages": CHAT, "max_tokens": max_tokens, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))


def stage_overload(srv: Server) -> dict:
    idle = srv.rss_mb()
    n = 10 * (SLOTS + QUEUE)
    peak = [idle]

    async def sample(stop: asyncio.Event) -> None:
        while not stop.is_set():
            peak.append(srv.rss_mb())
            await asyncio.sleep(0.2)

    async def run() -> list[httpx.Response]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stop))
        out = await _burst(srv.url, n, 32)
        stop.set()
        await sampler
        return out

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    return {"offered": n, "ok": statuses.count(200), "429": statuses.count(429),
            "429_with_retry_after": sum(r.status_code == 429 and "retry-after" in r.headers for r in responses),
            "other": [s for s in statuses if s not in (200, 429)],
            "rss_idle_mb": round(idle, 1), "rss_peak_mb": round(max(peak), 1), "rss_after_mb": round(srv.rss_mb(), 1)}


def stage_soak(srv: Server, seconds: float, warmup_s: float = 30) -> dict:
    """Steady load for ``seconds``; RSS growth from the end of a ``warmup_s`` warm-up (allocator
    and caches reach their working size) to the end."""
    rss: dict = {}

    async def run() -> dict:
        counts = {"ok": 0, "429": 0, "5xx": 0, "other": 0}
        t0 = time.monotonic()
        end = t0 + warmup_s + seconds

        async def mark_start() -> None:
            await asyncio.sleep(warmup_s)
            rss["start"] = srv.rss_mb()
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            async def worker(i: int) -> None:
                k = 0
                while time.monotonic() < end:
                    k += 1
                    stream = (i + k) % 2 == 0
                    body = {"messages": [{"role": "user", "content": f"Tell me fact {k} about the sea."}],
                            "max_tokens": 32, "stream": stream}
                    r = await client.post("/v1/chat/completions", json=body)
                    key = "ok" if r.status_code == 200 else "429" if r.status_code == 429 else \
                        "5xx" if r.status_code >= 500 else "other"
                    counts[key] += 1
                    if r.status_code == 429:
                        await asyncio.sleep(0.5)

            await asyncio.gather(mark_start(), *(worker(i) for i in range(SLOTS)))
        return counts

    counts = asyncio.run(run())
    time.sleep(2)
    start, end = rss["start"], srv.rss_mb()
    return {**counts, "seconds": seconds, "warmup_s": warmup_s, "rss_start_mb": round(start, 1),
            "rss_end_mb": round(end, 1), "rss_growth_pct": round(100 * (end - start) / start, 2)}


def streams_then(url: str, n: int, max_tokens: int, action, settle_s: float = 120) -> dict:
    """Start ``n`` streams, run ``action()`` once each has a token, and classify how each ended
    within ``settle_s``: finished ([DONE], no error), error (a clear error event or status), hung."""
    async def run() -> dict:
        started, outcomes = asyncio.Event(), []
        firsts = 0
        body = {"messages": CHAT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            async def one() -> str:
                nonlocal firsts
                counted = False
                error = False
                try:
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            return "error"
                        async for line in r.aiter_lines():
                            if line.startswith('data: {"error"'):
                                error = True
                            elif line.startswith("data: {") and not counted:
                                counted = True
                                firsts += 1
                                if firsts == n:
                                    started.set()
                            elif line == "data: [DONE]":
                                return "error" if error else "finished"
                    return "cut"  # the connection ended without [DONE]
                except httpx.TransportError:
                    return "cut"

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            try:
                await asyncio.wait_for(started.wait(), 120)
            except asyncio.TimeoutError:
                pass
            action()
            done, pending = await asyncio.wait(tasks, timeout=settle_s)
            for t in pending:
                t.cancel()
            outcomes = [t.result() for t in done] + ["hung"] * len(pending)
        return {k: outcomes.count(k) for k in ("finished", "error", "cut", "hung")}

    return asyncio.run(run())


def stage_sigterm(work: Path, cluster: bool) -> dict:
    args = ["--instances", "2"] if cluster else []
    srv = Server("--max-model-len", "256", *args, "--max-num-seqs", "16", "--drain-timeout", "60", log_dir=work,
                 name="sigterm-cluster" if cluster else "sigterm")
    srv.wait_ready()
    outcome = streams_then(srv.url, 8, 64, lambda: srv.proc.send_signal(signal.SIGTERM), settle_s=90)
    try:
        code = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        code = "still running after 60 s"
    srv.stop()
    return {**outcome, "exit_code": code}


def stage_cluster(work: Path) -> dict:
    srv = Server("--max-model-len", "256", "--instances", "2", "--max-num-seqs", "16", log_dir=work, name="cluster")
    srv.wait_ready()
    children = subprocess.run(["pgrep", "-f", "ray::Instance"], capture_output=True, text=True).stdout.split()

    def kill_one() -> None:
        if children:
            os.kill(int(children[0]), signal.SIGKILL)

    outcome = streams_then(srv.url, 16, 200, kill_one, settle_s=120)
    after = asyncio.run(_burst(srv.url, 8, 8))
    srv.stop()
    return {**outcome, "instance_processes": len(children),
            "after_kill_ok": sum(r.status_code == 200 for r in after), "after_kill_sent": len(after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--soak-s", type=float, default=600)
    ap.add_argument("--storm", type=int, default=1000, help="streams to disconnect")
    ap.add_argument("--fuzz-examples", type=int, default=100, help="schemathesis examples per operation")
    ap.add_argument("--fuzz-max-s", type=float, default=300, help="schemathesis time budget")
    ap.add_argument("--only", default="fuzz,corpus,storm,overload,soak,sigterm,cluster")
    ap.add_argument("--out", type=Path)
    opts = ap.parse_args()
    only = set(opts.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="shoal-reliability-"))
    result: dict = {"logs": str(work)}

    def report(name: str, value: dict) -> None:
        result[name] = value
        print(f"{name}: {json.dumps({k: v for k, v in value.items() if k != 'statuses'})}", flush=True)

    if only & {"fuzz", "corpus", "storm", "overload", "soak"}:
        srv = Server("--max-model-len", "256", "--max-num-seqs", str(SLOTS), "--max-waiting", str(QUEUE), log_dir=work, name="main")
        srv.wait_ready()
        try:
            if "fuzz" in only:
                report("fuzz", stage_fuzz(srv, work, opts.fuzz_examples, opts.fuzz_max_s))
            if "corpus" in only:
                report("corpus", stage_corpus(srv))
            if "storm" in only:
                report("storm", stage_storm(srv, opts.storm))
            if "overload" in only:
                report("overload", stage_overload(srv))
            if "soak" in only:
                report("soak", stage_soak(srv, opts.soak_s))
        finally:
            result["main_exit_code"] = srv.stop()
    if "sigterm" in only:
        report("sigterm", stage_sigterm(work, cluster=False))
    if "cluster" in only:
        report("cluster_kill", stage_cluster(work))
        report("sigterm_cluster", stage_sigterm(work, cluster=True))
    print(json.dumps(result, indent=1))
    if opts.out:
        opts.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
