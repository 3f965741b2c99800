"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`AsyncEngine`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager, nullcontext
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

import shoal
from shoal.engine.guided import GrammarCompiler, StructuredOutputs
from shoal.engine.metadata import DEFAULT_SLO, SLO, RequestMetadata
from shoal.engine.outputs import SHED_ERROR, RequestOutput
from shoal.gateway.embeddings import EmbeddingError, EmbeddingRequest, embeddings_response
from shoal.gateway.layer import Gateway, GatewayLayer
from shoal.server.async_engine import AsyncEngine
from shoal.server.dashboard import RollingHistory, add_dashboard
from shoal.server.lifecycle import Lifecycle
from shoal.server.metrics import HttpMetrics, ServerMetrics
from shoal.server.middleware import (
    AdmissionGate,
    BearerAuth,
    BodyLimit,
    BodyTooLarge,
    InternalErrors,
    RequestLog,
    error_response,
    too_large_response,
)
from shoal.server.tools import ToolCalling
from shoal.server.prompts import PromptBuilder
from shoal.server.quotas import LimitExceeded, LimitedStream, QuotaGate
from shoal.server.tenants import KeyRing
from shoal.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    _SamplingRequest,
    bind_limits,
)
from shoal.streams import QueueFull

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 << 20

_ERRORS = {
    400: "Bad input: malformed JSON, a parameter out of range, a prompt that does not fit.",
    401: "Missing or wrong API key.",
    404: "Unknown model.",
    413: "Request body over the size limit.",
    429: "Too many requests waiting; retry after `Retry-After` seconds.",
    500: "The engine failed this request.",
    503: "Shutting down, or the engine is unavailable; retry after `Retry-After` seconds.",
}
ERROR_RESPONSES = {code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()}
STREAM_RESPONSES = {**ERROR_RESPONSES, 200: {
    "description": "A JSON object, or with `stream: true` server-sent events: `data: {chunk}` lines, "
                   "an error event if the engine fails mid-stream, and `data: [DONE]`.",
    "content": {"application/json": {}, "text/event-stream": {"schema": {
        "type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}},
}}


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def create_app(engine: AsyncEngine, model_name: str, api_key: str | KeyRing | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, lifecycle: Lifecycle | None = None,
               tool_parser: str | None = None, tool_prompt: str = "auto", open_metrics: bool = False,
               access_log: bool = False, gateway: Gateway | None = None) -> FastAPI:
    """Build the app. ``engine`` must already be running; the app shuts it down on exit.
    ``lifecycle`` (kept as ``app.state.lifecycle``) drives the graceful shutdown. ``tool_parser``
    and ``tool_prompt`` override the model's tool-call format and prompt (see :class:`ToolCalling`).
    ``api_key`` is one key or a :class:`KeyRing` (keys naming tenants); with either, ``/metrics``
    and ``/dashboard/state`` also need a key unless ``open_metrics``. Every response carries ``X-Request-Id``; with
    ``access_log`` each request is logged (:class:`RequestLog`). ``gateway`` adds the other pools,
    routers, the semantic cache and ``/v1/embeddings`` (:mod:`shoal.gateway`)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if hasattr(engine, "start"):  # the cluster starts its instances inside the event loop
            await engine.start()
        metrics.set_max_model_len(engine.max_model_len)  # a cluster knows it once started
        try:
            async with gateway.running() if gateway else nullcontext():
                yield
        finally:
            engine.shutdown()

    app = FastAPI(title="Shoal", version=shoal.__version__, lifespan=lifespan)
    app.state.lifecycle = lifecycle = lifecycle or Lifecycle()
    build_openapi = app.openapi

    def openapi() -> dict:  # the document states this model's own limits (vocabulary, context)
        if app.openapi_schema is None:
            bind_limits(build_openapi(), engine.vocab_size - 1, engine.max_model_len - 1)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    metrics = ServerMetrics(model_name)
    history = RollingHistory()  # the dashboard's charts
    quotas = QuotaGate()  # per-tenant limits of the keys file
    tokenizer = engine.tokenizer
    prompts = PromptBuilder(tokenizer, lambda: engine.max_model_len)  # a cluster knows it once started
    tool_calling = ToolCalling(tokenizer, tool_parser, tool_prompt)
    grammars: list[GrammarCompiler] = []  # the in-process engine's own (shared cache), else one here

    def on_step(outputs: list[RequestOutput]) -> None:  # runs on the event loop
        now = time.monotonic()
        metrics.observe_step(outputs, engine.load(), now)
        history.observe(outputs, now)

    engine.step_listeners.append(on_step)
    if hasattr(engine, "register_metrics"):  # the cluster adds its own series
        engine.register_metrics(metrics.registry)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return error_response(400, message, "BadRequestError", param)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:  # 404, 405, unparsable bodies
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps errors raised while reading the body
            return too_large_response(exc.__cause__)
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "BadRequestError")
        return error_response(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return too_large_response(exc)

    # outermost first: request ids, the access log and HTTP metrics, bugs, the body limit, the gate
    # (its 503 needs no key), then the key
    if gateway is not None:  # innermost: after the key check, so a request's tenant is known
        gateway.attach(metrics.registry)
        app.add_middleware(GatewayLayer, gateway=gateway)
    if api_key:
        keys = api_key if isinstance(api_key, KeyRing) else KeyRing.single(api_key)
        app.add_middleware(BearerAuth, keys=keys, open_metrics=open_metrics)
    app.add_middleware(AdmissionGate, lifecycle=lifecycle)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(InternalErrors)
    http_metrics = HttpMetrics(metrics.registry, app.router.routes)
    app.add_middleware(RequestLog, access_log=access_log, observe=http_metrics.observe)

    # ---- plain endpoints -------------------------------------------------------------------------

    @app.get("/health", response_class=Response, responses={
        200: {"description": "Serving (an empty body)."}, 503: ERROR_RESPONSES[503]})
    async def health() -> Response:
        if engine.dead:
            return error_response(503, f"engine stopped: {engine.dead}", "ServiceUnavailableError")
        if not lifecycle.accepting:
            return error_response(503, "shutting down", "ServiceUnavailableError", headers={"Retry-After": "5"})
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": shoal.__version__}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_dashboard(app, engine, history, lifecycle, model_name)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "shoal",
                "max_model_len": engine.max_model_len}

    def model_cards() -> list[dict]:
        return gateway.cards(model_card()) if gateway else [model_card()]

    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def models() -> dict:
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}", responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]})
    async def model(model_id: str) -> dict:
        card = next((c for c in model_cards() if c["id"] == model_id), None)
        if card is None:
            raise APIError(404, f"The model `{model_id}` does not exist.", "NotFoundError", "model")
        return card

    if gateway is not None and gateway.embedder is not None:
        @app.post("/v1/embeddings", responses=ERROR_RESPONSES)
        async def embeddings(req: EmbeddingRequest) -> dict:
            try:
                body = await embeddings_response(gateway.embedder, req)
            except EmbeddingError as exc:
                raise APIError(exc.status, str(exc), "NotFoundError" if exc.status == 404 else "BadRequestError",
                               exc.param) from exc
            gateway.metrics.embedding_inputs.inc(len(body["data"]))
            gateway.metrics.embedding_tokens.inc(body["usage"]["prompt_tokens"])
            return body

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(req: TokenizeRequest) -> dict:
        check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            ids = await chat_token_ids(req.messages, req.add_generation_prompt, fit=False)
        else:
            ids = await encode(req.prompt, req.add_special_tokens, "prompt", fit=False)  # counting is its use
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(req: DetokenizeRequest) -> dict:
        check_model(req.model)
        vocab = engine.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    # ---- helpers ---------------------------------------------------------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    async def chat_token_ids(messages, add_generation_prompt: bool, fit: bool = True,
                             tools: list[dict] | None = None, tool_choice: str | dict = "none") -> list[int]:
        """The prompt of a conversation: its tool calls and results rendered, and ``tools`` given
        to a template that renders them or described in the system message otherwise."""
        try:
            conv = [{"role": m.role, "content": m.text(),
                     "tool_calls": [c.model_dump() for c in m.tool_calls or []],
                     "tool_call_id": m.tool_call_id} for m in messages]
            conv = tool_calling.conversation(conv, tools, tool_choice)
            return await prompts.chat(conv, add_generation_prompt, fit, tool_calling.template_tools(tools, tool_choice))
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    async def output_constraint(req: _SamplingRequest, tool_grammar: StructuredOutputs | None = None):
        """The request's output constraint, compiled once here (in a worker thread) so that a bad
        one is a 400 naming the problem and the engine's compile is a cache hit."""
        try:
            spec, field = req.structured()
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        if spec is not None and tool_grammar is not None:
            raise APIError(400, f"{field} cannot be combined with tool calls (tool_choice other than none)",
                           param=field)
        spec, field = (tool_grammar, "tools") if tool_grammar is not None else (spec, field)
        if spec is None:
            return None
        def compile_() -> None:  # the first call also converts the tokenizer (~0.5 s): not on the event loop
            if not grammars:
                grammars.append(getattr(engine, "grammar_compiler", None) or GrammarCompiler(tokenizer, engine.vocab_size))
            grammars[0].matcher(spec)

        try:
            await asyncio.to_thread(compile_)
        except ValueError as exc:
            raise APIError(400, f"{field}: {exc}", param=field) from exc
        return spec

    async def encode(text: str, add_special_tokens: bool, what: str, fit: bool = True) -> list[int]:
        try:
            return await prompts.encode(text, add_special_tokens, fit)
        except ValueError as exc:
            raise APIError(400, str(exc), param=what) from exc

    def check_max_tokens(req: _SamplingRequest, *names: str) -> None:
        """No completion length beyond the context, whether or not another field overrides it."""
        for name in names:
            value = getattr(req, name)
            if value is not None and value >= engine.max_model_len:
                raise APIError(400, f"{name} must be less than the model's maximum context length of "
                               f"{engine.max_model_len} tokens, got {value}", param=name)

    def check_length(prompt_len: int, max_tokens: int | None, what: str) -> int:
        """Validate prompt + completion against the context; returns the max_tokens to use."""
        if prompt_len == 0:
            raise APIError(400, "The prompt is empty.", param=what)
        max_model_len = engine.max_model_len
        requested = prompt_len + (max_tokens or 1)
        if prompt_len >= max_model_len or requested > max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{requested} tokens ({prompt_len} in the {what}, {max_tokens or 1} in the completion). "
                f"Please reduce the length of the {what} or completion.",
                param=what,
            )
        return max_tokens if max_tokens is not None else max_model_len - prompt_len

    def build_params(req: _SamplingRequest, max_tokens: int, logprobs: int | None, index: int,
                     structured: StructuredOutputs | None):
        try:
            return req.sampling_params(max_tokens, logprobs, index, structured)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    async def start(prompt_ids: list[int], params, req_id: str, metadata: RequestMetadata):
        """Submit, turning engine refusals into API errors before any byte is sent."""
        try:
            return await engine.submit(prompt_ids, params, req_id, metadata)
        except QueueFull as exc:
            metrics.observe_rejection(metadata.tenant)
            raise APIError(429, f"Server busy: {exc}. Retry later.", "RateLimitError",
                           headers={"Retry-After": "1"}) from exc
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        except RuntimeError as exc:
            raise APIError(503, str(exc), "ServiceUnavailableError") from exc

    async def run_choices(prompts: list[list[int]], req: _SamplingRequest, max_tokens: list[int],
                          logprobs: int | None, base_id: str, request: Request,
                          structured: StructuredOutputs | None = None):
        """Start every (prompt, n) choice; returns one output stream per choice, in index order.
        The request's metadata: ``priority`` (capped by the key's tenant); the tenant is the API
        key's, else ``user``; the session fields are the body's, else the headers' (``session_fields``)."""
        tenant = getattr(request.state, "tenant", None)  # the API key's, if the server has a keys file
        claims = None
        if tenant is not None and tenant.limits.any:
            n_seq = [len(ids) for ids in prompts for _ in range(req.n)]
            try:
                claims = quotas.admit(tenant.name, tenant.limits, n_seq, [m for m in max_tokens for _ in range(req.n)])
            except LimitExceeded as exc:
                metrics.observe_rejection(tenant.name)
                raise APIError(429, str(exc), "RateLimitError", exc.limit,
                               headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}) from exc
        metadata = RequestMetadata(
            priority=tenant.cap(req.priority) if tenant else req.priority,
            tenant=tenant.name if tenant and tenant.name else req.user,
            weight=tenant.weight if tenant else 1.0,
            **session_fields(req, request.headers),
            cache_salt="\0".join(s for s in (tenant and tenant.cache_salt, req.cache_salt) if s) or None,
            slo=request_slo(req, getattr(engine, "slo", None)))
        streams = []
        req_ids = [f"{base_id}-{index}" for index in range(len(prompts) * req.n)]
        try:
            for p_i, ids in enumerate(prompts):
                metrics.expect(req_ids[p_i * req.n:(p_i + 1) * req.n], max_tokens[p_i])
                for j in range(req.n):
                    index = p_i * req.n + j
                    params = build_params(req, max_tokens[p_i], logprobs, j, structured)
                    stream = await start(ids, params, req_ids[index], metadata)
                    streams.append(stream if claims is None else LimitedStream(stream, quotas, claims[index]))
        except BaseException:
            metrics.forget(req_ids[len(streams):])
            for s in streams:
                await s.aclose()
            for claim in claims or ():
                quotas.release(claim, 0)  # those not started; release is once per claim
            raise
        return streams

    async def merged(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Interleave several output streams as (choice index, output)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s) -> None:
            try:
                async for out in s:
                    await queue.put((i, out))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                await s.aclose()

    async def until_disconnect(request: Request, work):
        """Run ``work`` but abort it (freeing its KV) if the client goes away first."""
        task = asyncio.ensure_future(work)
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected", "ClientClosedRequest")
        return task.result()

    def failed(out: RequestOutput) -> None:
        if out.finish_reason is not None and out.finish_reason.value == "error":
            if out.error == SHED_ERROR:  # a request of better priority took its place in the full queue
                metrics.observe_rejection(out.metadata.tenant if out.metadata is not None else None)
                raise APIError(429, f"Server busy: {SHED_ERROR}.", "RateLimitError", headers={"Retry-After": "1"})
            if not lifecycle.accepting:  # cut by a shutdown whose drain timed out
                raise APIError(503, out.error or "shutting down", "ServiceUnavailableError",
                               headers={"Retry-After": "5"})
            raise APIError(500, out.error or "generation failed", "InternalServerError")

    async def complete(request: Request, streams, body, n: int) -> tuple[list[dict], int, int]:
        """Run non-streaming choices to the end (``n`` per prompt); ``body(i, outputs)`` gives each
        choice's content fields. Returns the choices, the completion and the cached prompt token counts."""
        results = await until_disconnect(request, collect(streams))
        choices, completion_tokens, cached = [], 0, {}
        for i, outs in enumerate(results):
            final = outs[-1]
            failed(final)
            completion_tokens += final.num_output_tokens
            cached[i] = final.num_cached_tokens
            choices.append({"index": i, **body(i, outs), "finish_reason": reason(final),
                            "stop_reason": final.stop_reason})
        return choices, completion_tokens, cached_prompt_tokens(cached, n)

    def token_text(t: int) -> str:
        return tokenizer.decode([t])

    # ---- completions -----------------------------------------------------------------------------

    @app.post("/v1/completions", responses=STREAM_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        check_max_tokens(req, "max_tokens")
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported: Shoal does not insert text", param="suffix")
        structured = await output_constraint(req)
        prompts: list[list[int]]
        p = req.prompt
        if isinstance(p, str):
            prompts = [await encode(p, req.add_special_tokens, "prompt")]
        elif p and isinstance(p[0], str):
            prompts = [await encode(x, req.add_special_tokens, "prompt") for x in p]  # type: ignore[arg-type]
        elif p and isinstance(p[0], int):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        if not prompts:
            raise APIError(400, "The prompt is empty.", param="prompt")
        max_tokens = [check_length(len(ids), req.max_tokens, "prompt") for ids in prompts]
        base = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await run_choices(prompts, req, max_tokens, req.logprobs, base, request, structured)
        n_choices = len(streams)
        live_usage = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        prompt_tokens = sum(len(x) for x in prompts)

        def lp_block(outs: list[RequestOutput], offset0: int):
            if req.logprobs is None:
                return None
            tokens, token_lps, tops, offsets, off = [], [], [], [], offset0
            for o in outs:
                for chosen, top in o.logprobs or []:
                    text = token_text(chosen.token_id)
                    tokens.append(text)
                    token_lps.append(chosen.logprob)
                    tops.append({token_text(a.token_id): a.logprob for a in top} if req.logprobs else None)
                    offsets.append(off)
                    off += len(text)
            return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

        def prefix(i: int) -> str:  # a text prompt echoes as sent, not with the BOS it was encoded with
            if not req.echo:
                return ""
            p = req.prompt
            if isinstance(p, str):
                return p
            if isinstance(p[0], str):
                return p[i // req.n]  # type: ignore[return-value]
            return tokenizer.decode(prompts[i // req.n])

        if req.stream:
            async def sse():
                completion_tokens, cached = 0, {}
                offsets = [0] * n_choices
                async for i, out in merged(streams):
                    if (error := stream_error(out, lifecycle.accepting)) is not None:
                        yield error
                        break
                    completion_tokens += len(out.new_token_ids)
                    cached[i] = out.num_cached_tokens
                    text = out.new_text
                    if offsets[i] == 0 and req.echo:
                        text = prefix(i) + text
                    choice = {"index": i, "text": text, "logprobs": lp_block([out], offsets[i]),
                              "finish_reason": reason(out)}
                    offsets[i] += len(text)
                    yield sse_event({"id": base, "object": "text_completion", "created": created,
                                     "model": model_name, "choices": [choice],
                                     **({"usage": usage(prompt_tokens, completion_tokens, cached_prompt_tokens(cached, req.n))}
                                        if live_usage else {})})
                else:
                    if req.stream_options and req.stream_options.include_usage:
                        yield sse_event({"id": base, "object": "text_completion", "created": created, "model": model_name,
                                         "choices": [], "usage": usage(prompt_tokens, completion_tokens,
                                                                        cached_prompt_tokens(cached, req.n))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        choices, completion_tokens, cached_tokens = await complete(request, streams, lambda i, outs: {
            "text": prefix(i) + "".join(o.new_text for o in outs), "logprobs": lp_block(outs, len(prefix(i)))}, req.n)
        return {"id": base, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    # ---- chat completions ------------------------------------------------------------------------

    @app.post("/v1/chat/completions", responses=STREAM_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        check_max_tokens(req, "max_tokens", "max_completion_tokens")
        try:
            tool_choice = req.effective_tool_choice()
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from exc
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        calling = bool(tools) and tool_choice != "none"
        structured = await output_constraint(
            req, tool_calling.grammar(tools, tool_choice, req.parallel_tool_calls) if calling else None)
        ids = await chat_token_ids(req.messages, req.add_generation_prompt, tools=tools, tool_choice=tool_choice)
        max_tokens = check_length(len(ids), req.effective_max_tokens(), "messages")
        req.max_tokens = max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        base = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await run_choices([ids], req, [max_tokens], logprobs, base, request, structured)
        live_usage = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        def lp_content(outs: list[RequestOutput]):
            if logprobs is None:
                return None
            content = []
            for o in outs:
                for chosen, top in o.logprobs or []:
                    text = token_text(chosen.token_id)
                    content.append({"token": text, "logprob": chosen.logprob, "bytes": list(text.encode()),
                                    "top_logprobs": [{"token": token_text(a.token_id), "logprob": a.logprob,
                                                      "bytes": list(token_text(a.token_id).encode())} for a in top]})
            return {"content": content}

        def chunk(choices: list[dict], **extra) -> str:
            return sse_event({"id": base, "object": "chat.completion.chunk", "created": created,
                              "model": model_name, "choices": choices, **extra})

        def finish(r: str | None, called: bool) -> str | None:
            """OpenAI's finish reason: ``tool_calls`` for an answer that stopped on its calls."""
            return "tool_calls" if r == "stop" and called else r

        if req.stream:
            async def sse():
                completion_tokens, cached = 0, {}
                calls = [tool_calling.stream() for _ in streams]
                for i in range(len(streams)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for i, out in merged(streams):
                    if (error := stream_error(out, lifecycle.accepting)) is not None:
                        yield error
                        break
                    completion_tokens += len(out.new_token_ids)
                    cached[i] = out.num_cached_tokens
                    text, new_calls = calls[i].feed(out.new_text, out.finished) if calling else (out.new_text, [])
                    delta: dict = {"content": text} if text or not (out.finished or calling) else {}
                    if new_calls:
                        first = len(calls[i].calls) - len(new_calls)
                        delta["tool_calls"] = [c.to_openai(first + k) for k, c in enumerate(new_calls)]
                    if not delta and not out.finished and logprobs is None:
                        continue  # text held back while it may still become a tool call
                    yield chunk([{"index": i, "delta": delta, "logprobs": lp_content([out]),
                                  "finish_reason": finish(reason(out), bool(calls[i].calls))}],
                                **({"usage": usage(len(ids), completion_tokens, cached_prompt_tokens(cached, req.n))}
                                   if live_usage else {}))
                else:
                    if req.stream_options and req.stream_options.include_usage:
                        yield chunk([], usage=usage(len(ids), completion_tokens, cached_prompt_tokens(cached, req.n)))
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        def message(outs: list[RequestOutput]) -> dict:
            text = "".join(o.new_text for o in outs)
            if not calling:
                return {"role": "assistant", "content": text}
            content, calls = tool_calling.parse(text)
            return {"role": "assistant", "content": content, **({"tool_calls": [c.to_openai() for c in calls]} if calls else {})}

        choices, completion_tokens, cached_tokens = await complete(request, streams, lambda i, outs: {
            "message": message(outs), "logprobs": lp_content(outs)}, req.n)
        for c in choices:
            c["finish_reason"] = finish(c["finish_reason"], "tool_calls" in c["message"])
        return {"id": base, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(len(ids), completion_tokens, cached_tokens)}

    return app


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message and ``param`` for pydantic's errors: the deepest one (in a union, the
    branch that got furthest), its location without pydantic's union-branch tags, and never the
    input itself. ``param`` is the top-level field."""
    if not errors:
        return "invalid request", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (
        isinstance(p, int) or (re.fullmatch(r"[a-z_][a-z0-9_]*", str(p)) and p not in _UNION_TAGS))]
    msg = first.get("msg", "invalid request")
    return (f"{'.'.join(loc)}: {msg}" if loc else msg), (loc[0] if loc else None)


_BOOL_HEADER = {"true": True, "1": True, "false": False, "0": False}


def session_fields(req: _SamplingRequest, headers) -> dict:
    """``session_id``, ``more_turns`` and ``tool`` of the request: the body's fields, else the
    ``X-Session-Id``, ``X-More-Turns`` (true / false / 1 / 0) and ``X-Tool`` headers. A header
    outside those bounds is a 400 naming it."""
    def header(name: str, limit: int) -> str | None:
        value = headers.get(name)
        if value is not None and not 1 <= len(value) <= limit:
            raise APIError(400, f"{name} must be 1 to {limit} characters", param=name)
        return value

    more = req.more_turns
    if more is None:
        raw = header("x-more-turns", 5)
        if raw is not None and raw.lower() not in _BOOL_HEADER:
            raise APIError(400, "x-more-turns must be true, false, 1 or 0", param="x-more-turns")
        more = raw is not None and _BOOL_HEADER[raw.lower()]
    return {"session_id": req.session_id or header("x-session-id", 256), "more_turns": more,
            "tool": req.tool or header("x-tool", 128)}


def request_slo(req: _SamplingRequest, default: SLO | None) -> SLO | None:
    """The body's ``slo_ttft_ms`` / ``slo_tpot_ms``, each defaulting to the server's SLO."""
    if req.slo_ttft_ms is None and req.slo_tpot_ms is None:
        return None
    base = default or DEFAULT_SLO
    return SLO(base.ttft_s if req.slo_ttft_ms is None else req.slo_ttft_ms / 1e3,
               base.tpot_s if req.slo_tpot_ms is None else req.slo_tpot_ms / 1e3)


async def collect(streams) -> list[list[RequestOutput]]:
    """Drain each choice's stream concurrently."""

    async def drain(s) -> list[RequestOutput]:
        return [o async for o in s]

    try:
        return list(await asyncio.gather(*(drain(s) for s in streams)))
    finally:
        for s in streams:
            await s.aclose()


def stream_error(out: RequestOutput, accepting: bool = True) -> str | None:
    """The SSE error event for a choice the engine failed (OpenAI clients raise on it), else None.
    Mid-stream the status is already 200, so this is the only way to tell the client. A request
    cut by a shutdown (the server no longer ``accepting``) reads 503, anything else 500."""
    if out.finish_reason is None or out.finish_reason.value != "error":
        return None
    code, kind = (500, "InternalServerError") if accepting else (503, "ServiceUnavailableError")
    if out.error == SHED_ERROR:
        code, kind = 429, "RateLimitError"
    return sse_event({"error": {"message": out.error or "generation failed", "type": kind, "param": None, "code": code}})


def reason(out: RequestOutput) -> str | None:
    if not out.finished or out.finish_reason is None:
        return None
    return "length" if out.finish_reason.value == "length" else ("abort" if out.finish_reason.value == "abort" else "stop")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` are the prompt tokens served
    from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_prompt_tokens(per_choice: dict[int, int], n: int) -> int:
    """Cached prompt tokens of a request whose choices are ``n`` per prompt (each prompt counted once,
    as ``prompt_tokens`` counts it: by its first choice)."""
    return sum(v for i, v in per_choice.items() if i % n == 0)


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
