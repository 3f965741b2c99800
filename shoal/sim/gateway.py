"""The gateway in the simulator (``shoal sim --gateway CONFIG --workload gateway:PATH``): model pools,
the small-first router, the semantic cache and IC-Cache, deciding with the server's own code on a
virtual clock, so a routing or cache policy can be tried on a trace before it serves.

Every decision is the server's: the request a query stands for is looked up, keyed and kept by
``shoal/gateway/decisions.py``, classified by the real :class:`CategoryClassifier` on the real
embeddings (all computed once, up front), looked up in and stored into a real
:class:`SemanticCache` (and IC-Cache's :class:`ExampleStore`) whose clock is the simulator's, and
routed by ``router.upfront``. What the server would learn from the small pool's answer (does it
pass the router's checks?) comes from the trace's ``small_ok``, or is drawn from a pass rate.

Time: one event loop, in time order, over the gateway's own events (a query reaching the gateway
after its lookup cost, a pool's answer completing) and every local pool's simulated cluster,
stepped event by event. Time order (not a two-pass or iterative scheme) because each decision
depends on the ones before it: a cached answer exists only once its request has completed, which
depends on every pool's load, which depends on what earlier lookups hit; an escalated request
reaches the large pool when its small request completes. A pool fast-forwards no further than the
next gateway event or the next event of any other pool (a later arrival there may only come from
those), so the clusters run exactly as if each had known its arrivals in advance.

Pools: a local pool (``local: true``, or ``model:``) is a simulated cluster (:class:`SimSetup`:
the real engine scheduler and dispatch on the cost model at the pool's speed); an upstream
(``url:``) runs each request alone on the cost model at its speed (prompt in chunks of the token
budget, then one decode step a token): a hosted API does not make one wait for another. Each pool's
speed is a factor on the cost model (0.25: every step takes 4x as long), which stands for a bigger
model or other hardware. Prices are the config's, per million prompt / completion tokens.

Latency as the client sees it: a query the gateway embeds (a cache lookup, or a router's category)
reaches a pool, or is answered from the cache, ``lookup_s`` after it arrives; a hit costs nothing
and streams at once. A direct or up-front answer streams as the pool produces it; the small pool's
answer is only sent once whole and checked (its first token is its last); an escalated answer
streams from the large pool, which it reaches when the small request completes.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shoal.bench import report
from shoal.bench.gateway_trace import GatewayQuery
from shoal.bench.report import RequestRecord
from shoal.bench.workloads import RequestSpec, Workload
from shoal.engine.cost_model import CostModel, ScaledCostModel, step_features
from shoal.engine.metadata import SLO
from shoal.gateway import decisions
from shoal.gateway import router as routing
from shoal.gateway.answers import Answer
from shoal.gateway.config import GatewayConfig, PoolConfig, RouterConfig
from shoal.gateway.ic_cache import ExampleStore
from shoal.gateway.semantic_cache import Category, CategoryClassifier, CategoryConfig, SemanticCache
from shoal.sim.experiment import SimSetup
from shoal.sim.simulator import Cluster, VirtualClock

# embedding a short query (all-MiniLM-L6-v2) and searching the cache: 11.5 + 0.5 ms p50 on a 2-core CPU
# (benchmarks/gateway/cache_latency.json)
LOOKUP_MS = 12.0
CHARS_PER_TOKEN = 4  # IC-Cache examples: text length <-> tokens (an example is text; the trace has tokens)


def request_body(query: GatewayQuery, target: str) -> dict:
    """The chat request a trace query stands for, as the layer sees it once it has taken the opt-in
    field off (every query opts in to the cache): greedy, sent by its tenant as ``user``."""
    body: dict[str, Any] = {"model": target, "messages": [{"role": "user", "content": query.query}], "temperature": 0}
    if query.tenant is not None:
        body["user"] = query.tenant
    return body


@dataclass(frozen=True)
class Upstream:
    """An upstream pool's timing: each request alone on ``cost_model`` (already at the pool's speed)."""

    cost_model: CostModel
    max_num_batched_tokens: int = 512

    def token_times(self, prompt_len: int, output_len: int) -> list[float]:
        """Seconds from arrival to each output token."""
        t, start = 0.0, 0
        while start < prompt_len:
            n = min(self.max_num_batched_tokens, prompt_len - start)
            last = start + n == prompt_len
            t += self.cost_model.time(step_features(tokens=n, prefill_attention=n * (start + n),
                                                    sampled=int(last), prefill_chunks=1))
            start += n
        times = [t]
        for j in range(1, output_len):
            t += self.cost_model.time(step_features(tokens=1, decodes=1, decode_context=prompt_len + j, sampled=1))
            times.append(t)
        return times


@dataclass
class Sent:
    """One request the gateway sent a pool for a query."""

    pool: str
    route: str  # direct | small | escalated | upfront
    arrival_s: float
    prompt_tokens: int
    record: RequestRecord | None = None  # the pool's, once it ended


@dataclass
class Outcome:
    """What the gateway did with one query: the decisions tests compare with the server's."""

    category: str | None = None  # the classifier's, when the query was embedded
    cache: str = "off"  # off (not for this target) | bypass | exact | semantic | miss
    route: str = ""  # cache | direct | small | escalated | upfront
    pool: str | None = None  # whose answer the client got (a hit: the pool that produced it)
    sent: list[Sent] = field(default_factory=list)
    saved: float = 0.0  # a hit: what its answer cost when it was made
    ic_examples: int = 0


@dataclass
class _Pending:
    """A miss: where its answer is kept once complete."""

    tenant: str
    scope: str
    key: str
    vector: np.ndarray
    category: Category


class _Vectors:
    """IC-Cache's embedder: the trace's texts, embedded up front."""

    def __init__(self, table: dict[str, np.ndarray], dim: int) -> None:
        self.table, self.dim = table, dim

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])


class GatewaySim:
    """One run of a trace through the gateway ``config`` asked for ``target`` (a pool or router).
    ``vectors``: the queries' embeddings (row i: query i), which ``classifier`` classifies; ``pools``: each pool's timing (a :class:`SimSetup` for local pools, an :class:`Upstream`);
    ``small_ok``: whether each query's small answer passes the router's checks."""

    def __init__(self, config: GatewayConfig, queries: Sequence[GatewayQuery], vectors: np.ndarray,
                 classifier: CategoryClassifier, categories: CategoryConfig, pools: dict[str, SimSetup | Upstream],
                 target: str, small_ok: Sequence[bool], lookup_s: float = LOOKUP_MS / 1e3) -> None:
        self.config, self.queries, self.vectors, self.target = config, list(queries), vectors, target
        self.classifier, self.small_ok, self.lookup_s = classifier, list(small_ok), lookup_s
        self.pool_configs: dict[str, PoolConfig] = {p.name: p for p in config.pools}
        check_target(config, target)
        self.router: RouterConfig | None = next((r for r in config.routers if r.name == target), None)
        self.bodies = [request_body(q, target) for q in self.queries]
        self.tenants = [decisions.tenant(None, body) for body in self.bodies]  # no API keys: the ``user``
        self.clock = VirtualClock()
        dim = int(vectors.shape[1])
        self.cache = SemanticCache(dim, categories.categories, categories.default, clock=self.clock)
        self.examples: ExampleStore | None = None
        if self.router is not None and self.router.ic_examples > 0:
            table = {q.query: v for q, v in zip(self.queries, vectors)}
            self.examples = ExampleStore(_Vectors(table, dim), clock=self.clock)  # type: ignore[arg-type]
        self.pools = pools
        self.upstreams = {n: p for n, p in pools.items() if isinstance(p, Upstream)}
        self.clusters: dict[str, Cluster] = {}
        for name, setup in pools.items():
            if isinstance(setup, SimSetup):
                cluster = setup.cluster(Workload("gateway", [], {}))
                cluster.on_end = lambda rid, rec, name=name: self._ended(name, rid, rec)
                cluster.horizon = lambda name=name: self._horizon(name)
                self.clusters[name] = cluster
        self.inflight: dict[tuple[str, str], tuple[int, Sent]] = {}
        self.events: list[tuple[float, int, int, Callable[[float, Any], None], Any]] = []
        self.order = 0
        self.records = [RequestRecord(q.arrival_s, q.prompt_tokens, q.output_tokens, start_s=q.arrival_s,
                                      tenant=q.tenant) for q in self.queries]
        self.outcomes = [Outcome() for _ in self.queries]
        self.pending: dict[int, _Pending] = {}
        for i, q in enumerate(self.queries):
            self._at(q.arrival_s + (self.lookup_s if self._embeds(i) else 0.0), self._decide, i, kind=1)

    # ---- the event loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Run every query to its end."""
        while True:
            t_gateway = self.events[0][0] if self.events else float("inf")
            name, t_pool = min(((n, c.next_time()) for n, c in self.clusters.items()), key=lambda x: x[1],
                               default=("", float("inf")))
            if t_gateway == float("inf") and t_pool == float("inf"):
                return
            if t_gateway <= t_pool:
                t, _, _, handler, arg = heapq.heappop(self.events)
                self.clock.t = t
                handler(t, arg)
            else:
                self.clusters[name].advance()

    def _at(self, t: float, handler: Callable[[float, Any], None], arg: Any, kind: int = 0) -> None:
        """A gateway event; at equal times completions (kind 0) come before queries (kind 1)."""
        self.order += 1
        heapq.heappush(self.events, (t, kind, self.order, handler, arg))

    def _horizon(self, pool: str) -> float:
        """No arrival can reach ``pool`` before the next gateway event or another pool's next event."""
        t = self.events[0][0] if self.events else float("inf")
        return min([t] + [c.next_time() for n, c in self.clusters.items() if n != pool])

    # ---- decisions ------------------------------------------------------------------------------

    def _embeds(self, i: int) -> bool:
        """Whether the gateway embeds query ``i`` (a cache lookup, or a router's category)."""
        return self._uses_cache(i) or self._wants_category(i)

    def _uses_cache(self, i: int) -> bool:
        return decisions.wants_cache(self.config, self.target, opted=True) \
            and not decisions.bypasses_cache(self.config, self.bodies[i], chat=True)

    def _wants_category(self, i: int) -> bool:
        """The layer classifies a router's query when the router escalates categories up front."""
        return self.router is not None and bool(self.router.escalate_categories) \
            and decisions.query_text(self.bodies[i], chat=True) is not None

    def _decide(self, now: float, i: int) -> None:
        """Query ``i`` after its lookup cost: answered from the cache, or sent to a pool."""
        out, body = self.outcomes[i], self.bodies[i]
        category = self.classifier.classify(self.vectors[i]) if self._embeds(i) else None
        out.category = category.name if category is not None else None
        if decisions.wants_cache(self.config, self.target, opted=True):
            out.cache = "bypass"
        if self._uses_cache(i):
            assert category is not None
            scope, key = decisions.cache_keys(body, True, self.target)
            tenant = self.tenants[i]
            hit = self.cache.lookup(tenant, scope, key, self.vectors[i], category)
            if hit is not None:
                answer, pool = decisions.cached_answer(hit.value)
                out.cache, out.route, out.pool = ("exact" if hit.exact else "semantic"), "cache", pool
                out.saved = self.pool_configs[pool].cost(*_usage(answer))
                rec = self.records[i]
                rec.first_token_s = rec.end_s = now
                rec.token_times_s = [now]
                rec.output_tokens = answer.usage["completion_tokens"]
                return
            out.cache = "miss"
            self.pending[i] = _Pending(tenant, scope, key, self.vectors[i], category)
        if self.router is None:
            self._send(i, self.target, "direct", now)
        elif routing.upfront(self.router, out.category if self._wants_category(i) else None):
            self._send(i, self.router.large, "upfront", now)
        else:
            self._send(i, self.router.small, "small", now, self._example_tokens(i))

    def _example_tokens(self, i: int) -> int:
        """IC-Cache: the tokens of the past large-pool answers the small request is given."""
        if self.examples is None or self.router is None:
            return 0
        found = self.examples.nearest(self.tenants[i], self.queries[i].query,
                                      self.router.ic_examples, self.router.ic_min_similarity)
        kept = decisions.fit_examples(found, self.router.ic_max_chars)
        self.outcomes[i].ic_examples = len(kept)
        return sum(len(a) + len(b) for a, b in kept) // CHARS_PER_TOKEN

    def _send(self, i: int, pool: str, route: str, now: float, extra_prompt: int = 0) -> None:
        q = self.queries[i]
        sent = Sent(pool, route, now, q.prompt_tokens + extra_prompt)
        self.outcomes[i].sent.append(sent)
        spec = RequestSpec(now, sent.prompt_tokens, q.output_tokens, tenant=q.tenant)
        if pool in self.upstreams:
            times = [now + t for t in self.upstreams[pool].token_times(spec.prompt_len, spec.output_len)]
            rec = RequestRecord(now, spec.prompt_len, spec.output_len, start_s=now, first_token_s=times[0],
                                end_s=times[-1], output_tokens=len(times), token_times_s=times, tenant=q.tenant)
            self._at(rec.end_s, self._complete, (i, sent, rec))
        else:
            rid, _ = self.clusters[pool].add_arrival(spec)
            self.inflight[(pool, rid)] = (i, sent)

    def _ended(self, pool: str, rid: str, rec: RequestRecord) -> None:
        """A local pool's request ended (its step started; it completes at ``rec.end_s``)."""
        i, sent = self.inflight.pop((pool, rid))
        self._at(rec.end_s if rec.end_s is not None else sent.arrival_s, self._complete, (i, sent, rec))

    def _complete(self, now: float, arg: tuple[int, Sent, RequestRecord]) -> None:
        """A pool's answer to query ``i`` is complete: check a small one, bill it, answer, keep it."""
        i, sent, rec = arg
        sent.record = rec
        out, client = self.outcomes[i], self.records[i]
        if sent.route == "small" and not (rec.ok and self.small_ok[i]):
            assert self.router is not None
            self._send(i, self.router.large, "escalated", now)
            return
        out.route, out.pool = sent.route, sent.pool
        if not rec.ok:
            client.error = rec.error or "failed"
            return
        if sent.route == "small":  # sent whole, once checked
            client.first_token_s, client.token_times_s = rec.end_s, [rec.end_s]
        else:
            client.first_token_s, client.token_times_s = rec.first_token_s, list(rec.token_times_s)
        client.end_s, client.output_tokens = rec.end_s, rec.output_tokens
        answer = Answer(True, "", "stop", {"prompt_tokens": sent.prompt_tokens, "completion_tokens": rec.output_tokens})
        p = self.pending.pop(i, None)
        if p is not None and decisions.storable(answer):
            self.cache.store(p.tenant, p.scope, p.key, p.vector, p.category, decisions.cache_value(answer, sent.pool))
        if self.examples is not None and sent.route in ("escalated", "upfront"):  # a stand-in text of its length
            self.examples.add(self.tenants[i], self.queries[i].query,
                              "x" * (rec.output_tokens * CHARS_PER_TOKEN))

    # ---- the result -----------------------------------------------------------------------------

    def summary(self) -> dict:
        """The result's ``gateway`` object: cache hits, routes, escalations, cost."""
        n = len(self.queries)
        looked = Counter(o.cache for o in self.outcomes)
        hits = looked["exact"] + looked["semantic"]
        routes = Counter(o.route for o in self.outcomes)
        by_pool: dict[str, Counter] = defaultdict(Counter)
        cost: dict[str, float] = defaultdict(float)
        tokens: dict[str, Counter] = defaultdict(Counter)
        saved: dict[str, float] = defaultdict(float)
        for o in self.outcomes:
            if o.route and o.route != "cache":
                by_pool[o.pool][o.route] += 1  # type: ignore[index]
            if o.saved:
                saved[o.pool] += o.saved  # type: ignore[index]
            for s in o.sent:
                if s.record is not None and s.record.ok:
                    cost[s.pool] += self.pool_configs[s.pool].cost(s.prompt_tokens, s.record.output_tokens)
                    tokens[s.pool].update(prompt=s.prompt_tokens, completion=s.record.output_tokens)
        total = sum(cost.values())
        small = sum(1 for o in self.outcomes for s in o.sent if s.route == "small")
        escalated = routes["escalated"]
        stats = self.cache.stats()
        return {
            "target": self.target,
            "lookup_ms": self.lookup_s * 1e3,
            "cache": {"exact_hits": looked["exact"], "semantic_hits": looked["semantic"], "misses": looked["miss"],
                      "bypass": looked["bypass"], "not_cached": looked["off"], "hit_rate": hits / n if n else 0.0,
                      "entries": stats.entries, "evictions": stats.evictions, "expired": stats.expired},
            "routes": {r: routes[r] for r in ("cache", "direct", "small", "escalated", "upfront")},
            "routes_by_pool": {p: dict(c) for p, c in sorted(by_pool.items())},
            "escalations": escalated,
            "escalation_rate": escalated / small if small else 0.0,
            "upfront_by_category": dict(Counter(o.category for o in self.outcomes if o.route == "upfront")),
            "ic_examples": sum(o.ic_examples for o in self.outcomes),
            "cost": {"total": total, "per_request": total / n if n else 0.0,
                     "by_pool": {p: cost.get(p, 0.0) for p in self.pool_configs},
                     "saved": sum(saved.values()), "saved_by_pool": dict(saved)},
            "tokens": {p: dict(c) for p, c in sorted(tokens.items())},
            "pools": {name: _pool_info(self.pool_configs[name], timing) for name, timing in self.pools.items()},
        }


def check_target(config: GatewayConfig, target: str) -> None:
    """ValueError unless ``target`` names a pool or a router of ``config``."""
    known = [p.name for p in config.pools] + [r.name for r in config.routers]
    if target not in known:
        raise ValueError(f"--gateway-model {target!r} is neither a pool nor a router of the gateway ({', '.join(known)})")


def _usage(answer: Answer) -> tuple[int, int]:
    return answer.usage["prompt_tokens"], answer.usage["completion_tokens"]


def _pool_info(config: PoolConfig, timing: SimSetup | Upstream) -> dict:
    prices = {"prompt_cost": config.prompt_cost, "completion_cost": config.completion_cost}
    if isinstance(timing, SimSetup):
        return {"kind": "local", "instances": len(timing.speeds), "speeds": timing.speeds,
                "max_num_seqs": timing.max_num_seqs, **prices}
    return {"kind": "upstream", "speed": getattr(timing.cost_model, "speed", 1.0), **prices}


def parse_pass_rates(text: str, categories: CategoryConfig) -> tuple[float, dict[str, float]]:
    """``"0.8"`` or ``"0.7,factual=0.9,coding=0.3"``: the default pass rate of the small pool's
    answers and per-category ones (the category the classifier gives the query)."""
    default, rates = 0.8, {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.rpartition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not 0 <= rate <= 1 or (sep and name not in categories.names) or name in rates:
            raise ValueError(f"--small-pass-rate: expected RATE or CATEGORY=RATE (rates in [0, 1], categories "
                             f"{', '.join(categories.names)}), got {part!r}")
        if sep:
            rates[name] = rate
        else:
            default = rate
    return default, rates


def draw_small_ok(queries: Sequence[GatewayQuery], categories: Sequence[str], default: float,
                  rates: dict[str, float], seed: int) -> list[bool]:
    """Each query's ``small_ok``, else a draw (seeded) at its category's pass rate."""
    draws = np.random.default_rng(seed).random(len(queries))
    return [q.small_ok if q.small_ok is not None else bool(u < rates.get(c, default))
            for q, c, u in zip(queries, categories, draws)]


def pool_timings(config: GatewayConfig, base: SimSetup, speeds: dict[str, float],
                 instances: dict[str, int]) -> dict[str, SimSetup | Upstream]:
    """How each pool is simulated: the served pool as ``base`` (its instances and speeds), another
    local model as ``base`` with that pool's ``max_num_seqs``, an upstream alone per request; each at
    its ``speeds`` factor (default 1) and, for local pools, ``instances`` (default: base's / 1)."""
    unknown = sorted((set(speeds) | set(instances)) - {p.name for p in config.pools})
    if unknown:
        raise ValueError(f"--pool-speed / --pool-instances name no pool: {', '.join(unknown)}")
    out: dict[str, SimSetup | Upstream] = {}
    for p in config.pools:
        speed = speeds.get(p.name, 1.0)
        if p.url is not None:
            if p.name in instances:
                raise ValueError(f"--pool-instances: {p.name} is an upstream (no instances to simulate)")
            out[p.name] = Upstream(ScaledCostModel(base.cost_model, speed), base.max_num_batched_tokens)
        elif p.local:
            own = base.speeds if p.name not in instances else [1.0] * instances[p.name]
            out[p.name] = replace(base, speeds=[v * speed for v in own],
                                  roles=None if p.name in instances else base.roles)
        else:
            out[p.name] = replace(base, speeds=[speed] * instances.get(p.name, 1), roles=None,
                                  max_num_seqs=p.max_num_seqs)
    return out


def simulate_gateway(config: GatewayConfig, queries: Sequence[GatewayQuery], embed: Callable[[list[str]], np.ndarray],
                     categories: CategoryConfig, pools: dict[str, SimSetup | Upstream], target: str,
                     pass_rates: tuple[float, dict[str, float]], slo: SLO, description: dict,
                     lookup_s: float = LOOKUP_MS / 1e3, seed: int = 0) -> tuple[dict, list[RequestRecord], GatewaySim]:
    """Embed the trace once, classify it, run it; the result JSON (the usual one over every query,
    hits included, plus ``gateway``), the client-side records and the run."""
    vectors = embed([q.query for q in queries])
    classifier = CategoryClassifier(categories, embed)
    drawn_by = [classifier.classify(v).name for v in vectors]
    small_ok = draw_small_ok(queries, drawn_by, *pass_rates, seed)
    run = GatewaySim(config, queries, vectors, classifier, categories, pools, target, small_ok, lookup_s)
    run.run()
    gateway = run.summary()
    gateway["small_pass_rate"] = {"default": pass_rates[0], **pass_rates[1]}
    local = [p for p in pools.values() if isinstance(p, SimSetup)]
    result = report.summarize(run.records, description, slo.ttft_s * 1e3, slo.tpot_s * 1e3, extra={
        "simulated": True, "instances": sum(len(p.speeds) for p in local),
        "policy": local[0].dispatch if local else None, "gateway": gateway})
    return result, run.records, run


@dataclass(frozen=True)
class TraceRun:
    """A gateway trace and everything to simulate it with, checked; :meth:`run` embeds and runs it."""

    config: GatewayConfig
    queries: list[GatewayQuery]
    categories: CategoryConfig
    pools: dict[str, SimSetup | Upstream]
    target: str
    pass_rates: tuple[float, dict[str, float]]
    slo: SLO
    description: dict
    lookup_s: float
    seed: int

    def run(self, embed: Callable[[list[str]], np.ndarray]) -> tuple[dict, list[RequestRecord]]:
        result, records, _ = simulate_gateway(self.config, self.queries, embed, self.categories, self.pools,
                                              self.target, self.pass_rates, self.slo, self.description,
                                              self.lookup_s, self.seed)
        return result, records


def prepare_trace(trace: str | Path, config_path: str | Path, base: SimSetup, *, target: str | None = None,
                  pass_rates: str = "0.8", pool_speed: str | None = None, pool_instances: str | None = None,
                  lookup_ms: float = LOOKUP_MS, seed: int = 0) -> TraceRun:
    """``shoal sim --gateway CONFIG --workload gateway:PATH``: the served pool as ``base``; ``target``
    the pool or router every query asks for (default: the first router, else the served model);
    ``pool_speed`` / ``pool_instances`` as ``NAME=X,...``. ValueError for bad input, naming it."""
    from shoal.bench import gateway_trace
    from shoal.bench.workloads import parse_shares
    from shoal.gateway.semantic_cache import load_categories

    config = GatewayConfig.load(config_path, _served_name())
    categories = load_categories(config.cache.categories)
    queries = gateway_trace.load(trace)
    instances = parse_shares(pool_instances, "--pool-instances") if pool_instances else {}
    if any(n != int(n) for n in instances.values()):
        raise ValueError("--pool-instances: counts must be whole numbers")
    pools = pool_timings(config, base, parse_shares(pool_speed, "--pool-speed") if pool_speed else {},
                         {k: int(n) for k, n in instances.items()})
    if not lookup_ms >= 0:
        raise ValueError("--lookup-ms must be >= 0")
    target = target or (config.routers[0].name if config.routers else config.default_pool.name)
    check_target(config, target)
    span = queries[-1].arrival_s - queries[0].arrival_s
    description = {"kind": "gateway", "trace": Path(trace).name, "gateway": Path(config_path).name, "target": target,
                   "num_requests": len(queries), "span_s": span, "rate": len(queries) / span if span else None}
    return TraceRun(config, queries, categories, pools, target, parse_pass_rates(pass_rates, categories), base.slo,
                    description, lookup_ms / 1e3, seed)


def _served_name() -> str:
    """The served pool's default name, as ``shoal serve`` gives it: the default model file's."""
    from shoal.model.loader import ModelLoadError, default_model_path

    try:
        return Path(default_model_path()).name.removesuffix(".gguf")
    except ModelLoadError:
        return "local"
