"""The gateway's semantic cache: an exact-match layer in front of a vector index (usearch HNSW), with
per-category similarity thresholds, TTLs and quotas (Category-Aware Semantic Caching), scoped by
tenant and by a caller-chosen scope (e.g. pool and request shape): no entry is ever found from
another tenant or scope.

Plain library code: no clock reads except through the ``clock`` it is handed; the caller embeds the
text and classifies it (:class:`CategoryClassifier`), so a lookup is one index search and checks.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from importlib import resources
from typing import Any

import numpy as np
from usearch.index import Index

from shoal.config_file import read_mapping


@dataclass(frozen=True)
class Category:
    """A kind of query: a hit needs cosine similarity >= ``threshold``; entries live ``ttl_s``
    seconds; a tenant keeps at most ``max_entries`` of them (the oldest go first). ``examples`` are
    queries of the kind, whose mean embedding the classifier compares a query with."""

    name: str
    threshold: float
    ttl_s: float
    max_entries: int
    examples: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(self.examples))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name must be a non-empty string")
        if not _is_number(self.threshold) or not 0 < self.threshold <= 1:
            raise ValueError("threshold must be a number in (0, 1]")
        if not _is_number(self.ttl_s) or not self.ttl_s > 0:
            raise ValueError("ttl_s must be a number > 0")
        if not isinstance(self.max_entries, int) or isinstance(self.max_entries, bool) or self.max_entries < 1:
            raise ValueError("max_entries must be an integer >= 1")
        if not all(isinstance(e, str) and e for e in self.examples):
            raise ValueError("examples must be non-empty strings")


@dataclass(frozen=True)
class CategoryConfig:
    """The categories, the one for queries like none of them, and how similar a query must be to a
    category's centroid to be classified into it."""

    categories: tuple[Category, ...]
    default: Category
    min_similarity: float = 0.15

    def category(self, name: str) -> Category:
        """The category called ``name``; ValueError naming the known ones otherwise."""
        for c in (*self.categories, self.default):
            if c.name == name:
                return c
        raise ValueError(f"unknown cache category {name!r} (known: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [c.name for c in (*self.categories, self.default)]


def categories_from_dict(data: Mapping[str, Any]) -> CategoryConfig:
    """Build from ``{"categories": [{name, threshold, ttl_s, max_entries, examples}], "default":
    {...}, "min_similarity": x}``; ValueError naming the bad field (``categories[2].threshold``)."""
    unknown = sorted(set(data) - {"categories", "default", "min_similarity"})
    if unknown:
        raise ValueError(f"unknown fields {', '.join(map(str, unknown))}")
    items = data.get("categories")
    if not isinstance(items, list) or not items:
        raise ValueError("categories must be a non-empty list")
    categories = tuple(_category(item, f"categories[{i}]") for i, item in enumerate(items))
    default = _category({"name": "default", **_mapping(data.get("default"), "default")}, "default")
    names = [c.name for c in (*categories, default)]
    for i, name in enumerate(names):
        if name in names[:i]:
            where = f"categories[{i}]" if i < len(categories) else "default"
            raise ValueError(f"{where}.name: {name!r} is used twice")
    min_similarity = data.get("min_similarity", CategoryConfig.min_similarity)
    if not _is_number(min_similarity) or not -1 <= min_similarity <= 1:
        raise ValueError("min_similarity must be a number in [-1, 1]")
    return CategoryConfig(categories, default, float(min_similarity))


def load_categories(path: str | os.PathLike | None = None) -> CategoryConfig:
    """The categories in a YAML/JSON file; ``None``: the shipped ``shoal/gateway/categories.yaml``."""
    if path is None:
        import yaml

        return categories_from_dict(yaml.safe_load(resources.files(__package__).joinpath("categories.yaml").read_text()))
    try:
        return categories_from_dict(read_mapping(path))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


class CategoryClassifier:
    """Assigns a query vector to the category whose examples' mean embedding is most similar, or to
    the default category when no centroid reaches ``config.min_similarity``."""

    def __init__(self, config: CategoryConfig, embed: Callable[[list[str]], np.ndarray]) -> None:
        self._config = config
        self._categories = [c for c in config.categories if c.examples]
        centroids = [embed(list(c.examples)).mean(axis=0) for c in self._categories]
        self._centroids = np.stack([c / np.linalg.norm(c) for c in centroids]).astype(np.float32) if centroids else None

    def classify(self, vector: np.ndarray) -> Category:
        if self._centroids is None:
            return self._config.default
        scores = self._centroids @ np.asarray(vector, dtype=np.float32)
        best = int(np.argmax(scores))
        return self._categories[best] if scores[best] >= self._config.min_similarity else self._config.default


@dataclass(frozen=True)
class CacheHit:
    """A cached answer (a private copy); ``category`` is the stored entry's."""

    value: dict
    similarity: float
    exact: bool
    category: Category


@dataclass
class CacheStats:
    lookups: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    evictions: int = 0  # removed by a quota
    expired: int = 0  # removed past their TTL
    entries: int = 0


@dataclass(slots=True)
class _Entry:
    id: int
    tenant: str
    scope: str
    key: str
    category: Category
    value: dict
    vector: np.ndarray | None  # the unit vector, float32 (the index holds an int8 copy)
    expires_at: float


class SemanticCache:
    """Answers keyed by ``(tenant, scope, key)`` and, for semantic hits, by a unit vector of
    ``embedder_dim`` values searched among the entries of the same tenant and scope only.

    A semantic hit needs a similarity of at least the thresholds of both the query's category and
    the stored entry's. Quotas count entries per (tenant, category). Thread-safe (one lock).

    The index (usearch HNSW, one per tenant and scope) holds int8 copies of the vectors to find
    candidates fast; their similarities are then computed exactly from the float32 vectors, so the
    thresholds apply to true cosine similarities.
    """

    def __init__(self, embedder_dim: int, categories: Sequence[Category], default_category: Category,
                 clock: Callable[[], float] = time.monotonic, *, search_k: int = 8) -> None:
        self._dim = embedder_dim
        self._known = {c.name for c in (*categories, default_category)}
        self._clock = clock
        self._search_k = search_k
        self._lock = threading.Lock()
        self._next_id = 0
        self._entries: dict[int, _Entry] = {}
        self._exact: dict[tuple[str, str, str], _Entry] = {}
        self._indexes: dict[tuple[str, str], Index] = {}
        self._queues: dict[tuple[str, str], OrderedDict[int, None]] = {}  # (tenant, category): oldest first
        self._stats = CacheStats()

    def lookup(self, tenant: str, scope: str, key: str, vector: np.ndarray | None,
               category: Category) -> CacheHit | None:
        """The exact entry for ``key``, else the most similar entry that passes the thresholds, else
        None. ``vector`` None: the exact layer only. Expired entries met on the way are removed."""
        self._check(category)
        q = None if vector is None else self._unit(vector)
        with self._lock:
            now = self._clock()
            self._stats.lookups += 1
            if (hit := self._exact_hit(tenant, scope, key, now)) is not None:
                return hit
            for entry, similarity in self._search(tenant, scope, q, now):
                if similarity >= max(category.threshold, entry.category.threshold):
                    self._stats.semantic_hits += 1
                    return CacheHit(copy.deepcopy(entry.value), similarity, False, entry.category)
            self._stats.misses += 1
            return None

    def exact(self, tenant: str, scope: str, key: str) -> CacheHit | None:
        """The live entry stored for exactly ``key`` (a lookup that needs no embedding); a miss here
        is not counted: the caller goes on to :meth:`lookup`."""
        with self._lock:
            now = self._clock()
            entry = self._exact.get((tenant, scope, key))
            if entry is None or entry.expires_at <= now:
                return None
            self._stats.lookups += 1
            return self._exact_hit(tenant, scope, key, now)

    def _exact_hit(self, tenant: str, scope: str, key: str, now: float) -> CacheHit | None:
        entry = self._exact.get((tenant, scope, key))
        if entry is not None and entry.expires_at <= now:
            self._expire(entry)
        elif entry is not None:
            self._stats.exact_hits += 1
            return CacheHit(copy.deepcopy(entry.value), 1.0, True, entry.category)
        return None

    def nearest(self, tenant: str, scope: str, vector: np.ndarray, k: int, min_similarity: float) -> list[CacheHit]:
        """Up to ``k`` live entries of the tenant and scope at least ``min_similarity`` similar to
        ``vector``, most similar first (e.g. in-context examples); not counted as lookups."""
        q = self._unit(vector)
        with self._lock:
            found = self._search(tenant, scope, q, self._clock(), max(k, self._search_k))
            return [CacheHit(copy.deepcopy(e.value), s, False, e.category) for e, s in found if s >= min_similarity][:k]

    def store(self, tenant: str, scope: str, key: str, vector: np.ndarray | None, category: Category,
              value: dict) -> None:
        """Keep a copy of ``value`` for ``key`` (replacing the key's entry) and, with a vector, in the
        index. Drops the tenant's expired entries of ``category``, then its oldest past the quota."""
        self._check(category)
        v = None if vector is None else self._unit(vector)
        value = copy.deepcopy(value)
        with self._lock:
            now = self._clock()
            old = self._exact.get((tenant, scope, key))
            if old is not None:
                self._remove(old)
            queue = self._queues.get((tenant, category.name), OrderedDict())
            while queue and self._entries[next(iter(queue))].expires_at <= now:
                self._expire(self._entries[next(iter(queue))])
            while len(queue) >= category.max_entries:
                self._remove(self._entries[next(iter(queue))])
                self._stats.evictions += 1
            entry = _Entry(self._next_id, tenant, scope, key, category, value, v, now + category.ttl_s)
            self._next_id += 1
            self._entries[entry.id] = entry
            self._exact[(tenant, scope, key)] = entry
            self._queues.setdefault((tenant, category.name), OrderedDict())[entry.id] = None
            if v is not None:
                index = self._indexes.get((tenant, scope))
                if index is None:
                    index = self._indexes[(tenant, scope)] = Index(ndim=self._dim, metric="ip", dtype="i8")
                index.add(entry.id, v)

    def purge_expired(self) -> int:
        """Remove every expired entry (a periodic sweep); returns how many."""
        with self._lock:
            now = self._clock()
            dead = [e for e in self._entries.values() if e.expires_at <= now]
            for e in dead:
                self._expire(e)
            return len(dead)

    def stats(self) -> CacheStats:
        with self._lock:
            return replace(self._stats, entries=len(self._entries))

    def _search(self, tenant: str, scope: str, q: np.ndarray | None, now: float,
                k: int | None = None) -> list[tuple[_Entry, float]]:
        """Live entries near ``q`` with their similarities, most similar first."""
        index = self._indexes.get((tenant, scope))
        if q is None or index is None:
            return []
        found = []
        for key in index.search(q, k or self._search_k).keys.tolist():
            entry = self._entries[key]
            if entry.expires_at <= now:
                self._expire(entry)
            else:
                found.append((entry, float(entry.vector @ q)))
        return sorted(found, key=lambda pair: -pair[1])

    def _expire(self, entry: _Entry) -> None:
        self._remove(entry)
        self._stats.expired += 1

    def _remove(self, entry: _Entry) -> None:
        del self._entries[entry.id]
        if self._exact.get((entry.tenant, entry.scope, entry.key)) is entry:
            del self._exact[(entry.tenant, entry.scope, entry.key)]
        queue = self._queues[(entry.tenant, entry.category.name)]
        del queue[entry.id]
        if not queue:
            del self._queues[(entry.tenant, entry.category.name)]
        if entry.vector is not None:
            index = self._indexes[(entry.tenant, entry.scope)]
            index.remove(entry.id)
            if len(index) == 0:
                del self._indexes[(entry.tenant, entry.scope)]

    def _check(self, category: Category) -> None:
        if category.name not in self._known:
            raise ValueError(f"unknown cache category {category.name!r}")

    def _unit(self, vector: np.ndarray) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        if v.shape != (self._dim,) or not math.isfinite(norm) or norm == 0:
            raise ValueError(f"a cache vector must be {self._dim} finite values, not all zero")
        return v / norm


def _category(item: Any, where: str) -> Category:
    item = _mapping(item, where)
    known = {f.name for f in fields(Category)}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {', '.join(map(str, unknown))}")
    missing = [name for name in ("name", "threshold", "ttl_s", "max_entries") if name not in item]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    examples = item.get("examples", [])
    if not isinstance(examples, list):
        raise ValueError(f"{where}.examples must be a list of strings")
    try:
        return Category(**{**item, "examples": tuple(examples)})
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
