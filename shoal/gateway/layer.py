"""The gateway as the innermost ASGI layer of the OpenAI app (after the key check, so a request's
tenant is known): it answers ``/v1/embeddings`` and ``/v1/models``, and for a completion picks the
pool or router its ``model`` names, answers from the semantic cache when the request opts in, runs
the router's small-first cascade, and otherwise lets the served model's own app answer untouched."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

from shoal.gateway.answers import CHAT, Answer, StreamCapture
from shoal.gateway import decisions
from shoal.gateway.config import GatewayConfig, RouterConfig
from shoal.gateway.decisions import OPT_IN, query_text
from shoal.gateway.metrics import GatewayMetrics
from shoal.gateway.pools import LocalPool, Pool, Reply, error_reply, send_reply
from shoal.gateway import router as routing

log = logging.getLogger(__name__)

COMPLETIONS = (CHAT, "/v1/completions")


class Gateway:
    """What the layer needs: the config, the pools other than the served model, the embedder, the
    semantic cache and IC-Cache's example store (each None when not available)."""

    def __init__(self, config: GatewayConfig, pools: dict[str, Pool] | None = None, *, embedder=None, cache=None,
                 classifier=None, examples=None, sub_apps=()) -> None:
        self.config, self.pools, self.embedder = config, dict(pools or {}), embedder
        self.cache, self.classifier, self.examples = cache, classifier, examples
        self.routers: dict[str, RouterConfig] = {r.name: r for r in config.routers}
        self.metrics: GatewayMetrics | None = None
        self.sub_apps = list(sub_apps)  # other local models' apps: their lifespans run with the server's

    def attach(self, registry) -> None:
        """Register the gateway's series in the server's registry."""
        self.metrics = GatewayMetrics(registry)

    def cards(self, served: dict) -> list[dict]:
        """``/v1/models``: the served model's own card, the other pools, each with its prices, the
        routers and the embedding model."""
        def priced(card: dict, c) -> dict:
            return {**card, "pricing": {"prompt_per_million_tokens": c.prompt_cost,
                                        "completion_per_million_tokens": c.completion_cost}}

        created = served["created"]
        cards = [priced(served, self.config.default_pool)]
        cards += [priced({"id": p.name, "object": "model", "created": created,
                          "owned_by": "upstream" if p.config.url else "shoal"}, p.config) for p in self.pools.values()]
        cards += [{"id": r.name, "object": "model", "created": created, "owned_by": "shoal-router",
                   "router": {"small": r.small, "large": r.large}} for r in self.routers.values()]
        if self.embedder is not None:
            cards.append({"id": self.embedder.model_id, "object": "model", "created": created, "owned_by": "shoal",
                          "type": "embedding", "dimensions": self.embedder.dim, "max_model_len": self.embedder.max_tokens})
        return cards

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start the other local models' apps (and stop them after)."""
        async with AsyncExitStack() as stack:
            for app in self.sub_apps:
                await stack.enter_async_context(app.router.lifespan_context(app))
            yield


class GatewayLayer:
    def __init__(self, app, gateway: Gateway) -> None:
        self.app, self.g = app, gateway
        default = gateway.config.default_pool
        self.default = LocalPool(default, app, model_id=None)
        self.pools: dict[str, Pool] = {default.name: self.default, **gateway.pools}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"] in COMPLETIONS:
            await self.completion(scope, receive, send, scope["path"])
        else:
            await self.app(scope, receive, send)

    # ---- completions ---------------------------------------------------------------------------

    async def completion(self, scope, receive, send, path: str) -> None:
        raw = await _read(receive)
        body = _json(raw)
        if body is None or not isinstance(body.get("model", ""), (str, type(None))):
            await self.default.call_raw(path, raw, scope, receive, send)  # the served model's app says why
            return
        opted = body.pop(OPT_IN, False)
        if not isinstance(opted, bool):
            await send_reply(error_reply(400, f"{OPT_IN} must be true or false", "BadRequestError"), send)
            return
        name = body.get("model")
        router, pool = self.g.routers.get(name), self.pools.get(name)
        if name is not None and router is None and pool is None:
            known = ", ".join(self.pools) + "".join(f", {r}" for r in self.g.routers)
            await send_reply(error_reply(404, f"The model `{name}` does not exist (models: {known}).", "NotFoundError"), send)
            return
        pool = pool or self.default
        target = router.name if router else pool.name
        chat = path == CHAT
        lookup = await self._cache_lookup(scope, body, chat, target, decisions.wants_cache(self.g.config, target, opted))
        if isinstance(lookup, Answer):
            self.g.metrics.routes.labels(model=target, pool=target, route="cache").inc()
            await self._answer(lookup, body, target, send, [(b"x-shoal-cache", b"hit")])
            return
        store = lookup  # a function keeping the answer, or None
        if router is not None:
            await self.cascade(router, scope, receive, send, path, body, chat, store)
            return
        await self.forward(pool, scope, receive, send, path, body, chat, store, route="direct", asked=target)

    async def forward(self, pool: Pool, scope, receive, send, path: str, body: dict, chat: bool, store,
                      route: str, asked: str, extra: list | None = None) -> None:
        """Let ``pool`` answer (its stream relayed as it comes), then count, price and cache it."""
        headers = [(b"x-shoal-pool", pool.name.encode()), (b"x-shoal-route", route.encode())] + (extra or [])
        if store is not None:
            headers.append((b"x-shoal-cache", b"miss"))
        capture = StreamCapture(chat) if body.get("stream") else None
        if capture is not None:
            await pool.relay(path, body, scope, receive, send, headers, capture.feed)
            answer = capture.answer()
        else:
            reply = await pool.complete(path, body, scope, receive)
            await send_reply(reply, send, headers)
            answer = Answer.of_response(reply.json(), chat) if reply.status == 200 else None
        self._account(pool, asked, route, answer)
        if answer is not None and store is not None:
            store(answer, pool.name)
        if answer is not None and route in ("escalated", "upfront") and self.g.examples is not None and chat:
            await asyncio.to_thread(self.g.examples.add, _tenant(scope, body), query_text(body, chat), answer.content)

    async def cascade(self, router: RouterConfig, scope, receive, send, path: str, body: dict, chat: bool, store) -> None:
        """Small pool first; the large one when the small reply fails a check, or up front by category."""
        small, large = self.pools[router.small], self.pools[router.large]
        category = await self._category(body, chat) if router.escalate_categories else None
        if routing.upfront(router, category):
            await self.forward(large, scope, receive, send, path, body, chat, store, "upfront", router.name,
                               [(b"x-shoal-category", category.encode())])
            return
        small_body = {**body, "stream": False}
        small_body.pop("stream_options", None)
        if routing.wants_logprobs(router, body):
            small_body["logprobs"] = True if chat else 1
        examples = await self._examples(router, scope, body, chat)
        if examples:
            small_body["messages"] = examples + body["messages"]
        reply = await small.complete(path, small_body, scope, receive)
        data = reply.json()
        reason = routing.escalation(router, body, reply.status, data, chat)
        if reason is not None:
            self.g.metrics.escalations.labels(router=router.name, reason=reason).inc()
            self._bill(small, (data or {}).get("usage"))  # the small pool's work was spent all the same
            await self.forward(large, scope, receive, send, path, body, chat, store, "escalated", router.name,
                               [(b"x-shoal-escalation", reason.encode())])
            return
        if small_body.get("logprobs") and not body.get("logprobs"):
            for choice in data["choices"]:
                choice["logprobs"] = None
        data["model"] = small.name
        answer = Answer.of_response(data, chat)
        self._account(small, router.name, "small", answer)
        if answer is not None and store is not None:
            store(answer, small.name)
        headers = [(b"x-shoal-pool", small.name.encode()), (b"x-shoal-route", b"small")]
        if body.get("stream") and answer is not None:
            await self._answer(answer, body, small.name, send, headers)
        else:  # the small pool's whole reply (a tool call or several choices included)
            await send_reply(Reply(200, [(b"content-type", b"application/json")], json.dumps(data).encode()), send, headers)

    def _account(self, pool: Pool, asked: str, route: str, answer: Answer | None) -> None:
        self.g.metrics.routes.labels(model=asked, pool=pool.name, route=route).inc()
        if answer is not None:
            self._bill(pool, answer.usage)

    def _bill(self, pool: Pool, usage: dict | None) -> None:
        """Count a reply's tokens and price them at the pool's prices."""
        m = self.g.metrics
        prompt, completion = _tokens(usage)
        m.tokens.labels(pool=pool.name, kind="prompt").inc(prompt)
        m.tokens.labels(pool=pool.name, kind="completion").inc(completion)
        m.cost.labels(pool=pool.name).inc(pool.config.cost(prompt, completion))

    async def _answer(self, answer: Answer, body: dict, model: str, send, headers: list) -> None:
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            await _send_events(answer.events(model, include), send, headers)
        else:
            await send_reply(Reply(200, [(b"content-type", b"application/json")],
                                   json.dumps(answer.response(model)).encode()), send, headers)

    # ---- the semantic cache and IC-Cache -------------------------------------------------------

    async def _category(self, body: dict, chat: bool) -> str | None:
        if self.g.embedder is None or self.g.classifier is None:
            return None
        text = query_text(body, chat)
        if not text:
            return None
        vector = (await asyncio.to_thread(self.g.embedder.embed, [text]))[0]
        return self.g.classifier.classify(vector).name

    async def _cache_lookup(self, scope, body: dict, chat: bool, target: str, opted: bool):
        """A cached :class:`Answer`; else a function that stores this request's answer, or None
        when the request does not use the cache (not opted in, sampling too hot, tool results...)."""
        cache, m = self.g.cache, self.g.metrics
        if not opted:
            return None
        if cache is None or self.g.classifier is None or decisions.bypasses_cache(self.g.config, body, chat):
            m.cache_lookups.labels(result="bypass").inc()
            return None
        tenant = _tenant(scope, body)
        scope_key, key = decisions.cache_keys(body, chat, target)
        vector = category = None
        hit = cache.exact(tenant, scope_key, key)  # no embedding for a repeat
        if hit is None:
            vector = (await asyncio.to_thread(self.g.embedder.embed, [query_text(body, chat)]))[0]
            category = self.g.classifier.classify(vector)
            hit = cache.lookup(tenant, scope_key, key, vector, category)
        if hit is not None:
            m.cache_lookups.labels(result="exact" if hit.exact else "semantic").inc()
            answer, produced_by = decisions.cached_answer(hit.value)
            pool = self.pools.get(produced_by)
            if pool is not None:
                m.saved_cost.labels(pool=pool.name).inc(pool.config.cost(*_tokens(answer.usage)))
            return answer
        m.cache_lookups.labels(result="miss").inc()

        def store(answer: Answer, pool: str) -> None:
            if decisions.storable(answer):
                cache.store(tenant, scope_key, key, vector, category, decisions.cache_value(answer, pool))
                m.cache_entries.set(cache.stats().entries)

        return store

    async def _examples(self, router: RouterConfig, scope, body: dict, chat: bool) -> list[dict]:
        """IC-Cache: past large-pool answers to similar queries, as earlier turns of the chat."""
        store = self.g.examples
        if not chat or router.ic_examples <= 0 or store is None or (text := query_text(body, chat)) is None:
            return []
        found = await asyncio.to_thread(store.nearest, _tenant(scope, body), text, router.ic_examples,
                                        router.ic_min_similarity)
        kept = decisions.fit_examples(found, router.ic_max_chars)
        self.g.metrics.ic_examples.inc(len(kept))
        return [m for query, answer in kept for m in ({"role": "user", "content": query},
                                                       {"role": "assistant", "content": answer})]


def _tenant(scope, body: dict) -> str:
    tenant = (scope.get("state") or {}).get("tenant")
    return decisions.tenant(getattr(tenant, "name", None), body)


def _tokens(usage: dict | None) -> tuple[int, int]:
    """A reply's (prompt, completion) tokens from its usage (an upstream's: anything not a count is 0)."""
    usage = usage if isinstance(usage, dict) else {}
    return tuple(n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0  # type: ignore[return-value]
                 for n in (usage.get("prompt_tokens"), usage.get("completion_tokens")))


def _json(raw: bytes) -> dict | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def _read(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _send_events(events: list[bytes], send, headers: list) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")] + headers})
    for e in events:
        await send({"type": "http.response.body", "body": e, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
