"""The gateway simulator's tests: a deterministic embedder (texts mapped to chosen vectors), small
categories and a gateway config, and a replay of a simulated run through the real HTTP layer
(``GatewayLayer``) in the simulator's event order, with pools that answer when told to."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry

from shoal.bench.gateway_trace import GatewayQuery
from shoal.engine.cost_model import LinearCostModel, default_profile_path
from shoal.gateway.config import GatewayConfig
from shoal.gateway.layer import Gateway, GatewayLayer
from shoal.gateway.pools import Pool, Reply
from shoal.gateway.semantic_cache import CategoryClassifier, SemanticCache, categories_from_dict
from shoal.sim.experiment import SimSetup
from shoal.sim.gateway import GatewaySim, Outcome, draw_small_ok, pool_timings, request_body
from shoal.sim.simulator import VirtualClock

DIM = 16
QUERY = contextvars.ContextVar("query")  # the trace index of the request a replayed task carries
CATEGORY_FILE = {
    "categories": [
        {"name": "factual", "threshold": 0.95, "ttl_s": 3600, "max_entries": 100, "examples": ["F"]},
        {"name": "coding", "threshold": 0.95, "ttl_s": 3600, "max_entries": 100, "examples": ["C"]},
    ],
    "default": {"threshold": 0.99, "ttl_s": 3600, "max_entries": 100},
    "min_similarity": 0.5,
}
CATEGORIES = categories_from_dict(CATEGORY_FILE)
CONFIG = {
    "pools": [{"local": True, "prompt_cost": 1.0, "completion_cost": 2.0},
              {"name": "big", "url": "http://big.invalid/v1", "prompt_cost": 10.0, "completion_cost": 30.0}],
    "routers": [{"name": "auto", "small": "m", "large": "big", "escalate_categories": ["coding"]}],
}


def config(**changes) -> GatewayConfig:
    return GatewayConfig.from_dict({**CONFIG, **changes}, "m")


def unit(*weights: tuple[int, float]) -> np.ndarray:
    """A unit vector with these (axis, weight) components."""
    v = np.zeros(DIM, dtype=np.float32)
    for axis, w in weights:
        v[axis] += w
    return v / np.linalg.norm(v)


# texts of the tests: three factual topics, a paraphrase of the first, a coding question
TEXTS = {
    "capital of France?": unit((0, 1.0), (4, 0.4)),
    "France's capital?": unit((0, 1.0), (4, 0.4), (9, 0.05)),
    "capital of Peru?": unit((0, 1.0), (5, 0.4)),
    "capital of Chile?": unit((0, 1.0), (7, 0.4)),
    "reverse a list?": unit((1, 1.0), (6, 0.4)),
}


class FakeEmbedder:
    """Each text's vector from a table: ``F`` and ``C`` are the categories' examples (axes 0 and 1);
    a query names its category's axis and a topic axis, a paraphrase leans slightly off it. Other
    texts get a random vector seeded by the text."""

    dim, model_id, max_tokens = DIM, "fake", 256

    def __init__(self, table: dict[str, np.ndarray] | None = None) -> None:
        self.table = {"F": unit((0, 1.0)), "C": unit((1, 1.0)), **(table or TEXTS)}

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] if t in self.table else _random_unit(t) for t in texts])


def _random_unit(text: str) -> np.ndarray:
    v = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def q(t: float, text: str, tenant: str | None = None, small_ok: bool | None = True, out: int = 20) -> GatewayQuery:
    return GatewayQuery(t, text, 30, out, tenant=tenant, small_ok=small_ok)


def base_setup() -> SimSetup:
    return SimSetup(cost_model=LinearCostModel.load(default_profile_path()), speeds=[1.0], dispatch="round_robin")


def run(queries: list[GatewayQuery], target: str = "m", gateway: GatewayConfig | None = None,
        lookup_s: float = 0.01) -> GatewaySim:
    """Simulate ``queries`` (texts from :data:`TEXTS`) through the test gateway, ``big`` 4x slower."""
    gateway = gateway or config()
    embedder = FakeEmbedder()
    vectors = embedder.embed([x.query for x in queries])
    classifier = CategoryClassifier(CATEGORIES, embedder.embed)
    pools = pool_timings(gateway, base_setup(), {"big": 0.25}, {})
    small_ok = draw_small_ok(queries, [classifier.classify(v).name for v in vectors], 1.0, {}, seed=0)
    sim = GatewaySim(gateway, queries, vectors, classifier, CATEGORIES, pools, target, small_ok, lookup_s)
    sim.run()
    return sim


# ---- the real HTTP layer, replayed in the simulator's order ---------------------------------------

@dataclass
class Served:
    """What the server did with one query: its cache lookup's result (exact, semantic, miss; None:
    no lookup), its route and the pool that answered (headers; None for a hit)."""

    cache: str | None
    route: str | None
    pool: str | None


class RecordingCache(SemanticCache):
    """The semantic cache, noting each replayed query's lookup result."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.results: dict[int, str] = {}

    def exact(self, *args, **kw):
        hit = super().exact(*args, **kw)
        if hit is not None:
            self.results[QUERY.get()] = "exact"
        return hit

    def lookup(self, *args, **kw):
        hit = super().lookup(*args, **kw)
        self.results[QUERY.get()] = "miss" if hit is None else "exact" if hit.exact else "semantic"
        return hit


class ScriptedPool(Pool):
    """Answers a request when the replay releases it; the small pool refuses where ``small_ok`` is false."""

    def __init__(self, config, replay: "LayerReplay") -> None:
        super().__init__(config)
        self.replay = replay

    @property
    def model_id(self) -> str | None:
        return self.name

    async def complete(self, path: str, body: dict, scope: dict, receive) -> Reply:
        i = QUERY.get()
        done = asyncio.get_running_loop().create_future()
        self.replay.waiting[(i, self.name)] = done
        self.replay.arrived.set()
        await done
        ok = self.name != self.replay.small or self.replay.small_ok[i]
        usage = {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}
        data = {"id": "x", "object": "chat.completion", "created": 0, "model": self.name, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine" if ok else "I can't."},
                             "finish_reason": "stop"}]}
        return Reply(200, [(b"content-type", b"application/json")], json.dumps(data).encode())


class LayerReplay:
    """Send each query of a simulated run to the real layer when the simulator decided it, and let
    each pool answer when the simulator completed its request; the cache's clock follows."""

    def __init__(self, sim: GatewaySim, gateway: GatewayConfig, embedder: FakeEmbedder) -> None:
        self.sim, self.small_ok = sim, sim.small_ok
        self.small = sim.router.small if sim.router else None
        self.clock = VirtualClock()
        self.cache = cache = RecordingCache(DIM, CATEGORIES.categories, CATEGORIES.default, clock=self.clock)
        pools = {p.name: ScriptedPool(p, self) for p in gateway.pools}
        g = Gateway(gateway, {n: p for n, p in pools.items() if n != gateway.default_pool.name}, embedder=embedder,
                    cache=cache, classifier=CategoryClassifier(CATEGORIES, embedder.embed))
        g.attach(CollectorRegistry())
        self.metrics = g.metrics
        self.layer = GatewayLayer(None, g)
        self.layer.pools[gateway.default_pool.name] = pools[gateway.default_pool.name]
        self.waiting: dict[tuple[int, str], asyncio.Future] = {}
        self.arrived = asyncio.Event()

    async def run(self) -> list[Served]:
        """Every query through the layer; what it answered, in trace order."""
        events = []  # (time, kind, query, pool): 0 = a pool completes, 1 = the query reaches the gateway
        for i, (query, out) in enumerate(zip(self.sim.queries, self.sim.outcomes)):
            decided = query.arrival_s + (self.sim.lookup_s if self.sim._embeds(i) else 0.0)
            events.append((decided, 1, i, ""))
            events += [(s.record.end_s, 0, i, s.pool) for s in out.sent]
        tasks: dict[int, asyncio.Task] = {}
        for t, kind, i, pool in sorted(events):
            self.clock.t = t
            if kind == 1:
                body = {**request_body(self.sim.queries[i], self.sim.target), "semantic_cache": True}
                tasks[i] = asyncio.create_task(self._post(i, body))
            else:
                self.waiting.pop((i, pool)).set_result(None)
            await self._settle(tasks[i])
        served = [await tasks[i] for i in range(len(self.sim.queries))]
        for i, s in enumerate(served):
            s.cache = self.cache.results.get(i)
        return served

    async def _settle(self, task: asyncio.Task) -> None:
        """Until the request waits on a pool or has been answered."""
        self.arrived.clear()
        await asyncio.wait([task, asyncio.ensure_future(self.arrived.wait())], return_when=asyncio.FIRST_COMPLETED)

    async def _post(self, i: int, body: dict) -> Served:
        QUERY.set(i)
        raw = json.dumps(body).encode()
        sent = [{"type": "http.request", "body": raw, "more_body": False}]
        headers: dict[str, str] = {}

        async def receive():
            return sent.pop() if sent else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                headers.update({k.decode(): v.decode() for k, v in message["headers"]})

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "state": {}}
        await self.layer(scope, receive, send)
        return Served(None, headers.get("x-shoal-route"), headers.get("x-shoal-pool"))


def simulated(out: Outcome) -> Served:
    """The same, as the simulator decided."""
    hit = out.route == "cache"
    return Served(out.cache if out.cache in ("exact", "semantic", "miss") else None, None if hit else out.route,
                  None if hit else out.pool)

