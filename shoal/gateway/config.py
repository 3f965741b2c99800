"""The gateway's configuration (``shoal serve --gateway FILE``): model pools, routers over them, and
the semantic cache. Every field is checked here; an error names the field."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shoal.config_file import read_mapping


@dataclass(frozen=True)
class PoolConfig:
    """One model behind the endpoint: the model ``shoal serve`` loads (``local``), another local
    model file (``model``), or an OpenAI-compatible server elsewhere (``url``)."""

    name: str
    local: bool = False  # the model this server loads (--model)
    model: str | None = None  # another GGUF file / HF folder loaded in this process
    url: str | None = None  # an upstream's base URL, ending in /v1
    upstream_model: str | None = None  # the model name the upstream knows (default: name)
    api_key_env: str | None = None  # the environment variable holding the upstream's key
    timeout_s: float = 120.0
    prompt_cost: float = 0.0  # price per million prompt tokens
    completion_cost: float = 0.0  # price per million completion tokens
    cache: bool = True  # answers of this pool may be cached (a request still opts in)
    max_num_seqs: int = 16  # batch limit of a second local model

    def __post_init__(self) -> None:
        where = sum((self.local, self.model is not None, self.url is not None))
        if where != 1:
            raise ValueError(f"pool {self.name!r}: give exactly one of local: true, model, url")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"pool {self.name!r}: url must start with http:// or https://")
        if not self.timeout_s > 0 or self.prompt_cost < 0 or self.completion_cost < 0:
            raise ValueError(f"pool {self.name!r}: timeout_s must be > 0 and costs >= 0")

    def api_key(self) -> str | None:
        """The upstream's key, read from the environment when a request goes out (never logged)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_cost + completion_tokens * self.completion_cost) / 1e6


@dataclass(frozen=True)
class RouterConfig:
    """A model name (``auto``) that tries ``small`` first and escalates to ``large`` when the small
    answer fails a check, or up front for queries of ``escalate_categories``."""

    name: str
    small: str
    large: str
    check_schema: bool = True  # a reply must match the request's JSON schema / tools
    refusal_patterns: tuple[str, ...] = (r"(?i)\bI (?:can(?:'|no)t|am unable to|am not able to)\b",
                                         r"(?i)\bas an AI\b")
    min_mean_logprob: float | None = None  # escalate when the small reply's mean token logprob is lower
    escalate_categories: tuple[str, ...] = ()  # cache categories sent to the large pool up front
    ic_examples: int = 0  # IC-Cache: prepend up to this many similar past large-pool answers
    ic_min_similarity: float = 0.6
    ic_max_chars: int = 4000  # room the examples may take in the small model's context (~1,000 tokens)


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = True
    max_temperature: float = 0.5  # requests sampling hotter than this bypass the cache
    categories: str | None = None  # a categories YAML (default: the shipped one)


@dataclass(frozen=True)
class GatewayConfig:
    pools: tuple[PoolConfig, ...]
    routers: tuple[RouterConfig, ...] = ()
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools] + [r.name for r in self.routers]
        if len(set(names)) != len(names):
            raise ValueError("pool and router names must be distinct")
        if sum(p.local for p in self.pools) != 1:
            raise ValueError("exactly one pool is the served model (local: true)")
        pools = {p.name for p in self.pools}
        for r in self.routers:
            if r.small not in pools or r.large not in pools:
                raise ValueError(f"router {r.name!r}: small and large must name pools ({', '.join(sorted(pools))})")

    @property
    def default_pool(self) -> PoolConfig:
        return next(p for p in self.pools if p.local)

    @classmethod
    def single(cls, name: str) -> "GatewayConfig":
        """A plain ``shoal serve``: the served model alone, its cache available on request."""
        return cls(pools=(PoolConfig(name=name, local=True),))

    @classmethod
    def from_dict(cls, data: dict[str, Any], served_name: str) -> "GatewayConfig":
        """Build from the file's mapping; the local pool's name defaults to ``served_name``."""
        _no_unknown(data, ("pools", "routers", "cache"), "gateway config")
        pools = []
        for i, item in enumerate(_list(data, "pools")):
            item = dict(_mapping(item, f"pools[{i}]"))
            if item.get("local"):
                item.setdefault("name", served_name)
            pools.append(_build(PoolConfig, item, f"pools[{i}]"))
        routers = [_build(RouterConfig, _mapping(r, f"routers[{i}]"), f"routers[{i}]")
                   for i, r in enumerate(_list(data, "routers"))]
        cache = _build(CacheConfig, _mapping(data.get("cache", {}), "cache"), "cache")
        return cls(pools=tuple(pools), routers=tuple(routers), cache=cache)

    @classmethod
    def load(cls, path: str | os.PathLike, served_name: str) -> "GatewayConfig":
        try:
            return cls.from_dict(read_mapping(path), served_name)
        except ValueError as exc:
            raise ValueError(f"{Path(path)}: {exc}") from None


def _list(data: dict, key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list")
    return value


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    return value


def _no_unknown(data: dict, known, where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown fields {', '.join(map(str, unknown))}")


def _build(kind, data: dict, where: str):
    """``kind(**data)`` with each value checked against the field's annotated type."""
    known = {f.name: f.type for f in fields(kind)}
    _no_unknown(data, known, where)
    values = {}
    for key, value in data.items():
        kind_of = known[key]
        if value is None and "None" in kind_of:
            pass
        elif kind_of.startswith("tuple"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}.{key} must be a list of strings")
            value = tuple(value)
        elif kind_of == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{key} must be true or false")
        elif kind_of.startswith(("float", "int")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}.{key} must be a number")
        elif not isinstance(value, str):
            raise ValueError(f"{where}.{key} must be a string")
        values[key] = value
    try:
        return kind(**values)
    except TypeError as exc:  # a required field missing
        raise ValueError(f"{where}: {exc}") from None
