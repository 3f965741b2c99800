"""The router's decisions, as pure functions of the request and replies (shared by the gateway and
the simulator): send a query to the large pool up front, or check the small pool's reply and say
why it must be escalated."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache

import jsonschema

from shoal.gateway.config import RouterConfig

SCHEMA, TOOL_CALL, REFUSAL, LOW_CONFIDENCE, SMALL_FAILED = (
    "invalid_schema", "invalid_tool_call", "refusal", "low_confidence", "small_failed")


def upfront(router: RouterConfig, category: str | None) -> bool:
    """Whether a query of ``category`` goes straight to the large pool."""
    return category is not None and category in router.escalate_categories


def wants_logprobs(router: RouterConfig, body: dict) -> bool:
    """Whether the small pool must be asked for token log-probabilities (the confidence check)."""
    return router.min_mean_logprob is not None and not body.get("logprobs")


def escalation(router: RouterConfig, body: dict, status: int, data: dict | None, chat: bool) -> str | None:
    """Why the small pool's reply must not be the answer (None: it may be)."""
    if status != 200 or data is None:
        return SMALL_FAILED
    try:
        (choice,) = data["choices"]
    except (KeyError, TypeError, ValueError):
        return SMALL_FAILED
    message = (choice.get("message") or {}) if chat else {}
    content = (message.get("content") if chat else choice.get("text")) or ""
    if router.check_schema:
        if (schema := _requested_schema(body)) is not None and not _matches(content, schema):
            return SCHEMA
        if chat and (tools := _required_tools(body)) is not None and not _calls_valid(message.get("tool_calls"), tools):
            return TOOL_CALL
    if any(_pattern(p).search(content) for p in router.refusal_patterns):
        return REFUSAL
    if router.min_mean_logprob is not None:
        mean = _mean_logprob(choice.get("logprobs"), chat)
        if mean is not None and mean < router.min_mean_logprob:
            return LOW_CONFIDENCE
    return None


@lru_cache(maxsize=256)
def _pattern(text: str) -> re.Pattern:
    return re.compile(text)


_ANY_OBJECT = {"type": "object"}


def _requested_schema(body: dict) -> dict | None:
    """The JSON schema the request asks the answer to follow: ``response_format`` (json_schema /
    json_object) or vLLM's ``structured_outputs.json`` / ``guided_json``."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or _ANY_OBJECT
    if fmt.get("type") == "json_object":
        return _ANY_OBJECT
    guided = (body.get("structured_outputs") or {}).get("json", body.get("guided_json"))
    if isinstance(guided, str):
        try:
            guided = json.loads(guided)
        except ValueError:
            return None
    return guided if isinstance(guided, dict) else None


def _matches(content: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(content), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    except jsonschema.SchemaError:
        return True  # the request's own schema is broken: not the small model's fault
    return True


def _required_tools(body: dict) -> dict[str, dict] | None:
    """The offered tools' parameter schemas by name, when the request requires a call."""
    choice = body.get("tool_choice")
    tools = body.get("tools") or []
    if not tools or (choice != "required" and not isinstance(choice, dict)):
        return None
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    return {t["function"]["name"]: t["function"].get("parameters") or _ANY_OBJECT
            for t in tools if named is None or t["function"]["name"] == named}


def _calls_valid(calls, tools: dict[str, dict]) -> bool:
    if not calls:
        return False
    for call in calls:
        fn = call.get("function") or {}
        if fn.get("name") not in tools or not _matches(fn.get("arguments") or "", tools[fn["name"]]):
            return False
    return True


def _mean_logprob(logprobs, chat: bool) -> float | None:
    if not logprobs:
        return None
    values = [t["logprob"] for t in logprobs.get("content") or []] if chat else logprobs.get("token_logprobs") or []
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None
