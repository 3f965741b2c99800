"""``shoal bench serve``: an async load generator for any OpenAI-compatible server.

It streams ``/v1/completions`` (text prompts of exact token lengths, ``ignore_eos`` so outputs have
the requested length; an agent workload's turns carry their history), timestamps every streamed chunk, and samples the server's waiting queue from
``/metrics`` when the server exports one (Shoal's or vLLM's names). It talks to the given URL only.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

from shoal.bench.agent import AgentProgram, AgentWorkload, TurnRecord
from shoal.bench.prompts import PromptMaker
from shoal.bench.report import RequestRecord
from shoal.bench.workloads import Workload
from shoal.progress import Progress

_WAITING = re.compile(r"^(?:shoal|vllm):num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


class Unreachable(Exception):
    """The server at the URL cannot be benchmarked; ``str()`` says why, in a few words."""


def check_server(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> dict:
    """The first model ``url`` lists at ``/v1/models`` (its ``id``, and its ``max_model_len`` if the
    server says); :class:`Unreachable` when nothing answers there (refused, unknown host, timeout)
    or the answer is not an OpenAI model list."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        raise Unreachable(f"no answer within {timeout_s:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise Unreachable(re.sub(r"^\[Errno -?\d+\] ", "", str(exc)) or type(exc).__name__) from None
    if r.status_code in (401, 403):
        raise Unreachable(f"HTTP {r.status_code} from /v1/models: give the server's key with --api-key")
    if r.status_code != 200:
        raise Unreachable(f"HTTP {r.status_code} from /v1/models: not an OpenAI-compatible server?")
    try:
        first = r.json()["data"][0]
        first["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Unreachable("/v1/models answered no OpenAI model list: not an OpenAI-compatible server?") from None
    return first


async def discover_model(client: httpx.AsyncClient, url: str) -> str:
    r = await client.get(f"{url}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, rec: RequestRecord, t0: float,
               extra: dict | None = None, headers: dict | None = None) -> str:
    """Stream one completion into ``rec``; returns its text. ``extra`` joins the body."""
    body = {"model": model, "prompt": prompt, "max_tokens": rec.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    if rec.tenant is not None:
        body["user"] = rec.tenant  # names the tenant on a server without a keys file
    rec.start_s = time.perf_counter() - t0
    chunks = 0
    usage: dict = {}
    text: list[str] = []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return ""
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):  # the server failed the request mid-stream
                    err = event["error"]
                    rec.error = f"stream error: {err.get('message') if isinstance(err, dict) else err}"
                    return ""
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        text.append(choice["text"])
                        now = time.perf_counter() - t0
                        if rec.first_token_s is None:
                            rec.first_token_s = now
                        rec.token_times_s.append(now)
                        chunks += 1
        rec.end_s = time.perf_counter() - t0
        rec.output_tokens = usage.get("completion_tokens", chunks)
        if isinstance(rec, TurnRecord):
            rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if rec.first_token_s is None:
            rec.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        rec.error = "cancelled at the duration limit"
        raise
    return "".join(text)


async def _sample_queue(client: httpx.AsyncClient, url: str, t0: float, out: list[tuple[float, float]]) -> None:
    while True:
        try:
            r = await client.get(f"{url}/metrics", timeout=2.0)
            m = _WAITING.search(r.text) if r.status_code == 200 else None
            if m is None:
                return  # the server exports no such metric
            out.append((time.perf_counter() - t0, float(m.group(1))))
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)


async def run_workload(
    url: str,
    workload: Workload | AgentWorkload,
    tokenizer,
    *,
    model: str | None = None,
    concurrency: int | None = None,
    max_duration_s: float | None = None,
    api_key: str | None = None,
    progress: Progress | None = None,
) -> tuple[list[RequestRecord], list[tuple[float, float]], float]:
    """Replay ``workload`` against ``url``. Open loop (requests at their arrival times) unless
    ``concurrency`` is set (closed loop: that many in flight); an agent workload's programs start
    at their arrival times and send each turn ``tool_s`` after the previous one ended
    (:func:`_program`). ``progress`` hears of each request (program) done. Returns the per-request
    records, the server's waiting-queue samples and the run's duration."""
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    maker = PromptMaker(tokenizer)
    agent = isinstance(workload, AgentWorkload)
    records: list[RequestRecord] = []
    if not agent:
        groups: dict[int, list[int]] = {}
        prompts = [tokenizer.decode(maker.for_request(r, i, groups)) for i, r in enumerate(workload.requests)]
        records = [RequestRecord(r.arrival_s, r.prompt_len, r.output_len, tenant=r.tenant) for r in workload.requests]
    queue_samples: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits, headers=headers) as client:
        model = model or await discover_model(client, url)
        t0 = time.perf_counter()
        sampler = asyncio.create_task(_sample_queue(client, url, t0, queue_samples))
        slots = asyncio.Semaphore(concurrency) if concurrency else None
        n = len(workload.programs) if agent else len(records)
        done = 0

        async def launch(i: int) -> None:
            nonlocal done
            if agent:
                await _program(client, url, model, workload.programs[i], maker, tokenizer, records, t0)
            elif slots is None:
                await asyncio.sleep(max(0.0, records[i].arrival_s - (time.perf_counter() - t0)))
                await _one(client, url, model, prompts[i], records[i], t0)
            else:
                async with slots:
                    await _one(client, url, model, prompts[i], records[i], t0)
            done += 1
            if progress is not None:
                progress(done, n)

        jobs = [asyncio.create_task(launch(i)) for i in range(n)]
        _, pending = await asyncio.wait(jobs, timeout=max_duration_s)
        for job in pending:
            job.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    for rec in records:
        if rec.start_s is None and rec.error is None:
            rec.error = "not sent before the duration limit"
    return records, queue_samples, duration


async def _program(client: httpx.AsyncClient, url: str, model: str, prog: AgentProgram, maker: PromptMaker,
                   tokenizer, records: list[RequestRecord], t0: float) -> None:
    """One agent program: each turn's prompt is the previous prompt, the server's real reply and
    new corpus text (so the server's prefix cache sees the whole history), sent with the program
    as ``session_id`` (body and ``X-Session-Id``), ``more_turns`` and ``tool``; the next turn
    follows ``tool_s`` after the reply ended. A failed turn ends the program."""
    await asyncio.sleep(max(0.0, prog.arrival_s - (time.perf_counter() - t0)))
    context = ""
    for k, turn in enumerate(prog.turns):
        prompt = context + maker.text(turn.prompt_tokens, len(records))
        rec = prog.turn_record(k, len(tokenizer.encode(prompt, add_special_tokens=False)), time.perf_counter() - t0)
        records.append(rec)
        extra = {"session_id": prog.program_id, "more_turns": k + 1 < len(prog.turns),
                 **({"tool": turn.tool} if turn.tool else {}), **({"priority": prog.priority} if prog.priority else {})}
        reply = await _one(client, url, model, prompt, rec, t0, extra, {"X-Session-Id": prog.program_id})
        if rec.error is not None:
            return
        context = prompt + reply
        if k + 1 < len(prog.turns):
            await asyncio.sleep(turn.tool_s)
