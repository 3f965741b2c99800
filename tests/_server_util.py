"""Helpers for the HTTP tests: build an engine on the real default model and run the OpenAI app
under uvicorn in a background thread on a free 127.0.0.1 port."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.model.loader import ModelLoadError, default_model_path
from shoal.server.api import create_app
from shoal.server.async_engine import AsyncEngine

MODEL_NAME = "smollm2-test"
# Small KV pools: enough for 16 x 1024-token contexts between them, cheap to allocate.
SERVER_CONFIG = dict(dtype="bfloat16", device="cpu", max_num_seqs=16, max_model_len=1024,
                     kv_cache_gb=0.25, swap_space_gb=0.05)


def load_engine(**overrides) -> Engine:
    """An engine on the default SmolLM2 (skips the module when the model is not installed).
    ``model=``/``tokenizer=`` reuse already loaded (and packed) weights."""
    try:
        default_model_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    model = overrides.pop("model", None)
    tokenizer = overrides.pop("tokenizer", None)
    return Engine(EngineConfig(**{**SERVER_CONFIG, **overrides}), model=model, tokenizer=tokenizer)


class ServerThread:
    """uvicorn serving ``app`` from a daemon thread; ``url`` is its base URL."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn-test", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.started:
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            if not self.thread.is_alive():
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("test server did not come up")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def serve(engine: Engine, *, api_key: str | None = None, max_waiting: int | None = None):
    """Start an app over ``engine``; returns (ServerThread, AsyncEngine). Stopping the server
    also stops the engine loop (the app's shutdown hook)."""
    async_engine = AsyncEngine(engine, max_waiting=max_waiting)
    app = create_app(async_engine, MODEL_NAME, api_key)
    try:
        return ServerThread(app).start(), async_engine
    except BaseException:
        async_engine.shutdown()
        raise
