"""Per-tenant limits at the gateway (the keys file's ``limits``): a request over a limit is a 429
with ``Retry-After`` and an OpenAI error body naming the limit, before any engine work, and
changes no count; claims are settled when requests end."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from shoal.server.quotas import LimitExceeded, QuotaGate, TenantLimits
from shoal.server.tenants import KeyRing
from tests._server_util import fast_engine, serve


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_second_refill_and_refusals_change_nothing():
    clock = Clock()
    gate = QuotaGate(clock)
    limits = TenantLimits(requests_per_s=2)
    gate.admit("a", limits, [10], [5])
    gate.admit("a", limits, [10], [5])
    with pytest.raises(LimitExceeded) as exc:
        gate.admit("a", limits, [10], [5])
    assert exc.value.limit == "requests_per_s" and 0 < exc.value.retry_after_s <= 0.5
    gate.admit("b", limits, [10], [5])  # another tenant has its own bucket
    clock.t = 0.5
    gate.admit("a", limits, [10], [5])  # one request refilled in half a second at 2/s


def test_tokens_per_minute_charge_prompt_and_max_tokens_and_give_back_the_unused():
    clock = Clock()
    gate = QuotaGate(clock)
    limits = TenantLimits(tokens_per_min=600)
    (claim,) = gate.admit("a", limits, [100], [400])  # 500 of 600
    with pytest.raises(LimitExceeded) as exc:
        gate.admit("a", limits, [50], [100])
    assert exc.value.limit == "tokens_per_min" and "used 500" in str(exc.value)
    assert exc.value.retry_after_s == pytest.approx(5.0)  # 50 tokens at 10 per second
    gate.release(claim, output_tokens=20)  # 380 unused output tokens come back
    gate.admit("a", limits, [50], [100])
    with pytest.raises(LimitExceeded, match="request too large"):
        gate.admit("a", limits, [500], [500])


def test_concurrent_and_queued_limits_count_sequences_until_they_start_and_end():
    gate = QuotaGate(Clock())
    limits = TenantLimits(max_concurrent=3, max_queued=2)
    a, b = gate.admit("t", limits, [5, 5], [4, 4])  # n=2: two sequences
    with pytest.raises(LimitExceeded) as exc:
        gate.admit("t", limits, [5], [4])
    assert exc.value.limit == "max_queued"
    gate.started(a)
    gate.started(a)  # counted once
    (c,) = gate.admit("t", limits, [5], [4])
    with pytest.raises(LimitExceeded) as exc:
        gate.admit("t", limits, [5], [4])
    assert exc.value.limit == "max_concurrent"
    for claim in (a, b, c, c):  # a second release of one claim changes nothing
        gate.release(claim, 1)
    gate.admit("t", limits, [5, 5], [4, 4])


def test_bad_limits_are_refused():
    for bad in ({"requests_per_s": 0}, {"max_queued": 1.5}, {"tokens_per_min": float("inf")}, {"max_concurrent": True}):
        with pytest.raises(ValueError):
            TenantLimits(**bad)


def test_keys_of_one_tenant_must_agree(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {key: sk-0123456789, tenant: a, limits: {max_queued: 2}}\n"
                    "  - {key: sk-9876543210, tenant: a}\n")
    with pytest.raises(ValueError, match="disagree"):
        KeyRing.load(path)
    path.write_text("keys:\n  - {key: sk-0123456789, tenant: a, limits: {burst: 2}}\n")
    with pytest.raises(ValueError, match="limits must be a mapping"):
        KeyRing.load(path)


def test_over_a_limit_is_a_429_naming_it_before_any_engine_work(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n"
                    "  - {key: sk-limited-0123, tenant: small, limits: {max_concurrent: 1, tokens_per_min: 100000}}\n"
                    "  - {key: sk-free-0123456, tenant: big}\n")
    engine = fast_engine(max_num_seqs=1)
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # 100 tokens take > 1 s
    added = []
    add = engine.add
    engine.add = lambda *a, **k: (added.append(k.get("req_id")), add(*a, **k))[1]
    server, _ = serve(engine, api_key=KeyRing.load(path))
    url = f"{server.url}/v1/completions"
    body = {"prompt": "hello", "max_tokens": 100, "ignore_eos": True}
    small = {"Authorization": "Bearer sk-limited-0123"}
    first: dict = {}
    try:
        t = threading.Thread(target=lambda: first.setdefault("r", httpx.post(url, json=body, headers=small, timeout=60)))
        t.start()
        deadline = time.time() + 30
        while not added and time.time() < deadline:
            time.sleep(0.02)
        n_added = len(added)
        r = httpx.post(url, json=body, headers=small, timeout=30)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["param"] == "max_concurrent" and "limit 1" in err["message"] and err["type"] == "RateLimitError"
        assert len(added) == n_added  # refused before the engine saw it
        other = httpx.post(url, json={**body, "max_tokens": 2}, headers={"Authorization": "Bearer sk-free-0123456"},
                           timeout=60)
        assert other.status_code == 200  # another tenant is not limited
        t.join(timeout=60)
        assert first["r"].status_code == 200
        again = httpx.post(url, json={**body, "max_tokens": 2}, headers=small, timeout=60)
        assert again.status_code == 200  # the first request's claim was released when it ended
        with httpx.stream("POST", url, json={**body, "stream": True}, headers=small, timeout=30) as s:
            next(s.iter_lines())  # the client goes away mid-stream
        for _ in range(100):  # its claim is released once the server sees it gone
            r = httpx.post(url, json={**body, "max_tokens": 2}, headers=small, timeout=60)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200
        metrics = httpx.get(f"{server.url}/metrics", headers=small, timeout=30).text
        assert any(line.startswith("shoal:tenant_rejections_total") and 'tenant="small"' in line
                   and float(line.split()[-1]) >= 1 for line in metrics.splitlines())
    finally:
        server.stop()
