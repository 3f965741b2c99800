"""The engine core in its own process: its protocol (add, abort, outputs, errors, shutdown) on an
engine core without a model, a crash of the process mid-stream, and the server over it."""

from __future__ import annotations

import asyncio
import os
import signal
from functools import partial

import httpx
import pytest

from shoal.engine.request import FinishReason
from shoal.engine.sampling_params import SamplingParams
from shoal.server.engine_process import EngineProcess
from shoal.streams import QueueFull
from tests._fake_engine import fake_engine_core


async def drain(stream) -> list:
    return [out async for out in stream]


def test_requests_stream_abort_and_fail_over_the_process_boundary():
    front = EngineProcess(partial(fake_engine_core, step_s=0.005), tokenizer=None, max_waiting=2)
    assert front.proc.is_alive() and front.max_model_len == 128 and front.vocab_size == 100

    async def scenario() -> None:
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        outs = await drain(await front.submit([1, 2, 3], params, "a"))
        assert [t for o in outs for t in o.new_token_ids] == [7] * 20
        assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
        assert sum(1 for o in outs if o.finished) == 1
        with pytest.raises(ValueError, match="max_model_len|context"):  # the engine's refusal crosses back
            await front.submit(list(range(200)), params, "too-long")
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
            if front.load().num_running == front.load().num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        assert front.load().num_running == front.load().num_waiting == 0  # b's abort freed it too

    try:
        asyncio.run(scenario())
    finally:
        front.shutdown()
    assert front.proc.exitcode == 0


def test_a_killed_engine_process_ends_every_open_stream_with_an_error():
    front = EngineProcess(partial(fake_engine_core, step_s=0.02), tokenizer=None)

    async def scenario() -> None:
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        streams = [await front.submit([1, 2, 3], params, f"r{i}") for i in range(3)]
        await streams[0].__anext__()
        os.kill(front.proc.pid, signal.SIGKILL)
        ended = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), timeout=30)
        for outs in ended:
            assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ERROR
            assert "engine process exited" in outs[-1].error
        assert front.dead
        with pytest.raises(RuntimeError, match="engine stopped"):
            await front.submit([1], params, "late")

    try:
        asyncio.run(scenario())
    finally:
        front.shutdown()


def test_the_server_over_an_engine_process_streams_and_turns_unhealthy_when_it_dies():
    from shoal.model.loader import default_model_path, load_tokenizer
    from shoal.server.api import create_app
    from tests._server_util import ServerThread

    tokenizer = load_tokenizer(default_model_path())
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
