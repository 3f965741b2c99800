"""The gateway's Prometheus series (routes, escalations, cost, cache, embeddings), in the server's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.routes = Counter("shoal:gateway_requests", "Completions by the name asked for, the pool that "
                              "answered and how (direct, small, escalated, upfront, cache).",
                              ["model", "pool", "route"], registry=r)
        self.escalations = Counter("shoal:gateway_escalations", "Router escalations to the large pool, by reason.",
                                   ["router", "reason"], registry=r)
        self.cost = Counter("shoal:gateway_cost", "Price of the tokens each pool served (the config's price "
                            "per million tokens).", ["pool"], registry=r)
        self.tokens = Counter("shoal:gateway_tokens", "Tokens each pool served.", ["pool", "kind"], registry=r)
        self.saved_cost = Counter("shoal:gateway_saved_cost", "Price of the answers the semantic cache gave "
                                  "instead of a pool.", ["pool"], registry=r)
        self.cache_lookups = Counter("shoal:semantic_cache_lookups", "Semantic cache lookups by result "
                                     "(exact, semantic, miss) and requests that bypassed it.", ["result"], registry=r)
        self.cache_entries = Gauge("shoal:semantic_cache_entries", "Answers the semantic cache holds.", registry=r)
        self.ic_examples = Counter("shoal:ic_cache_examples", "Large-pool answers prepended to small-pool "
                                   "requests as examples (IC-Cache).", registry=r)
        self.embedding_inputs = Counter("shoal:embedding_inputs", "Texts embedded for /v1/embeddings.", registry=r)
        self.embedding_tokens = Counter("shoal:embedding_tokens", "Tokens embedded for /v1/embeddings.", registry=r)
        for result in ("exact", "semantic", "miss", "bypass"):
            self.cache_lookups.labels(result=result)
