"""Build the gateway of ``shoal serve``: its config (``--gateway FILE`` or the served model alone),
the embedding model, the semantic cache with its categories, IC-Cache's examples, and the pools
other than the served model (upstreams, and other local models with their own engines)."""

from __future__ import annotations

import logging

from shoal.gateway.config import GatewayConfig
from shoal.gateway.layer import Gateway
from shoal.gateway.pools import LocalPool, Pool, UpstreamPool

log = logging.getLogger(__name__)


def build_gateway(config: GatewayConfig, embedding_model: str | None = None, device: str = "auto",
                  dtype: str = "auto") -> Gateway:
    """The gateway of ``config``. ``embedding_model``: a folder, ``"none"``, or None for the packaged
    all-MiniLM-L6-v2 (without that package: no embeddings and no cache, with a warning).
    ModelLoadError for a model that does not load; ValueError for bad categories."""
    from shoal.model.loader import ModelLoadError

    embedder = cache = classifier = examples = None
    if embedding_model != "none":
        from shoal.gateway.embedder import Embedder

        try:
            embedder = Embedder(embedding_model)
        except ModelLoadError as exc:
            if embedding_model is not None:
                raise
            log.warning("no embeddings and no semantic cache: %s", exc)
    if embedder is not None:
        from shoal.gateway.ic_cache import ExampleStore
        from shoal.gateway.semantic_cache import CategoryClassifier, SemanticCache, load_categories

        categories = load_categories(config.cache.categories)
        cache = SemanticCache(embedder.dim, categories.categories, categories.default)
        classifier = CategoryClassifier(categories, embedder.embed)
        examples = ExampleStore(embedder) if any(r.ic_examples for r in config.routers) else None
    pools: dict[str, Pool] = {}
    sub_apps = []
    for p in config.pools:
        if p.url:
            pools[p.name] = UpstreamPool(p)
        elif p.model:
            app = _local_app(p.name, p.model, p.max_num_seqs, device, dtype)
            pools[p.name] = LocalPool(p, app, model_id=p.name)
            sub_apps.append(app)
    return Gateway(config, pools, embedder=embedder, cache=cache, classifier=classifier, examples=examples,
                   sub_apps=sub_apps)


def _local_app(name: str, model: str, max_num_seqs: int, device: str, dtype: str):
    """Another model in this process: its own engine (in a thread) and OpenAI app."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.engine import Engine
    from shoal.server.api import create_app
    from shoal.server.async_engine import AsyncEngine

    engine = Engine(EngineConfig(model=model, max_num_seqs=max_num_seqs, device=device, dtype=dtype))
    return create_app(AsyncEngine(engine), name)
