"""The gateway: pools behind one endpoint, the small-first router and its checks, the semantic cache
over HTTP (opt-in, tenants, TTL, streamed replay), IC-Cache, /v1/embeddings, and upstream failures
answered as OpenAI errors while the gateway keeps serving."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from shoal.gateway import router as routing
from shoal.gateway.config import GatewayConfig, PoolConfig, RouterConfig
from shoal.gateway.ic_cache import ExampleStore
from shoal.gateway.layer import Gateway
from shoal.gateway.pools import UpstreamPool
from shoal.gateway.semantic_cache import CategoryClassifier, SemanticCache, load_categories
from shoal.gateway.setup import build_gateway
from tests._gateway_util import FakeUpstream
from tests._server_util import MODEL_NAME, fast_engine, serve

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}


def chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


# ---- the router's decisions on hand-built cases ---------------------------------------------------

ROUTER = RouterConfig(name="auto", small="s", large="l", min_mean_logprob=-2.0, escalate_categories=("coding",))


def reply(content: str, tool_calls=None, logprobs=None) -> dict:
    message = {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls else {})}
    return {"choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}]}


@pytest.mark.parametrize("body, data, reason", [
    (chat("x", response_format=JSON_FORMAT), reply('{"city": "Paris"}'), None),
    (chat("x", response_format=JSON_FORMAT), reply('{"town": "Paris"}'), routing.SCHEMA),
    (chat("x", response_format=JSON_FORMAT), reply('{"city": "Par'), routing.SCHEMA),
    (chat("x", response_format={"type": "json_object"}), reply("[1, 2]"), routing.SCHEMA),
    (chat("x", guided_json=SCHEMA), reply('{"city": 3}'), routing.SCHEMA),
    (chat("x", tools=[{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}], tool_choice="required"),
     reply("", [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Rome"}'}}]), None),
    (chat("x", tools=[{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}], tool_choice="required"),
     reply("no call"), routing.TOOL_CALL),
    (chat("x", tools=[{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}], tool_choice="required"),
     reply("", [{"id": "1", "type": "function", "function": {"name": "g", "arguments": "{}"}}]), routing.TOOL_CALL),
    (chat("x"), reply("I can't help with that."), routing.REFUSAL),
    (chat("x"), reply("Sure", logprobs={"content": [{"logprob": -0.1}, {"logprob": -0.3}]}), None),
    (chat("x"), reply("Sure", logprobs={"content": [{"logprob": -3.0}, {"logprob": -2.5}]}), routing.LOW_CONFIDENCE),
])
def test_the_router_escalates_exactly_the_replies_that_fail_a_check(body, data, reason):
    assert routing.escalation(ROUTER, body, 200, data, chat=True) == reason


def test_the_router_escalates_a_failed_small_reply_and_sends_categories_up_front():
    assert routing.escalation(ROUTER, chat("x"), 503, None, chat=True) == routing.SMALL_FAILED
    assert routing.upfront(ROUTER, "coding") and not routing.upfront(ROUTER, "factual")
    assert routing.wants_logprobs(ROUTER, chat("x")) and not routing.wants_logprobs(ROUTER, chat("x", logprobs=True))


@pytest.mark.parametrize("data, message", [
    ({"pools": [{"name": "a"}]}, "exactly one of local"),
    ({"pools": [{"local": True}, {"name": "b", "url": "ftp://x"}]}, "url must start"),
    ({"pools": [{"local": True}], "routers": [{"name": "auto", "small": "m", "large": "zz"}]}, "must name pools"),
    ({"pools": [{"local": True, "prompt_cost": "cheap"}]}, "pools[0].prompt_cost must be a number"),
    ({"pools": [{"local": True, "colour": 1}]}, "unknown fields colour"),
    ({"pools": [{"name": "a", "url": "http://x"}]}, "exactly one pool is the served model"),
])
def test_gateway_config_errors_name_the_field(data, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GatewayConfig.from_dict(data, "m")


# ---- over HTTP ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder():
    from shoal.gateway.embedder import Embedder

    return Embedder()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gateway_for(embedder, pools: list[PoolConfig], routers=(), clock=None, ic=False) -> Gateway:
    categories = load_categories()
    config = GatewayConfig(pools=(PoolConfig(name=MODEL_NAME, local=True, prompt_cost=1.0, completion_cost=2.0), *pools),
                           routers=tuple(routers))
    cache = SemanticCache(embedder.dim, categories.categories, categories.default, clock=clock or Clock())
    return Gateway(config, {p.name: UpstreamPool(p) for p in pools}, embedder=embedder, cache=cache,
                   classifier=CategoryClassifier(categories, embedder.embed),
                   examples=ExampleStore(embedder) if ic else None)


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kw)


def test_models_list_pools_routers_prices_and_the_embedding_model(embedder):
    with FakeUpstream() as up:
        gw = gateway_for(embedder, [PoolConfig(name="big", url=up.url, prompt_cost=3.0, completion_cost=15.0)],
                         [RouterConfig(name="auto", small=MODEL_NAME, large="big")])
        server, _ = serve(fast_engine(), gateway=gw)
        try:
            cards = {c["id"]: c for c in httpx.get(f"{server.url}/v1/models").json()["data"]}
            assert set(cards) == {MODEL_NAME, "big", "auto", "all-MiniLM-L6-v2"}
            assert cards["big"]["pricing"] == {"prompt_per_million_tokens": 3.0, "completion_per_million_tokens": 15.0}
            assert cards["auto"]["router"] == {"small": MODEL_NAME, "large": "big"}
            assert cards["all-MiniLM-L6-v2"]["dimensions"] == 384
            assert httpx.get(f"{server.url}/v1/models/auto").json()["id"] == "auto"
            assert httpx.get(f"{server.url}/v1/models/nope").status_code == 404
            r = post(server.url, {**chat("hi"), "model": "nope"})
            assert r.status_code == 404 and "big" in r.json()["error"]["message"]
        finally:
            server.stop()


def test_a_named_pool_answers_and_says_so_in_the_header_the_model_and_metrics(embedder):
    with FakeUpstream(lambda body: "from the big one", key="sekret") as up:
        pool = PoolConfig(name="big", url=up.url, upstream_model="big-v2", api_key_env="SHOAL_TEST_BIG_KEY",
                          prompt_cost=3.0, completion_cost=15.0)
        server, _ = serve(fast_engine(), gateway=gateway_for(embedder, [pool]))
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("SHOAL_TEST_BIG_KEY", "sekret")
                r = post(server.url, {**chat("hi"), "model": "big"})
                assert r.status_code == 200, r.text
                assert r.headers["x-shoal-pool"] == "big" and r.json()["model"] == "big"
                assert r.json()["choices"][0]["message"]["content"] == "from the big one"
                assert up.requests[-1]["model"] == "big-v2", "the upstream gets its own model name"
                s = httpx.post(f"{server.url}/v1/chat/completions", json={**chat("hi"), "model": "big", "stream": True})
                assert s.headers["x-shoal-pool"] == "big"
                events = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
                assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "from the big one"
                assert all(e["model"] == "big" for e in events)
            local = post(server.url, chat("hi"))
            assert local.status_code == 200 and local.headers["x-shoal-pool"] == MODEL_NAME
            metrics = httpx.get(f"{server.url}/metrics").text
            assert 'shoal:gateway_requests_total{model="big",pool="big",route="direct"} 2.0' in metrics
            # 10 prompt and 5 completion tokens at 3 and 15 per million, once counted (the stream has no usage)
            assert 'shoal:gateway_cost_total{pool="big"} 0.000105' in metrics
        finally:
            server.stop()


def test_upstream_failures_are_openai_errors_and_the_gateway_keeps_serving(embedder, monkeypatch):
    with FakeUpstream(key="right") as up:
        pool = PoolConfig(name="big", url=up.url, api_key_env="SHOAL_TEST_BIG_KEY", timeout_s=0.5)
        dead = PoolConfig(name="gone", url="http://127.0.0.1:9/v1")
        server, _ = serve(fast_engine(), gateway=gateway_for(embedder, [pool, dead]))
        try:
            monkeypatch.setenv("SHOAL_TEST_BIG_KEY", "wrong")
            r = post(server.url, {**chat("hi"), "model": "big"})
            assert r.status_code == 502 and "refused the gateway's key" in r.json()["error"]["message"]
            assert "wrong" not in r.text
            monkeypatch.setenv("SHOAL_TEST_BIG_KEY", "right")
            up.fail_status = 500
            r = post(server.url, {**chat("hi"), "model": "big"})
            assert r.status_code == 502 and "upstream error 500" in r.json()["error"]["message"]
            up.fail_status, up.delay_s = None, 2.0
            r = post(server.url, {**chat("hi"), "model": "big"})
            assert r.status_code == 504 and r.json()["error"]["type"] == "GatewayTimeoutError"
            r = post(server.url, {**chat("hi"), "model": "gone", "stream": True})
            assert r.status_code == 502 and "cannot reach the upstream" in r.json()["error"]["message"]
            up.delay_s = 0.0
            assert post(server.url, {**chat("hi"), "model": "big"}).status_code == 200
            assert post(server.url, chat("hi")).status_code == 200
        finally:
            server.stop()


def test_the_router_escalates_an_invalid_schema_and_keeps_a_valid_small_answer(embedder):
    small_says = {"answer": '{"town": "Paris"}'}
    with FakeUpstream(lambda body: small_says["answer"]) as small_up, \
            FakeUpstream(lambda body: '{"city": "Paris"}') as large_up:
        pools = [PoolConfig(name="small", url=small_up.url, prompt_cost=0.1, completion_cost=0.1),
                 PoolConfig(name="large", url=large_up.url, prompt_cost=10.0, completion_cost=10.0)]
        gw = gateway_for(embedder, pools, [RouterConfig(name="auto", small="small", large="large")])
        server, _ = serve(fast_engine(), gateway=gw)
        try:
            r = post(server.url, {**chat("Where is the Eiffel tower?"), "model": "auto", "response_format": JSON_FORMAT})
            assert r.status_code == 200
            assert r.headers["x-shoal-pool"] == "large" and r.headers["x-shoal-escalation"] == "invalid_schema"
            assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"city": "Paris"}
            assert small_up.requests[-1]["stream"] is False, "the small pool is asked for a whole answer"
            small_says["answer"] = '{"city": "Lyon"}'
            r = httpx.post(f"{server.url}/v1/chat/completions", json={
                **chat("Where is the Eiffel tower?"), "model": "auto", "response_format": JSON_FORMAT, "stream": True})
            assert r.headers["x-shoal-pool"] == "small" and r.headers["x-shoal-route"] == "small"
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in r.text.splitlines() if line.startswith("data: {") and '"choices": [{' in line)
            assert json.loads(text) == {"city": "Lyon"} and r.text.rstrip().endswith("data: [DONE]")
            metrics = httpx.get(f"{server.url}/metrics").text
            assert 'shoal:gateway_escalations_total{reason="invalid_schema",router="auto"} 1.0' in metrics
            assert 'shoal:gateway_requests_total{model="auto",pool="small",route="small"} 1.0' in metrics
        finally:
            server.stop()


def test_a_category_goes_up_front_and_ic_cache_gives_the_small_pool_past_answers(embedder):
    with FakeUpstream(lambda body: "small answer") as small_up, FakeUpstream(lambda body: "LARGE ANSWER") as large_up:
        pools = [PoolConfig(name="small", url=small_up.url), PoolConfig(name="large", url=large_up.url)]
        router = RouterConfig(name="auto", small="small", large="large", escalate_categories=("coding",),
                              ic_examples=2, ic_min_similarity=0.5)
        server, _ = serve(fast_engine(), gateway=gateway_for(embedder, pools, [router], ic=True))
        try:
            r = post(server.url, {**chat("How do I reverse a list in Python?"), "model": "auto"})
            assert r.headers["x-shoal-route"] == "upfront" and r.headers["x-shoal-category"] == "coding"
            assert not small_up.requests
            r = post(server.url, {**chat("What is the capital of Italy?"), "model": "auto"})
            assert r.headers["x-shoal-route"] == "small"
            assert small_up.requests[-1]["messages"] == [{"role": "user", "content": "What is the capital of Italy?"}], \
                "no past answer is similar yet"
            # a refusal is escalated, and the large pool's answer becomes an example
            small_up.answer = lambda body: "I can't answer that."
            post(server.url, {**chat("What is the capital of Spain?"), "model": "auto"})
            small_up.answer = lambda body: "small answer"
            r = post(server.url, {**chat("Which city is the capital of Spain?"), "model": "auto"})
            sent = small_up.requests[-1]["messages"]
            assert sent[:2] == [{"role": "user", "content": "What is the capital of Spain?"},
                                {"role": "assistant", "content": "LARGE ANSWER"}]
            assert sent[-1] == {"role": "user", "content": "Which city is the capital of Spain?"}
        finally:
            server.stop()


def test_the_cache_is_opt_in_per_tenant_expires_and_replays_streams(embedder):
    clock = Clock()
    server, _ = serve(fast_engine(), gateway=gateway_for(embedder, [], clock=clock))
    try:
        ask = {**chat("What is the capital of France?"), "temperature": 0, "user": "alice"}
        assert "x-shoal-cache" not in post(server.url, ask).headers, "not opted in: no cache at all"
        first = post(server.url, {**ask, "semantic_cache": True})
        assert first.headers["x-shoal-cache"] == "miss"
        answer = first.json()["choices"][0]["message"]["content"]
        para = post(server.url, {**ask, "semantic_cache": True, "messages": [
            {"role": "user", "content": "Which city is the capital of France?"}]})
        assert para.headers["x-shoal-cache"] == "hit" and para.json()["choices"][0]["message"]["content"] == answer
        near = post(server.url, {**ask, "semantic_cache": True, "messages": [
            {"role": "user", "content": "What is the capital of Germany?"}]})
        assert near.headers["x-shoal-cache"] == "miss", "a near miss is not served the French answer"
        bob = post(server.url, {**ask, "semantic_cache": True, "user": "bob"})
        assert bob.headers["x-shoal-cache"] == "miss", "no answer crosses tenants"
        hot = post(server.url, {**ask, "semantic_cache": True, "temperature": 1.0})
        assert "x-shoal-pool" in hot.headers and hot.headers.get("x-shoal-cache") is None
        s = httpx.post(f"{server.url}/v1/chat/completions", json={
            **ask, "semantic_cache": True, "stream": True, "stream_options": {"include_usage": True}})
        assert s.headers["x-shoal-cache"] == "hit"
        events = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == answer
        assert events[-1]["usage"] == first.json()["usage"] and s.text.rstrip().endswith("data: [DONE]")
        clock.now += 3 * 86400
        assert post(server.url, {**ask, "semantic_cache": True}).headers["x-shoal-cache"] == "miss", "expired"
        bad = post(server.url, {**ask, "semantic_cache": "yes"})
        assert bad.status_code == 400 and "semantic_cache" in bad.json()["error"]["message"]
        lookups = httpx.get(f"{server.url}/metrics").text
        assert 'shoal:semantic_cache_lookups_total{result="semantic"} 1.0' in lookups
        assert 'shoal:semantic_cache_lookups_total{result="bypass"} 1.0' in lookups
    finally:
        server.stop()


def test_embeddings_match_the_model_and_refuse_what_they_cannot_do(embedder):
    server, _ = serve(fast_engine(), gateway=build_gateway(GatewayConfig.single(MODEL_NAME)))
    try:
        texts = ["A cat sat on the mat.", "Stocks fell sharply today."]
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts, "model": "all-MiniLM-L6-v2"})
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-5)
        assert r.json()["usage"]["prompt_tokens"] == sum(embedder.num_tokens(texts))
        b64 = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), got[0], atol=1e-6)
        for body, status in [({"input": [1, 2, 3]}, 400), ({"input": "x", "model": MODEL_NAME}, 404),
                             ({"input": "x", "dimensions": 64}, 400), ({"input": ""}, 400), ({"input": []}, 400),
                             ({"inputs": "x"}, 400)]:
            r = httpx.post(f"{server.url}/v1/embeddings", json=body)
            assert r.status_code == status and r.json()["error"]["message"], (body, r.text)
        assert httpx.post(f"{server.url}/v1/embeddings", json={"input": "still serving"}).status_code == 200
    finally:
        server.stop()
