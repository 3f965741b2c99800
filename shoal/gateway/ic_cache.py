"""IC-Cache: answers of the large pool kept as in-context examples; a request the router sends to
the small pool gets the most similar past (query, answer) pairs of its tenant as earlier turns."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from shoal.gateway.embedder import Embedder
from shoal.gateway.semantic_cache import Category, SemanticCache

EXAMPLES = Category("ic_examples", threshold=1.0, ttl_s=24 * 3600.0, max_entries=10_000)
_SCOPE = "ic-examples"


class ExampleStore:
    """Per-tenant (query, large answer) pairs searched by the query's embedding."""

    def __init__(self, embedder: Embedder, max_chars: int = 2000, clock: Callable[[], float] = time.monotonic) -> None:
        self.embedder, self.max_chars = embedder, max_chars
        self.cache = SemanticCache(embedder.dim, [EXAMPLES], EXAMPLES, clock=clock)

    def add(self, tenant: str, query: str | None, answer: str) -> None:
        """Keep a pair (once per query; an answer longer than ``max_chars`` is not a useful example)."""
        if not query or not answer or len(query) + len(answer) > self.max_chars:
            return
        vector = self.embedder.embed([query])[0]
        key = hashlib.sha256(query.encode()).hexdigest()
        self.cache.store(tenant, _SCOPE, key, vector, EXAMPLES, {"query": query, "answer": answer})

    def nearest(self, tenant: str, query: str, k: int, min_similarity: float) -> list[tuple[str, str]]:
        """Up to ``k`` pairs at least ``min_similarity`` similar to ``query``, least similar first
        (the closest example sits next to the question)."""
        vector = self.embedder.embed([query])[0]
        hits = self.cache.nearest(tenant, _SCOPE, vector, k, min_similarity)
        return [(h.value["query"], h.value["answer"]) for h in reversed(hits) if h.value["query"] != query]
