"""Prometheus metrics named as vLLM names them (prefix ``shoal:`` instead of ``vllm:``), so a
vLLM dashboard maps over by swapping the prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shoal.engine.outputs import InstanceLoad, RequestOutput

MAX_TENANT_LABELS = 64
"""Distinct tenants given their own label; later ones share ``other`` (without a keys file the
client names its tenant with ``user``, and an unbounded label set would grow /metrics forever)."""

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """All series of one server, in their own registry."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"shoal:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"shoal:{name}", doc, labels + list(extra), registry=r)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"shoal:{name}", doc, labels, buckets=_LATENCY_BUCKETS, registry=r)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.swapped = gauge("num_requests_swapped", "Preempted requests whose KV is swapped out.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self.pinned = gauge("kv_pinned_blocks", "KV blocks pinned (agent programs' contexts kept between turns).")
        self.tier_capacity = gauge("kv_tier_capacity_blocks", "KV blocks the second tier holds at most (0: no tier).")
        self.tier_used = gauge("kv_tier_used_blocks", "KV blocks the second tier holds now.")
        # counters the engine keeps as running totals: the InstanceLoad field each follows
        self._totals = {
            counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."): "prefix_cache_queries",
            counter("prefix_cache_hits", "Prompt tokens found in the prefix cache."): "prefix_cache_hits",
            counter("num_preemptions", "Requests preempted (swap or recompute)."): "num_preemptions",
            counter("spec_decode_num_draft_tokens", "Speculative (n-gram) tokens scored."): "num_draft_tokens",
            counter("spec_decode_num_accepted_tokens", "Speculative tokens accepted."): "num_accepted_tokens",
            counter("engine_restarts", "Times an engine started over after a step itself failed."): "num_restarts",
            counter("program_pins", "Agent programs' KV pins made (a turn ended and more follow)."): "program_pins",
            counter("program_pin_hits", "Next turns admitted onto their program's pin."): "program_pin_hits",
            counter("program_pins_expired", "Pins whose time-to-live ran out."): "program_pins_expired",
            counter("program_pins_yielded", "Pins given up under pressure."): "program_pins_yielded",
            counter("kv_tier_demoted_blocks", "KV blocks evicted from the device pool into the second tier."): "tier_demoted_blocks",
            counter("kv_tier_hit_blocks", "KV blocks loaded back from the second tier instead of recomputed."): "tier_loaded_blocks",
        }
        self._seen: dict[str, int] = {}
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.success = counter("request_success", "Requests ended, by finish reason.", ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.")
        tenant = ["model_name", "tenant"]
        self.tenant_requests = Counter("shoal:tenant_requests", "Requests ended, by tenant and finish reason.",
                                       tenant + ["finished_reason"], registry=r)
        self.tenant_prompt_tokens = Counter("shoal:tenant_prompt_tokens", "Prompt tokens of finished requests, by tenant.",
                                            tenant, registry=r)
        self.tenant_generation_tokens = Counter("shoal:tenant_generation_tokens", "Generated tokens, by tenant.",
                                                tenant, registry=r)
        self.tenant_rejections = Counter("shoal:tenant_rejections", "Requests answered 429, by tenant.", tenant, registry=r)
        self.tenant_ttft = Histogram("shoal:tenant_time_to_first_token_seconds", "Time to first token, by tenant.",
                                     tenant, buckets=_LATENCY_BUCKETS, registry=r)
        self.tenant_queue_time = Histogram("shoal:tenant_request_queue_time_seconds", "Arrival to first scheduled, by tenant.",
                                           tenant, buckets=_LATENCY_BUCKETS, registry=r)
        self._tenants: set[str] = set()

    def tenant_label(self, tenant: str | None) -> str:
        """The ``tenant`` label of a request's tenant (``default`` for none; ``other`` past the cap)."""
        name = tenant or "default"
        if name not in self._tenants:
            if len(self._tenants) >= MAX_TENANT_LABELS:
                return "other"
            self._tenants.add(name)
        return name

    def observe_rejection(self, tenant: str | None) -> None:
        self._l(self.tenant_rejections, tenant=self.tenant_label(tenant)).inc()

    def _l(self, metric, **extra):
        return metric.labels(model_name=self.model_name, **extra)

    def observe_load(self, load: InstanceLoad) -> None:
        """Refresh gauges and move the counters that the engine keeps as running totals."""
        self._l(self.running).set(load.num_running)
        self._l(self.waiting).set(load.num_waiting)
        self._l(self.swapped).set(load.num_swapped)
        self._l(self.kv_usage).set(load.kv_usage)
        self._l(self.pinned).set(load.num_pinned_blocks)
        self._l(self.tier_capacity).set(load.num_tier_blocks)
        self._l(self.tier_used).set(load.num_tier_used_blocks)
        for metric, field in self._totals.items():
            total = getattr(load, field)
            self._l(metric).inc(max(0, total - self._seen.get(field, 0)))
            self._seen[field] = total

    def observe_output(self, out: RequestOutput, now: float, last_token_time: float | None) -> None:
        """Account one engine output; ``last_token_time`` is when this request's previous token came."""
        tenant = self.tenant_label(out.metadata.tenant if out.metadata is not None else None)
        if out.new_token_ids:
            self._l(self.generation_tokens).inc(len(out.new_token_ids))
            self._l(self.tenant_generation_tokens, tenant=tenant).inc(len(out.new_token_ids))
            if last_token_time is None:
                self._l(self.ttft).observe(now - out.arrival_time)
                self._l(self.tenant_ttft, tenant=tenant).observe(now - out.arrival_time)
                if out.first_scheduled_time is not None:
                    self._l(self.queue_time).observe(out.first_scheduled_time - out.arrival_time)
                    self._l(self.tenant_queue_time, tenant=tenant).observe(out.first_scheduled_time - out.arrival_time)
            else:
                self._l(self.itl).observe(now - last_token_time)
        if out.finished:
            self._l(self.prompt_tokens).inc(out.num_prompt_tokens)
            reason = out.finish_reason.value if out.finish_reason else "unknown"
            self._l(self.success, finished_reason=reason).inc()
            self._l(self.tenant_requests, tenant=tenant, finished_reason=reason).inc()
            self._l(self.tenant_prompt_tokens, tenant=tenant).inc(out.num_prompt_tokens)
            self._l(self.e2e).observe(now - out.arrival_time)
