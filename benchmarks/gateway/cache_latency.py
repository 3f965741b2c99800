"""Semantic cache lookup latency on a miss at 100k cached entries: 100,000 random unit vectors
(dim 384) stored through SemanticCache.store for one tenant and scope, then 1,000 lookups of fresh
random vectors and keys (all miss: the exact layer, then the usearch search and the threshold
checks), each timed with time.perf_counter after 50 untimed ones. For context, the same for exact
hits and semantic hits, the store rate, and the embedder's time for one short query (the caller
embeds before it looks up; not part of the lookup).

    python benchmarks/gateway/cache_latency.py            # writes benchmarks/gateway/cache_latency.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from shoal.gateway.embedder import Embedder
from shoal.gateway.semantic_cache import Category, SemanticCache, load_categories

HERE = Path(__file__).parent
ENTRIES, LOOKUPS, WARMUP, DIM = 100_000, 1_000, 50, 384


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def timed(fn, n: int) -> dict:
    """p50/p99/mean/max milliseconds of ``fn(i)`` over ``n`` calls after WARMUP untimed ones."""
    for i in range(WARMUP):
        fn(i)
    ms = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        ms.append((time.perf_counter() - t0) * 1e3)
    a = np.array(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4), "max_ms": round(float(a.max()), 4), "n": n}


def main() -> None:
    rng = np.random.default_rng(0)
    shipped = load_categories()
    lowest = min(shipped.categories, key=lambda c: c.threshold)  # the most lenient: the hardest miss
    category = Category("bench", lowest.threshold, ttl_s=1e9, max_entries=ENTRIES)
    cache = SemanticCache(DIM, [category], shipped.default)
    stored = unit(rng, ENTRIES)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    for i, v in enumerate(stored):
        cache.store("tenant", "pool", f"stored-{i}", v, category, {"choices": [{"text": f"answer {i}"}]})
    store_s = time.perf_counter() - t0
    grown = rss_mb() - rss0

    queries = unit(rng, LOOKUPS + WARMUP)
    hits: list[bool] = []
    miss = timed(lambda i: hits.append(cache.lookup("tenant", "pool", f"query-{i}", queries[i], category) is not None),
                 LOOKUPS)
    exact = timed(lambda i: cache.lookup("tenant", "pool", f"stored-{i}", stored[i], category), LOOKUPS)
    near = stored[:LOOKUPS + WARMUP] + 0.01 * unit(rng, LOOKUPS + WARMUP)
    semantic = timed(lambda i: cache.lookup("tenant", "pool", f"near-{i}", near[i], category), LOOKUPS)
    embedder = Embedder()
    embed = timed(lambda i: embedder.embed([f"What is the capital of country number {i}?"]), 200)

    result = {
        "command": "python benchmarks/gateway/cache_latency.py",
        "machine": f"{os.cpu_count()} CPUs (shared: other processes may have been running)",
        "entries": ENTRIES, "dim": DIM, "index": "usearch HNSW, int8, inner product (defaults: connectivity 16, "
                                                 "expansion_search 64), k=8, exact float32 rescoring",
        "threshold": category.threshold,
        "store": {"seconds": round(store_s, 2), "per_second": round(ENTRIES / store_s), "rss_growth_mb": round(grown)},
        "lookup_miss": {**miss, "hits": int(sum(hits[WARMUP:]))},
        "lookup_exact_hit": exact,
        "lookup_semantic_hit": semantic,
        "embed_one_query": embed,
        "stats": vars(cache.stats()),
    }
    (HERE / "cache_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
