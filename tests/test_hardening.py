"""No request can take the server down; bad input is a 4xx in OpenAI's shape; shutdown loses
nothing. Over a tiny random model with the real tokenizer (fast), through real HTTP.

Each case here once took the server down or answered 5xx (the hardening issue); every test ends by
checking that the server still serves.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import httpx
import pytest

from shoal.engine.outputs import InstanceLoad
from shoal.engine.request import PRIORITY_MAX, PRIORITY_MIN
from shoal.server.lifecycle import Lifecycle
from tests._server_util import MODEL_NAME, fast_engine, serve

CHAT = [{"role": "user", "content": "Say something."}]


class Srv:
    def __init__(self, engine, server, async_engine) -> None:
        self.engine, self.server, self.async_engine = engine, server, async_engine
        self.url = server.url
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def close(self) -> None:
        self.http.close()
        self.server.stop()


@pytest.fixture(scope="module")
def srv():
    engine = fast_engine()
    server, async_engine = serve(engine, max_waiting=4, max_body_bytes=256 << 10)
    s = Srv(engine, server, async_engine)
    yield s
    s.close()


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    return err


def assert_serves(srv: Srv) -> None:
    assert srv.http.get("/health").status_code == 200
    r = srv.http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def raw_post(srv: Srv, path: str, body: bytes) -> httpx.Response:
    return srv.http.post(path, content=body, headers={"content-type": "application/json"})


# ---- the priority bomb and other integers the engine cannot hold ---------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True}),
    ("/v1/completions", {"prompt": "hi"}),
])
@pytest.mark.parametrize("priority", [10**400, -(10**400), PRIORITY_MAX + 1, PRIORITY_MIN - 1],
                         ids=["1e400", "-1e400", "max+1", "min-1"])
def test_priority_bomb_is_a_400_and_the_engine_lives(srv, path, body, priority):
    # json.dumps writes the integer exactly, as an attacker would
    err = assert_error(raw_post(srv, path, json.dumps({**body, "max_tokens": 2, "priority": priority}).encode()), 400)
    assert err["param"] == "priority"
    assert str(PRIORITY_MAX) in err["message"] or str(PRIORITY_MIN) in err["message"]
    assert srv.async_engine.dead is None
    assert_serves(srv)


def test_priorities_at_the_bounds_are_served(srv):
    for priority in (PRIORITY_MIN, PRIORITY_MAX):
        r = srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": priority})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value", [
    ("seed", 2**64 - 1), ("seed", 2**70), ("seed", -(2**63) - 1),
    ("stop_token_ids", [2**70]), ("top_k", 2**70), ("max_tokens", 2**70), ("n", 2**70),
    ("logprobs", 2**70), ("temperature", 10**400),
])
def test_out_of_range_integers_400_naming_the_field(srv, field, value):
    err = assert_error(raw_post(srv, "/v1/completions", json.dumps({"prompt": "hi", field: value}).encode()), 400)
    assert err["param"] == field or field in err["message"], err
    assert_serves(srv)


def test_seed_at_the_int64_bounds_is_served(srv):
    for seed in (2**63 - 1, -(2**63)):
        r = srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 1, "seed": seed})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [False, True]}, "prompt"),  # not token ids 0 and 1
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 65}, "stop"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_schema_violations_are_refused(srv, path, body, param):
    err = assert_error(srv.http.post(path, json=body), 400)
    assert param in (err["param"] or "") or param in err["message"], err
    assert_serves(srv)


def test_nan_and_infinity_are_refused(srv):
    # Python's json parser takes these literals; no sampling parameter may be one
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = b'{"prompt": "hi", "max_tokens": 2, "temperature": ' + literal.encode() + b"}"
        assert assert_error(raw_post(srv, "/v1/completions", body), 400)["param"] == "temperature"


# ---- text that is not Unicode, content parts that are not text ----------------------------------


SURROGATE = b'"\\ud800"'


@pytest.mark.parametrize("path,template", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": %s}], "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "stop": [%s]}'),
    ("/v1/completions", b'{"prompt": %s, "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": [%s, "ok"]}'),
    ("/v1/completions", b'{"prompt": "hi", "model": %s}'),
    ("/v1/completions", b'{"prompt": "hi", "stop": %s}'),
    ("/v1/completions", b'{"prompt": "hi", "user": %s}'),
    ("/tokenize", b'{"prompt": %s}'),
    ("/tokenize", b'{"messages": [{"role": "user", "content": %s}]}'),
])
def test_lone_surrogates_400(srv, path, template):
    err = assert_error(raw_post(srv, path, template % SURROGATE), 400)
    assert "surrogate" in err["message"]
    assert_serves(srv)


@pytest.mark.parametrize("text", [123, None, ["a"], {"x": 1}])
def test_content_part_text_must_be_a_string(srv, text):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "max_tokens": 2}
    err = assert_error(srv.http.post("/v1/chat/completions", json=body), 400)
    assert "text" in err["message"]
    assert_serves(srv)


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"prompt": "\xc3\x28"}', b"{", b"[]", b"null", b""])
def test_unparsable_bodies_get_openai_errors(srv, body):
    assert_error(raw_post(srv, "/v1/completions", body), 400)
    assert_serves(srv)


def test_tokenize_empty_messages_400(srv):
    assert_error(srv.http.post("/tokenize", json={"messages": []}), 400)
    assert_serves(srv)


def test_unknown_path_and_method_in_openai_shape(srv):
    assert_error(srv.http.get("/v1/nothing-here"), 404)
    assert assert_error(srv.http.get("/v1/completions"), 405)["type"] == "MethodNotAllowedError"


def test_keep_alive_survives_errors(srv):
    """Bad requests on one HTTP/1.1 connection do not close it; a good one follows on the same."""
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    bodies = [b'{"prompt": "\\ud800"}', json.dumps({"prompt": "hi", "priority": 10**400}).encode(), b"{",
              json.dumps({"prompt": "hi", "max_tokens": 2}).encode()]
    statuses = []
    for body in bodies:
        conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        statuses.append(r.status)
        assert not r.will_close, f"the server closed the connection after a {r.status}"
    sock = conn.sock
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200 and conn.sock is sock
    assert statuses == [400, 400, 400, 200]
    conn.close()


def test_a_bug_answers_500_in_openai_shape_and_keeps_the_connection(srv, monkeypatch):
    async def buggy(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(srv.async_engine, "submit", buggy)
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 2}),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 500 and body["error"]["type"] == "InternalServerError" and not r.will_close
    sock = conn.sock
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()
    monkeypatch.undo()
    assert_serves(srv)


def test_request_metadata_reaches_the_engine_from_body_and_headers(srv, monkeypatch):
    """priority, user (the tenant) and session_id / X-Session-Id become one RequestMetadata, which
    the engine keeps on the request and hands back on every output."""
    seen, outs = [], []
    real = srv.async_engine.submit
    engine = srv.async_engine.engine
    real_output = engine._output

    async def recording(prompt, params, req_id, metadata=None):
        seen.append(metadata)
        return await real(prompt, params, req_id, metadata)

    monkeypatch.setattr(srv.async_engine, "submit", recording)
    monkeypatch.setattr(engine, "_output", lambda *a, **k: outs.append(real_output(*a, **k)) or outs[-1])
    body = {"messages": CHAT, "max_tokens": 2}
    assert srv.http.post("/v1/chat/completions", json={**body, "session_id": "conv-1", "user": "acme",
                                                       "priority": -3}).status_code == 200
    assert srv.http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "conv-2"}).status_code == 200
    assert srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert [(m.session_id, m.tenant, m.priority) for m in seen] == [("conv-1", "acme", -3), ("conv-2", None, 0),
                                                                    (None, None, 0)]
    assert outs and {o.metadata.session_id for o in outs} == {"conv-1", "conv-2", None}
    assert all(o.metadata.tenant == "acme" for o in outs if o.metadata.session_id == "conv-1")
    assert_error(srv.http.post("/v1/chat/completions", json={**body, "session_id": "x" * 300}), 400)
    # an agent turn: more turns follow, the reply calls a tool (body fields, or headers)
    seen.clear()
    assert srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "session_id": "prog-1",
                                                  "more_turns": True, "tool": "bash"}).status_code == 200
    assert srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                         headers={"X-Session-Id": "prog-2", "X-More-Turns": "1", "X-Tool": "search"}).status_code == 200
    assert srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "more_turns": False},
                         headers={"X-Session-Id": "prog-2", "X-More-Turns": "true"}).status_code == 200
    assert [(m.session_id, m.more_turns, m.tool) for m in seen] == [
        ("prog-1", True, "bash"), ("prog-2", True, "search"), ("prog-2", False, None)]
    for bad in ({"json": {**body, "more_turns": "yes"}}, {"json": {**body, "tool": ""}},
                {"json": body, "headers": {"X-More-Turns": "maybe"}},
                {"json": body, "headers": {"X-Tool": "t" * 200}},
                {"json": body, "headers": {"X-Session-Id": "s" * 300}}):
        assert_error(srv.http.post("/v1/chat/completions", **bad), 400)
    assert len(seen) == 3  # none of the bad ones reached the engine


# ---- sizes ----------------------------------------------------------------------------------------


def test_body_over_the_limit_413(srv):
    big = json.dumps({"prompt": "x" * (300 << 10)}).encode()
    assert assert_error(raw_post(srv, "/v1/completions", big), 413)["type"] == "RequestTooLargeError"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * (10 << 10)
        yield b'{"prompt": "hi"}'

    r = srv.http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert_serves(srv)


def test_prompt_too_long_to_fit_is_refused_before_tokenizing(srv):
    """A prompt of more bytes than max_model_len tokens can hold is refused at once."""
    max_bytes = srv.engine.max_model_len * 100
    text = "a" * (200 << 10)
    assert len(text) > max_bytes
    err = assert_error(srv.http.post("/v1/completions", json={"prompt": text}), 400)
    assert "maximum context length" in err["message"]
    err = assert_error(srv.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]}), 400)
    assert "maximum context length" in err["message"]


def test_big_tokenize_does_not_block_the_event_loop(srv):
    """/tokenize of a big text runs in a worker thread: /health answers meanwhile."""
    text = "hello world, this is a test. " * 8000  # ~230 KB, under the body limit
    done = threading.Event()
    result: dict = {}

    def tokenize():
        result["r"] = httpx.post(f"{srv.url}/tokenize", json={"prompt": text * 1}, timeout=60)
        done.set()

    # several at once, so the tokenizer is busy for a while
    threads = [threading.Thread(target=tokenize) for _ in range(4)]
    for t in threads:
        t.start()
    worst = 0.0
    while not done.is_set():
        t0 = time.monotonic()
        assert srv.http.get("/health").status_code == 200
        worst = max(worst, time.monotonic() - t0)
    for t in threads:
        t.join()
    assert result["r"].status_code == 200 and result["r"].json()["count"] > 8000
    assert worst < 2.0, f"/health took {worst:.2f} s while tokenizing"


# ---- admission ------------------------------------------------------------------------------------


def test_waiting_for_room_counts_only_requests_beyond_free_slots():
    def load(running, waiting, swapped=0, max_num_seqs=16):
        return InstanceLoad(running, waiting, swapped, 100, 50, 50, 0, 0, 16, 0, 0, 0, max_num_seqs=max_num_seqs)

    assert load(0, 0).waiting_for_room(16) == 0  # a burst that fits in free slots
    assert load(0, 0).waiting_for_room(20) == 4
    assert load(10, 4).waiting_for_room(2) == 0
    assert load(16, 3, 1).waiting_for_room(0) == 4  # swapped ones wait for a slot too
    assert load(20, 0).waiting_for_room(1) == 1


def test_a_burst_that_fits_in_free_slots_is_admitted(srv):
    """16 free slots and --max-waiting 4: a burst of 16 gets no 429; 40 at once get some, each
    with Retry-After."""
    body = {"prompt": "hi", "max_tokens": 64, "ignore_eos": True}

    def burst(n):
        results = [None] * n

        def one(i):
            results[i] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    assert [r.status_code for r in burst(16)] == [200] * 16
    statuses = [r for r in burst(40)]
    rejected = [r for r in statuses if r.status_code == 429]
    assert rejected and all(r.headers.get("retry-after") for r in rejected)
    assert all(r.status_code in (200, 429) for r in statuses)
    assert_serves(srv)


# ---- an engine that breaks --------------------------------------------------------------------------


def test_engine_restarts_after_a_step_raises_outside_any_request(srv, monkeypatch):
    """A fault in the step itself (not in one request's forward) fails the requests in flight with
    a readable error, the engine starts over, and the next request is served."""
    real = srv.engine.step
    calls = {"n": 0}

    def broken_once():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated scheduler fault")
        return real()

    monkeypatch.setattr(srv.engine, "step", broken_once)
    with srv.http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 50, "ignore_eos": True,
                                                           "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "simulated scheduler fault" in events[-1]["error"]["message"]
    assert "restarted" in events[-1]["error"]["message"]
    monkeypatch.undo()
    assert srv.async_engine.dead is None
    assert_serves(srv)
    assert srv.engine.num_restarts >= 1
    srv.engine.block_manager.check()
    assert "shoal:engine_restarts_total" in srv.http.get("/metrics").text


def test_engine_beyond_restart_makes_the_server_exit_1(monkeypatch):
    """If even the restart fails, the server ends (exit code 1) instead of answering 503 for ever."""
    engine = fast_engine()
    server, async_engine = serve(engine)

    def broken():
        raise RuntimeError("device lost")

    def no_recovery(error):
        raise RuntimeError("cannot reset")

    monkeypatch.setattr(engine, "step", broken)
    monkeypatch.setattr(engine, "recover", no_recovery)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 5}, timeout=30)
    assert r.status_code == 500 and "engine stopped" in r.json()["error"]["message"]
    server.thread.join(timeout=15)
    assert not server.thread.is_alive(), "the server should have stopped by itself"
    assert server.server.lifecycle.exit_code == 1
    server.sock.close()


# ---- graceful shutdown ------------------------------------------------------------------------------


def slow_server(monkeypatch, drain_timeout_s: float, step_s: float = 0.02):
    engine = fast_engine()
    real = engine.step

    def slow():
        time.sleep(step_s)
        return real()

    monkeypatch.setattr(engine, "step", slow)
    return serve(engine, lifecycle=Lifecycle(drain_timeout_s))[0]


def stream_in_thread(url: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    out: dict = {"lines": []}

    def run():
        body = {"messages": CHAT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line:
                    out["lines"].append(line)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_streaming(out: dict) -> None:
    deadline = time.monotonic() + 30
    while len(out["lines"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(out["lines"]) >= 3, "the stream did not start"


def test_sigterm_drains_in_flight_requests_then_exits_0(monkeypatch):
    server = slow_server(monkeypatch, drain_timeout_s=30)
    t, out = stream_in_thread(server.url, max_tokens=60)  # ~1.2 s at 20 ms a step
    wait_streaming(out)
    server.server.begin_drain()  # what SIGTERM does
    time.sleep(0.1)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert_error(r, 503)
    assert r.headers["retry-after"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    t.join(timeout=30)
    assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]"
    assert not any('"error"' in line for line in out["lines"])
    server.thread.join(timeout=30)
    assert not server.thread.is_alive() and server.server.lifecycle.exit_code == 0
    server.sock.close()


def test_sigterm_past_the_drain_timeout_ends_requests_with_an_error(monkeypatch):
    server = slow_server(monkeypatch, drain_timeout_s=0.3)
    t, out = stream_in_thread(server.url, max_tokens=200)  # ~4 s: outlives the drain
    wait_streaming(out)
    server.server.begin_drain()
    t.join(timeout=30)
    errors = [json.loads(line[6:])["error"] for line in out["lines"] if line.startswith('data: {"error"')]
    assert errors and errors[0]["code"] == 503 and "shutting down" in errors[0]["message"]
    assert out["lines"][-1] == "data: [DONE]"
    server.thread.join(timeout=30)
    assert not server.thread.is_alive() and server.server.lifecycle.exit_code == 0
    server.sock.close()


# ---- the OpenAPI document -------------------------------------------------------------------------


def test_openapi_describes_errors_streams_and_bounds(srv):
    doc = srv.http.get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    for code in ("400", "401", "404", "413", "429", "503"):
        assert code in chat["responses"], code
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["priority"]["maximum"] == PRIORITY_MAX and props["priority"]["minimum"] == PRIORITY_MIN
    seed = next(s for s in props["seed"]["anyOf"] if s.get("type") == "integer")
    assert seed["maximum"] == pytest.approx(2**63 - 1)  # FastAPI writes it as a float


def test_guided_prompts_in_a_batch_with_an_extreme_penalty_are_answered(srv):
    """Found by the schemathesis fuzz on a fresh install: ten guided prompts in one request with a
    repetition penalty of 3e-170. It failed the whole step (500) twice over: the penalty made logits
    infinite, and llguidance's torch.compile'd mask kernel failed to compile for that batch shape."""
    prompts = ["\u00c7", "num_draft_tokens", "\u00e5", "\u00e3\u00f3", "/\u00bf", "c\u00f3f\u0000D", "\u00ea",
               "\u000ed", "\u009b7~(sO", "\u00a9t"]
    choices = ["<|", "\u00f8n\u00dbD\u00a1r"]
    r = srv.http.post("/v1/completions", json={"prompt": prompts, "guided_choice": choices,
                                               "repetition_penalty": 3.0580674168558494e-170})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] and all(c["text"] in choices for c in r.json()["choices"])
    assert_serves(srv)
