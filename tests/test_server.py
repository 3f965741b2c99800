"""The OpenAI-compatible server over the real SmolLM2, through HTTP: the official ``openai``
client where it fits, ``httpx`` for raw checks (status codes, headers, error JSON, disconnects).

One server (one engine) per module; a second app with an API key and a one-slot queue bound
reuses the same loaded weights.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import shoal
from tests._server_util import MODEL_NAME, load_engine, serve
from tests._engine_util import add_bos_on_encode

API_KEY = "sekret-test-key"
COUNT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


# ---- fixtures ------------------------------------------------------------------------------------


class Srv:
    def __init__(self, engine, server, async_engine) -> None:
        self.engine, self.server, self.async_engine = engine, server, async_engine
        self.url = server.url
        self.tokenizer = engine.tokenizer
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def close(self) -> None:
        self.http.close()
        self.client.close()
        self.server.stop()


@pytest.fixture(scope="module")
def srv():
    engine = load_engine()
    server, async_engine = serve(engine)
    s = Srv(engine, server, async_engine)
    yield s
    s.close()
    assert not async_engine._thread.is_alive(), "the app's shutdown hook should stop the engine loop"


@pytest.fixture(scope="module")
def aux(srv):
    """A second server over the same weights: API key required, one sequence at a time, at most
    one waiting request."""
    engine = load_engine(model=srv.engine.model, tokenizer=srv.engine.tokenizer, max_num_seqs=1,
                         kv_cache_gb=0.05, swap_space_gb=0.01)
    server, async_engine = serve(engine, api_key=API_KEY, max_waiting=1)
    s = Srv(engine, server, async_engine)
    yield s
    s.close()


# ---- helpers -------------------------------------------------------------------------------------


def metrics(srv: Srv) -> dict[str, float]:
    """Every sample of /metrics as {"name{label=value,...}": value} (labels sorted, model_name and engine dropped)."""
    r = srv.http.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model_name", "engine"))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_idle(srv: Srv, timeout: float = 10.0) -> bool:
    """Until the engine holds no request and no KV block."""
    return wait_for(lambda: not srv.engine.requests and srv.engine.block_manager.num_used == 0
                    and srv.async_engine.load().num_running == 0, timeout)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] == status
    return err


def assert_serves(srv: Srv) -> None:
    """A good request still works."""
    r = srv.client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def sse_events(lines) -> list:
    """Decoded ``data:`` events of an SSE stream, up to [DONE] (which must come)."""
    events = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return events
        events.append(json.loads(data))
    raise AssertionError("stream ended without [DONE]")


def chat_prompt_ids(srv: Srv, messages) -> list[int]:
    text = srv.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return srv.tokenizer.encode(text, add_special_tokens=False)


# ---- plain endpoints -----------------------------------------------------------------------------


def test_health_version_models(srv):
    assert srv.http.get("/health").status_code == 200
    assert srv.http.get("/version").json() == {"version": shoal.__version__}
    models = srv.client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].owned_by == "shoal"
    assert srv.http.get("/v1/models").json()["data"][0]["max_model_len"] == 1024


def test_text_prompts_get_special_tokens_unless_asked_not_to(srv, monkeypatch):
    """As in vLLM: /v1/completions and /tokenize encode text with the tokenizer's special tokens
    (Llama's BOS) unless ``add_special_tokens`` is false."""
    add_bos_on_encode(monkeypatch, srv.tokenizer, bos=0)
    text = "The capital of France is"
    plain = srv.tokenizer.encode(text, add_special_tokens=False)
    assert srv.http.post("/tokenize", json={"prompt": text}).json()["tokens"] == [0] + plain
    assert srv.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"] == plain
    for extra, n in (({}, len(plain) + 1), ({"add_special_tokens": False}, len(plain))):
        r = srv.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": text, "max_tokens": 1, **extra})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == n
    # echo gives the prompt back as sent, not with the BOS it was encoded with
    r = srv.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [text, text], "max_tokens": 1, "echo": True})
    assert [c["text"][: len(text)] for c in r.json()["choices"]] == [text, text]


def test_tokenize_detokenize_round_trip(srv):
    text = "Hello there, how are you today? Ünïcödé and emoji 🙂 work too."
    r = srv.http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == srv.tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    back = srv.http.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    # chat messages are templated exactly as the tokenizer templates them locally
    r = srv.http.post("/tokenize", json={"messages": COUNT})
    assert r.json()["tokens"] == chat_prompt_ids(srv, COUNT)
    # errors
    assert_error(srv.http.post("/tokenize", json={}), 400)
    assert_error(srv.http.post("/detokenize", json={"tokens": [1, -1]}), 400)
    assert_error(srv.http.post("/detokenize", json={"tokens": [srv.engine.model_config.vocab_size]}), 400)
    assert_error(srv.http.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)


# ---- chat ----------------------------------------------------------------------------------------


def test_chat_non_streaming_usage_matches_tokenizer(srv):
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.startswith("1")
    assert choice.finish_reason == "length"
    served = srv.http.post("/tokenize", json={"messages": COUNT}).json()["count"]
    assert r.usage.prompt_tokens == served == len(chat_prompt_ids(srv, COUNT))
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    text = choice.message.content
    ids = srv.tokenizer.encode(text, add_special_tokens=False)
    assert srv.tokenizer.decode(ids) == text  # the count is a plain digit sequence: it round-trips
    assert len(ids) == r.usage.completion_tokens


def test_chat_streaming_with_usage(srv):
    full = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=20, temperature=0)
    stream = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=20, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    token_chunks = [c for c in chunks[1:-1] if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in token_chunks)
    assert text == full.choices[0].message.content
    assert len(token_chunks) == usage_chunk.usage.completion_tokens == 20  # one chunk per token
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 19 + ["length"]
    # without include_usage there is no usage chunk
    chunks = list(srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=3,
                                                     temperature=0, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_chat_n2(srv):
    r = srv.client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Write a short poem about rain."}],
        max_tokens=12, temperature=0.8, n=2, seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.choices[0].message.content != r.choices[1].message.content  # each choice has its own seed
    assert r.usage.completion_tokens == 24


def test_seed_repeats(srv):
    """Same seed, same sampled text (temperature 0.8). Sampling is exact per seed, but bf16 logits
    differ slightly with the batch shape and with prefix-cache hits, so the runs compared here see
    the same engine state: one at a time, prompt already cached."""
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
              max_tokens=12, temperature=0.8, extra_body={"ignore_eos": True})
    srv.client.chat.completions.create(seed=1, **kw)  # warm the prefix cache
    a = srv.client.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = srv.client.chat.completions.create(seed=11, **kw).choices[0].message.content
    assert a == b
    others = {srv.client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (12, 13)}
    assert others != {a}
    c = srv.client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10,
                                      temperature=0.8, seed=5, extra_body={"ignore_eos": True}).choices[0].text
    d = srv.client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10,
                                      temperature=0.8, seed=5, extra_body={"ignore_eos": True}).choices[0].text
    assert c == d


def test_priority_extension(srv):
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=4, temperature=0,
                                           extra_body={"priority": -3, "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    err = assert_error(srv.http.post("/v1/chat/completions", json={"messages": COUNT, "priority": "high"}), 400)
    assert "priority" in err["message"]


def test_chat_max_completion_tokens(srv):
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, temperature=0,
                                           max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    # max_completion_tokens wins over the deprecated max_tokens
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, temperature=0, max_tokens=30,
                                           max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_stop_string(srv):
    free = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=40,
                                              temperature=0).choices[0].message.content
    stop = free[len(free) // 2: len(free) // 2 + 2]  # some text from the middle of the answer
    expected = free[: free.index(stop)]
    assert expected, free
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=40, temperature=0,
                                           stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected
    assert stop not in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra.get("stop_reason") == stop
    # the same through the stream
    chunks = list(srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=40,
                                                     temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(srv):
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and math.isfinite(t.logprob)
        assert bytes(t.bytes).decode() == t.token
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert t.logprob <= tops[0] + 1e-6
        assert t.top_logprobs[0].token == t.token  # greedy picks the top-1 token
        assert sum(math.exp(x) for x in tops) <= 1.0 + 1e-3
    # logprobs without top_logprobs: the chosen token only
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=3, temperature=0,
                                           logprobs=True)
    assert [len(t.top_logprobs) for t in r.choices[0].logprobs.content] == [0, 0, 0]
    r = srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None


# ---- completions ---------------------------------------------------------------------------------

PROMPT = "The three primary colors are"


def test_completions_non_streaming_and_streaming(srv):
    r = srv.client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    n_prompt = len(srv.tokenizer.encode(PROMPT, add_special_tokens=False))
    assert r.usage.prompt_tokens == n_prompt == srv.http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert 0 < r.usage.completion_tokens <= 16
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 16

    chunks = list(srv.client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    token_chunks = chunks[:-1]
    assert chunks[-1].choices == [] and usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens == n_prompt
    assert len(token_chunks) == usage.completion_tokens
    assert "".join(c.choices[0].text for c in token_chunks) == choice.text
    assert token_chunks[-1].choices[0].finish_reason == choice.finish_reason

    # token-id prompts count exactly those ids; echo prepends the prompt
    ids = srv.tokenizer.encode(PROMPT, add_special_tokens=False)
    r2 = srv.client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=16, temperature=0, echo=True)
    assert r2.usage.prompt_tokens == len(ids)
    assert r2.choices[0].text == PROMPT + choice.text


def test_completions_max_tokens_ignore_eos_and_batch_prompts(srv):
    r = srv.client.completions.create(model=MODEL_NAME, prompt=["Hello", "Goodbye"], max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 14
    assert r.usage.prompt_tokens == sum(len(srv.tokenizer.encode(p, add_special_tokens=False))
                                        for p in ("Hello", "Goodbye"))


def test_completions_n2_streaming(srv):
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10, temperature=0.8, n=2, seed=5,
              extra_body={"ignore_eos": True})
    a = srv.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 20
    chunks = list(srv.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    per_choice = {0: [], 1: []}
    for c in chunks[:-1]:
        assert len(c.choices) == 1
        per_choice[c.choices[0].index].append(c.choices[0])
    assert [len(per_choice[0]), len(per_choice[1])] == [10, 10]  # one chunk per token per choice
    assert [per_choice[i][-1].finish_reason for i in (0, 1)] == ["length", "length"]
    assert chunks[-1].usage.completion_tokens == 20
    texts = ["".join(ch.text for ch in per_choice[i]) for i in (0, 1)]
    assert texts[0] != texts[1]


def test_completions_stop_string(srv):
    free = srv.client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=20,
                                         temperature=0).choices[0].text
    stop = " 8"
    assert stop in free, free
    r = srv.client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                      stop=stop)
    assert r.choices[0].text == free[: free.index(stop)]
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_completions_logprobs(srv):
    r = srv.client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        values = list(top.values())
        assert 1 <= len(values) <= 3 and values == sorted(values, reverse=True)
        assert chosen <= values[0] + 1e-6 and chosen == pytest.approx(max(values))
        assert top[tok] == pytest.approx(chosen)


# ---- concurrency ---------------------------------------------------------------------------------


CLOSE_CALL = 0.5  # nats; bf16 logits come in steps of ~0.125, and batch shape moves them a step or two


def test_concurrent_requests_match_single_runs(srv):
    """Eight requests at once give each its greedy single-run output. Greedy decoding in bf16 is only
    batch-invariant where the top-1 token clearly wins, so each output is compared up to its first
    close call (top-2 within CLOSE_CALL of top-1), and most prompts here have none."""
    prompts = ["1, 2, 3, 4, 5,", "A, B, C, D,", "10, 20, 30, 40,", "The capital of France is",
               "def fibonacci(n):", "Water boils at", "My favourite animal is", "Roses are red, violets are"]
    kw = dict(model=MODEL_NAME, max_tokens=10, temperature=0, logprobs=2)
    single = [srv.client.completions.create(prompt=p, **kw).choices[0] for p in prompts]

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(client.completions.create(prompt=p, **kw) for p in prompts))

    together = [r.choices[0] for r in asyncio.run(all_at_once())]
    fully_decisive = 0
    for p, one, many in zip(prompts, single, together):
        margins = [sorted(d.values())[-1] - sorted(d.values())[-2] for d in one.logprobs.top_logprobs]
        cut = next((i for i, m in enumerate(margins) if m < CLOSE_CALL), None)
        if cut is None:
            fully_decisive += 1
            assert many.text == one.text and many.finish_reason == one.finish_reason, p
            assert many.logprobs.tokens == one.logprobs.tokens, p
        else:
            assert many.logprobs.tokens[:cut] == one.logprobs.tokens[:cut], p
    assert fully_decisive >= 3  # the comparison is not vacuous
    assert wait_idle(srv)


# ---- disconnects ---------------------------------------------------------------------------------


def _aborts(srv: Srv) -> float:
    return metrics(srv).get("shoal:request_success_total{finished_reason=abort}", 0.0)


def test_stream_disconnect_aborts_and_frees_kv(srv):
    assert wait_idle(srv)
    before = _aborts(srv)
    body = {"model": MODEL_NAME, "prompt": "Tell me a very long story.", "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen == 3:
                    break
            assert srv.engine.block_manager.num_used > 0  # the request holds KV while it runs
    # the connection is closed: the request must be aborted and its KV freed promptly
    assert wait_idle(srv, timeout=5), "aborted stream still holds the engine"
    assert wait_for(lambda: _aborts(srv) == before + 1, 5)
    m = metrics(srv)
    assert m["shoal:num_requests_running"] == 0 and m["shoal:kv_cache_usage_perc"] == 0
    assert_serves(srv)


def test_non_streaming_disconnect_aborts(srv):
    assert wait_idle(srv)
    before = _aborts(srv)
    body = {"model": MODEL_NAME, "prompt": "Tell me a very long story.", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    # 900 tokens take far longer than this: only an abort empties the engine in time
    assert wait_idle(srv, timeout=5), "the server kept generating for a client that left"
    assert wait_for(lambda: _aborts(srv) == before + 1, 5)
    assert_serves(srv)


# ---- errors --------------------------------------------------------------------------------------

BAD_BODIES = [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, "vocabulary"),
    ("/v1/chat/completions", {"messages": COUNT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": COUNT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": COUNT, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": COUNT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": COUNT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "image_url"),
    ("/v1/completions", {"prompt": "hi", "speculative_config": {"method": "eagle"}}, "method"),
    ("/v1/completions", {"prompt": "hi", "speculative_config": {"num_speculative_tokens": 99}}, "num_speculative_tokens"),
    ("/v1/completions", {"prompt": "hi", "speculative_config": {"draft_model": "x"}}, "draft_model"),
    ("/v1/chat/completions", {"messages": COUNT, "speculative_config": {
        "prompt_lookup_min": 4, "prompt_lookup_max": 2}}, "prompt_lookup_max"),
]


def test_a_request_may_ask_for_speculative_decoding(srv):
    before = metrics(srv)
    text = "one two three four five six seven eight nine ten " * 4
    r = srv.client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True, "speculative_config": {
                                          "method": "ngram", "num_speculative_tokens": 3}})
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
    after = metrics(srv)
    drafted, accepted = (after[f"shoal:spec_decode_num_{name}_tokens_total"]
                         - before.get(f"shoal:spec_decode_num_{name}_tokens_total", 0) for name in ("draft", "accepted"))
    assert drafted > 0 and 0 <= accepted <= drafted


@pytest.mark.parametrize("path,body,word", BAD_BODIES, ids=[f"{p.split('/')[-1]}-{w}" for p, _, w in BAD_BODIES])
def test_bad_parameters_400(srv, path, body, word):
    err = assert_error(srv.http.post(path, json={"model": MODEL_NAME, **body}), 400)
    assert word in err["message"] or word == err.get("param"), err
    assert_serves(srv)


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_json_400(srv, stream):
    body = b'{"model": "%s", "prompt": "hi", "stream": %s,' % (MODEL_NAME.encode(), b"true" if stream else b"false")
    r = srv.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, 400)
    r = srv.http.post("/v1/chat/completions", content=b"not json at all", headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert_serves(srv)


def test_bad_parameters_through_openai_client(srv):
    with pytest.raises(openai.BadRequestError) as exc:
        srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, temperature=-1)
    assert exc.value.status_code == 400 and "temperature" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        srv.client.chat.completions.create(model="no-such-model", messages=COUNT, max_tokens=2)
    assert "no-such-model" in exc.value.body["message"]
    assert_serves(srv)


def test_prompt_longer_than_context_400(srv):
    prompt = "hello " * 1500
    n = len(srv.tokenizer.encode(prompt, add_special_tokens=False))
    assert n > 1024
    err = assert_error(srv.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt}), 400)
    assert "1024" in err["message"] and str(n) in err["message"]
    # chat: the templated prompt is what counts
    messages = [{"role": "user", "content": prompt}]
    n_chat = len(chat_prompt_ids(srv, messages))
    err = assert_error(srv.http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages}), 400)
    assert "1024" in err["message"] and str(n_chat) in err["message"]
    # a prompt that fits but not with the requested completion
    short = "hello " * 100
    n_short = len(srv.tokenizer.encode(short, add_special_tokens=False))
    err = assert_error(srv.http.post("/v1/completions", json={"prompt": short, "max_tokens": 1000}), 400)
    assert str(n_short + 1000) in err["message"] and str(n_short) in err["message"]
    # the same streamed: refused before the stream starts
    err = assert_error(srv.http.post("/v1/completions", json={"prompt": prompt, "stream": True}), 400)
    assert str(n) in err["message"]
    assert_serves(srv)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": COUNT, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": COUNT, "max_tokens": 2, "stream": True}),
])
def test_unknown_model_404(srv, path, body):
    err = assert_error(srv.http.post(path, json={"model": "gpt-17", **body}), 404)
    assert "gpt-17" in err["message"]
    assert_serves(srv)


def test_engine_step_failure_is_reported(srv, monkeypatch):
    """A failed forward pass fails its requests with a readable reason: a 500 before any byte was
    sent, an SSE error event (which the openai client raises) once a stream has started."""
    assert wait_idle(srv)
    before = metrics(srv).get("shoal:request_success_total{finished_reason=error}", 0.0)

    def broken(plan, states):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(srv.engine.executor, "execute", broken)
    err = assert_error(srv.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}), 500)
    assert "simulated device fault" in err["message"]
    err = assert_error(srv.http.post("/v1/chat/completions", json={"messages": COUNT, "max_tokens": 4}), 500)
    assert "simulated device fault" in err["message"]
    for path, body in (("/v1/chat/completions", {"messages": COUNT}), ("/v1/completions", {"prompt": "hi"})):
        with srv.http.stream("POST", path, json={**body, "max_tokens": 4, "stream": True,
                                                 "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        assert "simulated device fault" in events[-1]["error"]["message"], events
        assert events[-1]["error"]["code"] == 500
        assert not any(e.get("usage") or any(c.get("finish_reason") for c in e.get("choices", []))
                       for e in events[:-1]), "a failed stream must not look finished"
    with pytest.raises(openai.APIError, match="simulated device fault"):
        list(srv.client.chat.completions.create(model=MODEL_NAME, messages=COUNT, max_tokens=4, stream=True))
    assert wait_for(lambda: metrics(srv).get("shoal:request_success_total{finished_reason=error}", 0.0)
                    == before + 5, 5)
    monkeypatch.undo()
    assert wait_idle(srv)
    assert_serves(srv)


def test_api_key(aux):
    url = f"{aux.url}/v1/chat/completions"
    body = {"model": MODEL_NAME, "messages": COUNT, "max_tokens": 2}
    assert_error(httpx.post(url, json=body), 401)
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(url, json=body, headers={"Authorization": API_KEY}), 401)  # no "Bearer "
    assert_error(httpx.get(f"{aux.url}/v1/models"), 401)
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # the official client: wrong key -> AuthenticationError, right key -> works
    with pytest.raises(openai.AuthenticationError):
        aux.client.models.list()  # aux.client carries the key "x"
    with openai.OpenAI(base_url=f"{aux.url}/v1", api_key=API_KEY, max_retries=0) as good:
        assert [m.id for m in good.models.list().data] == [MODEL_NAME]
    # /health needs no key; the operator's endpoints do (a tenant could read others' traffic there)
    assert httpx.get(f"{aux.url}/health").status_code == 200
    assert httpx.get(f"{aux.url}/metrics").status_code == 401
    assert httpx.get(f"{aux.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_queue_bound_429(aux):
    """aux runs one sequence at a time and allows one waiting request: while a long request runs,
    a burst of requests gets exactly one admitted and the rest 429 with Retry-After."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long_body = {"model": MODEL_NAME, "prompt": "Tell me a story.", "max_tokens": 600, "ignore_eos": True,
                 "stream": True}
    short_body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, "ignore_eos": True}
    with httpx.Client(base_url=aux.url, headers=headers, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=long_body) as long_r:
            assert long_r.status_code == 200
            lines = long_r.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # it runs and holds the only slot

            results: list[httpx.Response] = []
            lock = threading.Lock()
            barrier = threading.Barrier(6)

            def fire() -> None:
                barrier.wait()
                r = httpx.post(f"{aux.url}/v1/completions", json=short_body, headers=headers, timeout=120)
                with lock:
                    results.append(r)

            threads = [threading.Thread(target=fire) for _ in range(6)]
            for t in threads:
                t.start()
            # the refusals come at once; the admitted request waits behind the long one
            assert wait_for(lambda: len(results) >= 5, 10), [r.status_code for r in results]
            refused = [r for r in results if r.status_code == 429]
            assert len(refused) == 5, [r.status_code for r in results]
        # leaving the block closed the long stream (aborted): the admitted request now runs
        for t in threads:
            t.join(60)
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [429] * 5
    for r in refused:
        err = assert_error(r, 429)
        assert err["type"] == "RateLimitError"
        assert r.headers.get("retry-after") == "1"
    ok = next(r for r in results if r.status_code == 200)
    assert ok.json()["usage"]["completion_tokens"] == 2
    # the official client surfaces it as RateLimitError (no retries here)
    assert wait_for(lambda: aux.async_engine.load().num_waiting == 0 and not aux.engine.requests, 10)
    with openai.OpenAI(base_url=f"{aux.url}/v1", api_key=API_KEY, max_retries=0) as good:
        r = good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens <= 2


# ---- metrics -------------------------------------------------------------------------------------


def test_metrics_move(srv):
    assert wait_idle(srv)
    before = metrics(srv)
    for name in ("shoal:num_requests_running", "shoal:num_requests_waiting", "shoal:num_requests_swapped",
                 "shoal:kv_cache_usage_perc"):
        assert name in before, name
    prompt = "Prefix caching reuses the KV of a shared prompt prefix. " * 6  # > 2 blocks of 16 tokens
    rs = [srv.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True}) for _ in range(2)]
    n_prompt = rs[0].usage.prompt_tokens

    def moved():
        m = metrics(srv)
        return m if m["shoal:time_to_first_token_seconds_count"] == before.get(
            "shoal:time_to_first_token_seconds_count", 0) + 2 else None

    after = wait_for(moved, 5)
    assert after, "TTFT histogram did not count the two requests"

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("shoal:prompt_tokens_total") == 2 * n_prompt
    assert delta("shoal:generation_tokens_total") == 10
    assert delta("shoal:request_success_total{finished_reason=length}") == 2
    assert delta("shoal:e2e_request_latency_seconds_count") == 2
    assert delta("shoal:request_queue_time_seconds_count") == 2
    assert delta("shoal:inter_token_latency_seconds_count") == 8  # 4 gaps per 5-token request
    assert delta("shoal:time_to_first_token_seconds_sum") > 0
    assert delta("shoal:prefix_cache_queries_total") >= 2 * n_prompt - 2
    assert delta("shoal:prefix_cache_hits_total") >= 32  # the second request reused the first's blocks
    assert after["shoal:num_requests_running"] == 0 and after["shoal:num_requests_waiting"] == 0


def test_usage_reports_the_prompt_tokens_served_from_the_prefix_cache(srv):
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``: a new prompt has none, the same
    prompt again has its full blocks cached; n choices count their prompt once."""
    prompt = list(range(1000, 1070))  # 70 tokens: 4 full blocks of 16
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1}
    first = srv.http.post("/v1/completions", json=body).json()["usage"]
    again = srv.http.post("/v1/completions", json={**body, "n": 2}).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["prompt_tokens"] == 70 and again["prompt_tokens_details"]["cached_tokens"] == 64
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "cache me " * 30}], "max_tokens": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    seen = []
    for _ in range(2):
        with srv.http.stream("POST", "/v1/chat/completions", json=chat) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
        seen.append(events[-1]["usage"])
    # the first may share the chat template's system prompt with earlier requests; the second has it all
    assert seen[0]["prompt_tokens_details"]["cached_tokens"] < seen[1]["prompt_tokens_details"]["cached_tokens"]
    assert seen[1]["prompt_tokens_details"]["cached_tokens"] == seen[1]["prompt_tokens"] // 16 * 16


def test_an_agent_turn_pins_its_context_and_metrics_show_it(srv):
    """A turn that says more turns follow leaves its context pinned (``kv_pinned_blocks``); the next
    turn is admitted onto the pin and hits its whole history."""
    assert wait_idle(srv)
    before = metrics(srv)
    prompt = list(range(2000, 2050))
    first = srv.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4,
                                                   "session_id": "agent-m", "more_turns": True, "tool": "bash"})
    assert first.status_code == 200
    m = metrics(srv)
    assert m["shoal:program_pins_total"] == before.get("shoal:program_pins_total", 0) + 1
    assert m["shoal:kv_pinned_blocks"] == 3  # 50 prompt + 4 output tokens: 3 full blocks of 16
    reply = srv.tokenizer.encode(first.json()["choices"][0]["text"], add_special_tokens=False)
    nxt = srv.http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt + reply[:3] + [7, 8, 9],
                                                 "max_tokens": 2, "session_id": "agent-m"})
    assert nxt.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
    m = metrics(srv)
    assert m["shoal:program_pin_hits_total"] == before.get("shoal:program_pin_hits_total", 0) + 1
    assert m["shoal:kv_pinned_blocks"] == 0  # the program ended: nothing stays pinned
