"""API keys naming tenants (``--keys``): the key's tenant and priority ceiling reach the engine,
auth is strict (one header, case-insensitive scheme, ``WWW-Authenticate``), the operator's
endpoints need a key, and no key appears in an error or a log line."""

from __future__ import annotations

import logging

import httpx
import pytest

from shoal.engine.metadata import DEFAULT_SLO
from shoal.server.tenants import KeyRing
from tests._server_util import fast_engine, serve

KEYS = """
keys:
  - key: sk-team-a-0123456789
    tenant: team-a
    priority_ceiling: 0
  - key_env: SHOAL_TEST_KEY_B
    tenant: team-b
    weight: 3
"""


@pytest.fixture
def keys_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_TEST_KEY_B", "sk-team-b-9876543210")
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS)
    return path


@pytest.mark.parametrize("text, words", [
    ("keys:\n  - {key: sk-0123456789, tenant: a, rate: 5}\n", "unknown fields ['rate']"),
    ("keys:\n  - {key: short, tenant: a}\n", "at least 8 characters"),
    ("keys:\n  - {key: sk-0123456789}\n", "needs a tenant"),
    ("keys:\n  - {key: sk-0123456789, tenant: a}\n  - {key: sk-0123456789, tenant: b}\n", "listed twice"),
    ("keys:\n  - {key: sk-0123456789, tenant: a, weight: 0}\n", "weight"),
    ("keys: [\n", "not valid YAML"),
])
def test_a_bad_keys_file_is_refused_naming_the_problem_not_the_key(tmp_path, text, words):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        KeyRing.load(path)
    assert words in str(exc.value) and "0123456789" not in str(exc.value)


def test_keys_name_tenants_and_cap_priorities(keys_file, caplog):
    engine = fast_engine()
    seen = []
    server, backend = serve(engine, api_key=KeyRing.load(keys_file))
    backend.step_listeners.append(lambda outs: seen.extend(o.metadata for o in outs if o.finished))
    url = f"{server.url}/v1/completions"
    body = {"prompt": "hi", "max_tokens": 2, "priority": -50, "user": "someone-else"}
    try:
        with caplog.at_level(logging.DEBUG):
            for key in ("sk-team-a-0123456789", "sk-team-b-9876543210"):
                r = httpx.post(url, json=body, headers={"Authorization": f"bearer {key}"}, timeout=60)  # any case
                assert r.status_code == 200, r.text
            by_tenant = {m.tenant: m.priority for m in seen}
            assert by_tenant == {"team-a": 0, "team-b": -50}  # team-a's ceiling caps it; the key beats `user`
            assert {m.tenant: m.weight for m in seen} == {"team-a": 1.0, "team-b": 3.0}  # for fair share
            text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer sk-team-a-0123456789"}).text
            series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("shoal:tenant_")}
            for tenant in ("team-a", "team-b"):
                assert series[f'shoal:tenant_generation_tokens_total{{model_name="smollm2-test",tenant="{tenant}"}}'] == 2
                assert series[f'shoal:tenant_requests_total{{finished_reason="length",model_name="smollm2-test",tenant="{tenant}"}}'] == 1
                assert series[f'shoal:tenant_time_to_first_token_seconds_count{{model_name="smollm2-test",tenant="{tenant}"}}'] == 1
            for headers in ({}, {"Authorization": "Bearer sk-wrong-000000"}, {"Authorization": "sk-team-a-0123456789"}):
                r = httpx.post(url, json=body, headers=headers, timeout=60)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            two = httpx.post(url, json=body, timeout=60, headers=[("Authorization", "Bearer sk-team-a-0123456789"),
                                                                  ("Authorization", "Bearer sk-wrong-000000")])
            assert two.status_code == 401 and "More than one" in two.json()["error"]["message"]
            for path in ("/metrics", "/tokenize", "/detokenize", "/v1/models"):
                assert httpx.get(f"{server.url}{path}").status_code == 401, path
            assert httpx.get(f"{server.url}/health").status_code == 200
        assert not any(secret in r.getMessage() for r in caplog.records
                       for secret in ("0123456789", "9876543210", "team-a", "team-b", "someone-else"))
    finally:
        server.stop()


def test_open_metrics_leaves_only_metrics_open():
    engine = fast_engine()
    server, _ = serve(engine, api_key="sk-single-key-123", open_metrics=True)
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        assert httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}).status_code == 401
    finally:
        server.stop()


def test_the_prefix_cache_is_shared_only_under_one_salt():
    from shoal.engine.metadata import RequestMetadata
    from shoal.engine.sampling_params import SamplingParams

    engine = fast_engine(block_size=4)
    ids = engine.tokenizer.encode("my account number is 4242 4242 4242 4242, keep it safe")
    params = SamplingParams(max_tokens=1)

    def cached(rid: str, salt: str | None) -> int:
        engine.add(ids, params, req_id=rid, metadata=RequestMetadata(cache_salt=salt))
        while engine.has_unfinished():
            outs = [o for o in engine.step() if o.req_id == rid and o.finished]
            if outs:
                return outs[0].num_cached_tokens
        raise AssertionError("no final output")

    assert cached("a1", "tenant:a") == 0
    assert cached("a2", "tenant:a") > 0  # the same tenant reuses its prompt
    assert cached("b1", "tenant:b") == 0  # another tenant cannot see it
    assert cached("n1", None) == 0  # nor can an unsalted request
    engine.block_manager.check()


def test_another_tenant_cannot_probe_a_cached_prompt(keys_file, tmp_path):
    """The probe of the issue: tenant B guesses tenant A's secret prompt and reads the
    prefix-cache hits; a right guess and a wrong one now look the same to B."""
    engine = fast_engine(block_size=4)
    server, _ = serve(engine, api_key=KeyRing.load(keys_file))
    a = {"Authorization": "Bearer sk-team-a-0123456789"}
    b = {"Authorization": "Bearer sk-team-b-9876543210"}

    def hits(headers, prompt: str) -> float:
        def read() -> float:
            text = httpx.get(f"{server.url}/metrics", headers=headers).text
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("shoal:prefix_cache_hits_total"))
        before = read()
        r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=60,
                       json={"prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200
        return read() - before

    secret = "account 4242 4242 4242 4242 of Alice Example, branch 17"
    try:
        assert hits(a, secret) == 0
        right, wrong = hits(b, secret), hits(b, "account 9999 9999 9999 9999 of Bob Example, branch 17")
        assert right == wrong == 0
        assert hits(a, secret) > 0  # A itself still hits its cache
    finally:
        server.stop()


def test_a_request_may_bring_its_own_slo():
    engine = fast_engine()
    seen = []
    server, backend = serve(engine)
    backend.step_listeners.append(lambda outs: seen.extend(o.metadata for o in outs if o.finished))
    url = f"{server.url}/v1/completions"
    try:
        r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2, "slo_ttft_ms": 250}, timeout=60)
        assert r.status_code == 200
        assert seen[-1].slo.ttft_s == 0.25 and seen[-1].slo.tpot_s == DEFAULT_SLO.tpot_s
        for bad in (0, -5, "fast", 1e12):
            r = httpx.post(url, json={"prompt": "hi", "max_tokens": 2, "slo_ttft_ms": bad}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == "slo_ttft_ms", (bad, r.text)
    finally:
        server.stop()
