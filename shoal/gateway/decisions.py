"""The gateway's per-request rules, as pure functions shared by the HTTP layer (``layer.py``) and the
simulator (``shoal/sim/gateway.py``): which text a request is looked up and classified by, whose
cache it uses, whether it uses the cache at all, its cache keys, which answers are kept, what a
kept answer records (the pool that produced it, so a hit is priced by that pool), and which IC-Cache
examples a small request is given."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from shoal.gateway.answers import Answer
from shoal.gateway.config import GatewayConfig

OPT_IN = "semantic_cache"  # the body field by which a request asks for the cache (stripped by the layer)
# Fields that do not change the answer: left out of the cache key.
_VOLATILE = {"stream", "stream_options", "user", OPT_IN, "model"}


def query_text(body: dict, chat: bool) -> str | None:
    """The text the cache and the classifier look at: the last user message, or the prompt."""
    if not chat:
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) and content.strip() else None


def tenant(state_tenant: str | None, body: dict) -> str:
    """Whose cache: the API key's tenant, else the body's ``user`` (self-declared without a keys file)."""
    return state_tenant or str(body.get("user") or "")


def wants_cache(config: GatewayConfig, target: str, opted: bool) -> bool:
    """Whether a request for ``target`` (a router, or a pool whose answers may be cached) that
    ``opted`` in goes to the cache (it may still bypass it: :func:`bypasses_cache`)."""
    if not opted:
        return False
    return any(r.name == target for r in config.routers) or any(p.cache for p in config.pools if p.name == target)


def bypasses_cache(config: GatewayConfig, body: dict, chat: bool) -> bool:
    """A request that wants the cache goes past it: the cache is off, there is no query text, or
    the request is not :func:`cacheable`."""
    return not config.cache.enabled or not query_text(body, chat) or not cacheable(body, config.cache.max_temperature)


def cacheable(body: dict, max_temperature: float) -> bool:
    """Greedy-ish, one choice, no log-probabilities, no tool results in the conversation."""
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or temperature > max_temperature:
        return False
    if body.get("n", 1) != 1 or body.get("logprobs") or body.get("echo"):
        return False
    messages = body.get("messages") or []
    return not any(isinstance(m, dict) and m.get("role") == "tool" for m in messages)


def cache_keys(body: dict, chat: bool, target: str) -> tuple[str, str]:
    """``(scope, key)``: the scope is the target and the conversation before the query (a hit must
    share it); the key is the whole request less the fields that do not change the answer."""
    rest = {k: v for k, v in body.items() if k not in _VOLATILE}
    key = _digest({"target": target, "body": rest})
    if chat:
        rest["messages"] = rest["messages"][:-1]  # the conversation before the query
    else:
        rest.pop("prompt")
    return _digest({"target": target, "chat": chat, "context": rest}), key


def storable(answer: Answer) -> bool:
    """Only an answer that ended normally is kept (tool calls never make an :class:`Answer`)."""
    return answer.finish_reason in ("stop", "length")


def cache_value(answer: Answer, pool: str) -> dict:
    """What the cache keeps for an answer of ``pool``."""
    return {"answer": asdict(answer), "pool": pool}


def cached_answer(value: dict) -> tuple[Answer, str]:
    """The answer a cache value holds, and the pool that produced it."""
    return Answer(**value["answer"]), value["pool"]


def fit_examples(found: list[tuple[str, str]], max_chars: int) -> list[tuple[str, str]]:
    """IC-Cache: of the (query, answer) pairs found (least similar first), the most similar ones
    that fit in ``max_chars`` together, in the same order."""
    kept: list[tuple[str, str]] = []
    room = max_chars
    for query, answer in reversed(found):  # the most similar first, while they fit
        room -= len(query) + len(answer)
        if room < 0:
            break
        kept.insert(0, (query, answer))
    return kept


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
