"""Prometheus metrics: vLLM v1's series set under the prefix ``shoal:`` instead of ``vllm:`` (the
same names, types, label names and buckets, so a vLLM dashboard maps over by swapping the prefix),
Shoal's own series beside them, the process collectors, and the HTTP series of
prometheus-fastapi-instrumentator (which vLLM serves)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from starlette.routing import BaseRoute, Match

from shoal.engine.outputs import InstanceLoad, RequestOutput
from shoal.engine.request import FinishReason

MAX_TENANT_LABELS = 64
"""Distinct tenants given their own label; later ones share ``other`` (without a keys file the
client names its tenant with ``user``, and an unbounded label set would grow /metrics forever)."""

ENGINE = "0"
"""The ``engine`` label: the server's one engine core (a cluster's instances summed; per-instance
series are the cluster's ``shoal:instance_*``)."""

# vLLM v1's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)  # inter-token latency and time per output token
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # e2e, queue, inference, prefill, decode
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
# Shoal's per-tenant latency histograms
_TENANT_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                           10.0, 20.0, 40.0, 80.0)
# prometheus-fastapi-instrumentator's defaults
HTTP_BUCKETS = (0.1, 0.5, 1.0)
HTTP_HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0,
                      7.5, 10.0, 30.0, 60.0)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value``: vLLM's buckets for token counts."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


@dataclass
class _Live:
    """A request past its first token (API clock, but ``prefill_s`` on the engine's clock)."""

    first_token: float
    last_token: float
    prefill_s: float


@dataclass
class _Choices:
    """The ``n`` choices of one prompt (vLLM's parent request): ``n`` and the most tokens any of
    them generated are observed once every choice has ended."""

    n: int
    max_tokens: int
    left: int  # neither ended nor forgotten yet
    ended: int = 0
    most_generated: int = 0


class _Lengths(NamedTuple):
    """The histograms whose buckets reach the model's context length."""

    prompt: Histogram
    generation: Histogram
    max_generation: Histogram
    max_tokens: Histogram


class ServerMetrics:
    """All series of one server, in their own registry. Fed on the event loop: :meth:`expect` when
    the API starts a prompt's choices, :meth:`observe_step` with each engine step's outputs."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        names = ["model_name", "engine"]
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"shoal:{name}", doc, names, registry=r).labels(model_name, ENGINE)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"shoal:{name}", doc, names, registry=r).labels(model_name, ENGINE)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(f"shoal:{name}", doc, names, buckets=buckets, registry=r).labels(model_name, ENGINE)

        self._histogram = histogram
        self.running = gauge("num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self.swapped = gauge("num_requests_swapped", "Preempted requests whose KV is swapped out.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.pinned = gauge("kv_pinned_blocks", "KV blocks pinned (agent programs' contexts kept between turns).")
        self.tier_capacity = gauge("kv_tier_capacity_blocks", "KV blocks the second tier holds at most (0: no tier).")
        self.tier_used = gauge("kv_tier_used_blocks", "KV blocks the second tier holds now.")
        self.cache_info = Gauge("shoal:cache_config_info", "Information of the engine's KV cache config.",
                                ["engine", "block_size", "num_gpu_blocks"], registry=r)
        # counters the engine keeps as running totals: the InstanceLoad field each follows
        self._totals = {
            counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."): "prefix_cache_queries",
            counter("prefix_cache_hits", "Prompt tokens found in the prefix cache."): "prefix_cache_hits",
            counter("num_preemptions", "Cumulative number of preemption from the engine."): "num_preemptions",
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
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        success = Counter("shoal:request_success", "Count of successfully processed requests.",
                          names + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, ENGINE, reason.value) for reason in FinishReason}
        self.iteration_tokens = histogram("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                          ITERATION_TOKENS_BUCKETS)
        self.params_n = histogram("request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", TOKEN_LATENCY_BUCKETS)
        phase = REQUEST_LATENCY_BUCKETS
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", phase)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", phase)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.", phase)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", phase)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", phase)
        self._lengths: _Lengths | None = None  # known once the engine is (see set_max_model_len)
        tenant = ["model_name", "tenant"]
        self.tenant_requests = Counter("shoal:tenant_requests", "Requests ended, by tenant and finish reason.",
                                       tenant + ["finished_reason"], registry=r)
        self.tenant_prompt_tokens = Counter("shoal:tenant_prompt_tokens", "Prompt tokens prefilled, by tenant.",
                                            tenant, registry=r)
        self.tenant_generation_tokens = Counter("shoal:tenant_generation_tokens", "Generated tokens, by tenant.",
                                                tenant, registry=r)
        self.tenant_rejections = Counter("shoal:tenant_rejections", "Requests answered 429, by tenant.", tenant, registry=r)
        self.tenant_ttft = Histogram("shoal:tenant_time_to_first_token_seconds", "Time to first token, by tenant.",
                                     tenant, buckets=_TENANT_LATENCY_BUCKETS, registry=r)
        self.tenant_queue_time = Histogram("shoal:tenant_request_queue_time_seconds", "Arrival to first scheduled, by tenant.",
                                           tenant, buckets=_TENANT_LATENCY_BUCKETS, registry=r)
        self._tenants: set[str] = set()
        self._live: dict[str, _Live] = {}
        self._choices: dict[str, _Choices] = {}

    def set_max_model_len(self, max_model_len: int) -> None:
        """Add the token-count histograms, bucketed 1-2-5 up to the context length (as vLLM does)."""
        if self._lengths is None:
            b = buckets_1_2_5(max_model_len)
            self._lengths = _Lengths(
                self._histogram("request_prompt_tokens", "Number of prefill tokens processed.", b),
                self._histogram("request_generation_tokens", "Number of generation tokens processed.", b),
                self._histogram("request_max_num_generation_tokens",
                                "Histogram of maximum number of requested generation tokens.", b),
                self._histogram("request_params_max_tokens", "Histogram of the max_tokens request parameter.", b))

    def tenant_label(self, tenant: str | None) -> str:
        """The ``tenant`` label of a request's tenant (``default`` for none; ``other`` past the cap)."""
        name = tenant or "default"
        if name not in self._tenants:
            if len(self._tenants) >= MAX_TENANT_LABELS:
                return "other"
            self._tenants.add(name)
        return name

    def observe_rejection(self, tenant: str | None) -> None:
        self.tenant_rejections.labels(self.model_name, self.tenant_label(tenant)).inc()

    def expect(self, req_ids: Sequence[str], max_tokens: int) -> None:
        """The API is about to start these requests: the ``n`` choices of one prompt."""
        choices = _Choices(len(req_ids), max_tokens, len(req_ids))
        self._choices.update(dict.fromkeys(req_ids, choices))

    def forget(self, req_ids: Sequence[str]) -> None:
        """Expected requests that did not start after all (a later choice was refused)."""
        for req_id in req_ids:
            if (choices := self._choices.pop(req_id, None)) is not None:
                self._choice_ended(choices, None)

    def observe_step(self, outputs: list[RequestOutput], load: InstanceLoad, now: float) -> None:
        """Account one engine step's outputs (``now`` on the API's monotonic clock) and the load after it."""
        tokens = sum(self._observe_output(out, now) for out in outputs)
        if tokens:
            self.iteration_tokens.observe(tokens)
        self._observe_load(load)

    def _observe_load(self, load: InstanceLoad) -> None:
        """Refresh gauges and move the counters that the engine keeps as running totals."""
        if not self._seen:  # the first load: the pool's shape
            self.cache_info.labels(ENGINE, str(load.block_size), str(load.num_total_blocks)).set(1)
        self.running.set(load.num_running)
        self.waiting.set(load.num_waiting)
        self.swapped.set(load.num_swapped)
        self.kv_usage.set(load.kv_usage)
        self.pinned.set(load.num_pinned_blocks)
        self.tier_capacity.set(load.num_tier_blocks)
        self.tier_used.set(load.num_tier_used_blocks)
        for metric, field in self._totals.items():
            total = getattr(load, field)
            metric.inc(max(0, total - self._seen.get(field, 0)))
            self._seen[field] = total

    def _observe_output(self, out: RequestOutput, now: float) -> int:
        """Account one request's output; returns the tokens it processed this step: those generated,
        plus the prompt when this is its first token (a prompt counts once prefilled, so a request
        ended while still queued counts none)."""
        tenant = self.tenant_label(out.metadata.tenant if out.metadata is not None else None)
        live, tokens = self._live.get(out.req_id), len(out.new_token_ids)
        if tokens:
            self.generation_tokens.inc(tokens)
            self.tenant_generation_tokens.labels(self.model_name, tenant).inc(tokens)
            if live is None:
                scheduled, first = out.first_scheduled_time, out.first_token_time
                prefill = first - scheduled if first is not None and scheduled is not None else 0.0
                self._live[out.req_id] = live = _Live(now, now, prefill)
                self.prompt_tokens.inc(out.num_prompt_tokens)
                self.tenant_prompt_tokens.labels(self.model_name, tenant).inc(out.num_prompt_tokens)
                tokens += out.num_prompt_tokens
                self.ttft.observe(now - out.arrival_time)
                self.tenant_ttft.labels(self.model_name, tenant).observe(now - out.arrival_time)
                if scheduled is not None:
                    self.queue_time.observe(scheduled - out.arrival_time)
                    self.tenant_queue_time.labels(self.model_name, tenant).observe(scheduled - out.arrival_time)
            else:
                self.itl.observe(now - live.last_token)
                live.last_token = now
        if out.finished:
            self._finish(out, now, tenant, self._live.pop(out.req_id, None))
        return tokens

    def _finish(self, out: RequestOutput, now: float, tenant: str, live: _Live | None) -> None:
        """A request ended. Its phase times and lengths count only if it was prefilled."""
        reason = out.finish_reason or FinishReason.ERROR
        self.success[reason].inc()
        self.tenant_requests.labels(self.model_name, tenant, reason.value).inc()
        self.e2e.observe(now - out.arrival_time)
        lengths = self._lengths
        if live is not None:
            decode = live.last_token - live.first_token
            self.prefill_time.observe(live.prefill_s)
            self.decode_time.observe(decode)
            self.inference_time.observe(live.prefill_s + decode)
            self.tpot.observe(decode / (out.num_output_tokens - 1) if out.num_output_tokens > 1 else 0.0)
            if lengths is not None:
                lengths.prompt.observe(out.num_prompt_tokens)
                lengths.generation.observe(out.num_output_tokens)
        if (choices := self._choices.pop(out.req_id, None)) is not None:
            if lengths is not None:
                lengths.max_tokens.observe(choices.max_tokens)
            self._choice_ended(choices, out.num_output_tokens)

    def _choice_ended(self, choices: _Choices, generated: int | None) -> None:
        """One choice ended (``generated`` tokens) or never started (None)."""
        choices.left -= 1
        if generated is not None:
            choices.ended += 1
            choices.most_generated = max(choices.most_generated, generated)
        if choices.left == 0 and choices.ended:
            self.params_n.observe(choices.n)
            if self._lengths is not None:
                self._lengths.max_generation.observe(choices.most_generated)


class HttpMetrics:
    """prometheus-fastapi-instrumentator's default HTTP series, as vLLM serves them:
    ``http_requests_total{method,status,handler}``, ``http_request_duration_seconds{method,handler}``
    and ``http_request_duration_highr_seconds``. ``handler`` is the matching route's path template
    (``none`` for a path no route matches), ``status`` its class (``2xx``); ``/metrics`` and
    ``/health`` (scrapes and probes) are left out, as vLLM leaves them out."""

    EXCLUDED = ("/metrics", "/health")
    METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")

    def __init__(self, registry: CollectorRegistry, routes: Sequence[BaseRoute]) -> None:
        self.routes = routes  # the app's list, read when a request comes (routes are added after this)
        self.requests = Counter("http_requests_total", "Total number of requests by method, status and handler.",
                                ["method", "status", "handler"], registry=registry)
        self.duration = Histogram("http_request_duration_seconds", "Latency with only few buckets by handler.",
                                  ["method", "handler"], buckets=HTTP_BUCKETS, registry=registry)
        self.duration_highr = Histogram("http_request_duration_highr_seconds",
                                        "Latency with many buckets but no API specific labels.",
                                        buckets=HTTP_HIGHR_BUCKETS, registry=registry)

    def handler(self, scope: dict) -> str:
        for route in self.routes:
            if route.matches(scope)[0] is not Match.NONE:
                return getattr(route, "path", "none")
        return "none"

    def observe(self, scope: dict, status: int, seconds: float) -> None:
        """One HTTP request answered with ``status`` (0: none sent, counted as 500) in ``seconds``."""
        handler = self.handler(scope)
        if handler in self.EXCLUDED:
            return
        method = scope["method"] if scope["method"] in self.METHODS else "other"
        self.requests.labels(method, f"{str(status or 500)[0]}xx", handler).inc()
        self.duration.labels(method, handler).observe(seconds)
        self.duration_highr.observe(seconds)

