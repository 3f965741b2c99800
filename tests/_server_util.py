"""Helpers for the HTTP tests: build an engine on the real default model (or a tiny random one
with the real tokenizer, fast enough to fuzz) and run the OpenAI app under Shoal's uvicorn server
in a background thread on a free 127.0.0.1 port."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.model.config import ModelConfig
from shoal.model.llama import LlamaModel
from shoal.model.loader import ModelLoadError, default_model_path, load_tokenizer
from shoal.server.api import create_app
from shoal.server.async_engine import AsyncEngine
from shoal.server.lifecycle import ShoalServer

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


def fast_engine(**overrides) -> Engine:
    """A float32 engine on a tiny random Llama (2 layers, width 64) with SmolLM2's real tokenizer
    and vocabulary: real text in and out at a few ms a step, for fuzzing and life-cycle tests."""
    try:
        path = default_model_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_ids=(tokenizer.eos_token_id,))
    options = dict(dtype="float32", device="cpu", max_model_len=256, num_blocks=512, block_size=16,
                   num_swap_blocks=64, max_num_seqs=16)
    return Engine(EngineConfig(**{**options, **overrides}), model=LlamaModel(config), tokenizer=tokenizer)


class ServerThread:
    """Shoal's uvicorn server for ``app`` (over ``backend``) in a daemon thread; ``url`` is its
    base URL. ``server.begin_drain()`` does what SIGTERM does."""

    def __init__(self, app, backend) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = ShoalServer(config, app.state.lifecycle, backend)
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


def serve(engine: Engine, *, api_key: str | None = None, max_waiting: int | None = None, **app_options):
    """Start an app over ``engine`` (``app_options`` go to create_app); returns (ServerThread,
    AsyncEngine). Stopping the server also stops the engine loop (the app's shutdown hook)."""
    async_engine = AsyncEngine(engine, max_waiting=max_waiting)
    app = create_app(async_engine, MODEL_NAME, api_key, **app_options)
    try:
        return ServerThread(app, async_engine).start(), async_engine
    except BaseException:
        async_engine.shutdown()
        raise
