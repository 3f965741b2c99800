"""Priorities under overload: a full queue sheds its worst-priority request for a better one (the
shed one is answered 429 with ``Retry-After``), never an urgent request while a lower one waits."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from shoal.engine.outputs import SHED_ERROR
from shoal.engine.request import FinishReason
from shoal.engine.sampling_params import SamplingParams
from tests._server_util import fast_engine, serve


def test_shed_ends_the_worst_queued_request_only():
    engine = fast_engine(max_num_seqs=1)
    ids = engine.tokenizer.encode("hello there")
    long = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.add(ids, long, req_id="running", priority=5)
    engine.step()
    for rid, prio in (("a", 1), ("b", 3), ("c", 3)):
        engine.add(ids, long, req_id=rid, priority=prio)
    assert engine.load().lowest_waiting_priority == 3
    assert engine.shed(3) is None  # nothing queued is worse than 3
    assert engine.shed(0) == "c"  # the worst priority, the latest among equals
    outs = {o.req_id: o for o in engine.step()}
    assert outs["c"].finish_reason is FinishReason.ERROR and outs["c"].error == SHED_ERROR
    assert set(engine.requests) == {"running", "a", "b"}
    for rid in list(engine.requests):
        engine.abort(rid)
    engine.step()
    engine.block_manager.check()


def test_a_full_queue_answers_429_to_the_lowest_priority_never_the_urgent():
    engine = fast_engine(max_num_seqs=1)
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())[1]  # 200 tokens take > 4 s: the queue stays full
    server, _ = serve(engine, max_waiting=1)
    body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True}
    results: dict[str, httpx.Response] = {}

    def send(name: str, priority: int) -> None:
        results[name] = httpx.post(f"{server.url}/v1/completions", json={**body, "priority": priority}, timeout=120)

    try:
        threads = []
        for name, prio in (("running", 5), ("queued", 5)):
            threads.append(threading.Thread(target=send, args=(name, prio)))
            threads[-1].start()
            time.sleep(0.3)  # the engine has seen it
        late_low = httpx.post(f"{server.url}/v1/completions", json={**body, "priority": 5}, timeout=30)
        assert late_low.status_code == 429 and late_low.headers["retry-after"]  # not better: refused
        threads.append(threading.Thread(target=send, args=("urgent", -1)))
        threads[-1].start()
        for t in threads:
            t.join(timeout=120)
        assert results["urgent"].status_code == 200
        assert results["running"].status_code == 200
        shed = results["queued"]
        assert shed.status_code == 429 and shed.headers["retry-after"]
        assert shed.json()["error"]["type"] == "RateLimitError" and "shed" in shed.json()["error"]["message"]
    finally:
        server.stop()


def test_a_burst_that_overflows_the_queue_never_refuses_its_urgent_requests():
    # 40 requests at once on 1 slot + 3 queued, 3 of them urgent among them: the bound is decided
    # where every earlier request of the burst is already queued, so each urgent one takes a lower
    # one's place (none is refused for requests the engine had not seen yet), and no more than
    # slot + queue + the urgent ones are served.
    engine = fast_engine(max_num_seqs=1)
    step = engine.step
    engine.step = lambda: (time.sleep(0.05), step())[1]
    server, _ = serve(engine, max_waiting=3)
    priorities = [1 + i % 3 for i in range(40)]
    for i in (11, 23, 37):
        priorities[i] = -1

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            async def one(priority: int) -> int:
                r = await client.post(f"{server.url}/v1/completions", json={
                    "prompt": "hello", "max_tokens": 40, "ignore_eos": True, "priority": priority})
                assert r.status_code == 200 or (r.status_code == 429 and r.headers["retry-after"])
                return r.status_code
            return await asyncio.gather(*(one(p) for p in priorities))

    try:
        codes = asyncio.run(burst())
    finally:
        server.stop()
    assert [c for c, p in zip(codes, priorities) if p == -1] == [200, 200, 200]
    assert codes.count(200) == 1 + 3, codes  # the first one running, the urgent ones queued
