"""The engine core in its own process: its protocol (add, abort, outputs, errors, shutdown) on an
engine core without a model, a crash of the process mid-stream, the server over it, and the text
decoded in the API process (the engine core's only for requests with stop strings)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from functools import partial

import httpx
import pytest

from shoal.engine.request import FinishReason
from shoal.engine.sampling_params import SamplingParams
from shoal.server.engine_process import EngineProcess
from shoal.streams import QueueFull
from tests._fake_engine import fake_engine_core
from tests._engine_util import run_all, tokens_of

# Characters split across byte-level tokens: forced by a grammar, as the test model is random.
MULTI_BYTE = "Name: 😀 你好 — café 🎉"


@pytest.fixture(scope="module")
def tokenizer():
    from shoal.model.loader import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


async def drain(stream) -> list:
    return [out async for out in stream]


def test_requests_stream_abort_and_fail_over_the_process_boundary(tokenizer):
    front = EngineProcess(partial(fake_engine_core, step_s=0.005), tokenizer=tokenizer, max_waiting=2)
    assert front.proc.is_alive() and front.max_model_len == 128 and front.vocab_size == 100

    async def scenario() -> None:
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        outs = await drain(await front.submit([1, 2, 3], params, "a"))
        assert [t for o in outs for t in o.new_token_ids] == [7] * 20
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
        assert sum(1 for o in outs if o.finished) == 1
        with pytest.raises(ValueError, match="max_model_len|context"):  # the engine's refusal crosses back
            await front.submit(list(range(200)), params, "too-long")
        assert not front._detoks  # the API process decodes: ended and refused requests leave no detokenizer
        long = SamplingParams(max_tokens=10_000 // 100, ignore_eos=True)
        b = await front.submit([1] * 10, long, "b")
        first = await b.__anext__()
        await b.aclose()  # the client went away: aborted in the engine process
        assert not first.finished
        # 4 slots + 2 queued: the 7th is refused with QueueFull, the queue bound of the engine loop.
        streams = [await front.submit([1] * 10, long, f"q{i}") for i in range(6)]
        with pytest.raises(QueueFull):
            await front.submit([1] * 10, long, "q6")
        front.fail_all("shutting down")
        ended = await asyncio.gather(*(drain(s) for s in streams))
        assert all(o[-1].finished and o[-1].error == "shutting down" for o in ended)
        for _ in range(100):
            if front.load().num_running == front.load().num_waiting == 0 and not front._detoks:
                break
            await asyncio.sleep(0.01)
        assert front.load().num_running == front.load().num_waiting == 0  # b's abort freed it too
        assert not front._detoks

    try:
        asyncio.run(scenario())
    finally:
        front.shutdown()
    assert front.proc.exitcode == 0


def test_a_killed_engine_process_ends_every_open_stream_with_an_error(tokenizer):
    front = EngineProcess(partial(fake_engine_core, step_s=0.02), tokenizer=tokenizer)

    async def scenario() -> None:
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        streams = [await front.submit([1, 2, 3], params, f"r{i}") for i in range(3)]
        await streams[0].__anext__()
        assert len(front._detoks) == 3
        os.kill(front.proc.pid, signal.SIGKILL)
        ended = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), timeout=30)
        for outs in ended:
            assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ERROR
            assert "engine process exited" in outs[-1].error
        assert front.dead and not front._detoks
        with pytest.raises(RuntimeError, match="engine stopped"):
            await front.submit([1], params, "late")

    try:
        asyncio.run(scenario())
    finally:
        front.shutdown()


def test_the_server_over_an_engine_process_streams_and_turns_unhealthy_when_it_dies(tokenizer):
    from shoal.server.api import create_app
    from tests._server_util import ServerThread

    front = EngineProcess(partial(fake_engine_core, step_s=0.02, vocab_size=len(tokenizer)), tokenizer=tokenizer)
    app = create_app(front, "fake")
    server = ServerThread(app, front).start()
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hello", "max_tokens": 5, "ignore_eos": True},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30,
                          json={"prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            os.kill(front.proc.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and any("error" in line for line in rest[:-1])
        try:  # unhealthy at once; then the server exits (code 1) for a supervisor to restart it
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        except httpx.ConnectError:
            pass
        server.thread.join(timeout=10)
        assert app.state.lifecycle.exit_code == 1
    finally:
        server.stop()


def test_an_engine_core_set_to_decode_only_for_stop_strings_leaves_other_text_to_the_api():
    from tests._server_util import fast_engine

    reference, core = fast_engine(), fast_engine()
    core.detokenize_all = False
    prompt = core.tokenizer.encode("Hello world")  # the test model answers " world world ..."
    for engine in (reference, core):
        engine.add(prompt, SamplingParams(max_tokens=8, temperature=0), req_id="plain")
        engine.add(prompt, SamplingParams(max_tokens=8, temperature=0, stop=["d w"]), req_id="stop")
    expected, got = run_all(reference), run_all(core)
    assert tokens_of(got["plain"]) == tokens_of(expected["plain"])
    assert all(o.new_text == "" for o in got["plain"]) and "".join(o.new_text for o in expected["plain"])
    assert [o.new_text for o in got["stop"]] == [o.new_text for o in expected["stop"]]
    assert "".join(o.new_text for o in got["stop"]) == " worl" and got["stop"][-1].stop_reason == "d w"
    assert not core._detok


def completion(url: str, body: dict, stream: bool) -> dict:
    """The first choice of a completion; streamed, its text joined and its last chunk's finish reason."""
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    return {"text": "".join(c["text"] for c in choices), "finish_reason": choices[-1]["finish_reason"]}


def test_the_api_process_decodes_the_same_text_as_the_engine_in_a_thread(tokenizer):
    from shoal.server.api import create_app
    from tests._server_util import MODEL_NAME, ServerThread, fast_engine, serve

    threaded, _ = serve(fast_engine())
    front = EngineProcess(fast_engine, tokenizer)
    process = ServerThread(create_app(front, MODEL_NAME), front).start()
    greedy = {"max_tokens": 24, "temperature": 0}
    cases = [
        {"prompt": "Hello world", **greedy},  # decoded in the API process
        {"prompt": "Hello world", "stop": ["d w"], **greedy},  # decoded by the engine, which stops at it
        {"prompt": "hello", "guided_regex": MULTI_BYTE, "logprobs": 1, **greedy},
        {"prompt": "hello", "guided_regex": MULTI_BYTE, "stop": ["你好"], "include_stop_str_in_output": True, **greedy},
    ]
    try:
        for body in cases:
            expected = completion(threaded.url, body, stream=False)
            assert completion(process.url, body, stream=False) == expected
            for server in (threaded, process):
                assert completion(server.url, body, stream=True) == {k: expected[k] for k in ("text", "finish_reason")}
        assert [completion(process.url, body, False)["text"] for body in cases[2:]] == [MULTI_BYTE, "Name: 😀 你好"]
        assert not front._detoks
        with httpx.stream("POST", f"{process.url}/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))
            assert len(front._detoks) == 1
        for _ in range(500):  # the client went away: its request is aborted, its detokenizer dropped
            if not front._detoks:
                break
            time.sleep(0.01)
        assert not front._detoks
    finally:
        process.stop()
        threaded.stop()
