"""/metrics against vLLM v1's series set (names after the prefix, types, label names, buckets),
prompt tokens counted once prefilled, the process and HTTP series, and the Grafana dashboard's
queries against the series that exist."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shoal.engine.sampling_params import SamplingParams
from shoal.server.metrics import ServerMetrics
from tests._server_util import fast_engine, serve

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
LENGTH_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200]  # vLLM's 1-2-5 buckets up to the fast engine's 256-token context
REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]
TOKEN_LATENCY = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0]
ENGINE = {"model_name", "engine"}
# vLLM v1 (vllm/v1/metrics/loggers.py): name after the prefix -> (type, label names, buckets)
VLLM = {
    "num_requests_running": ("gauge", ENGINE, None),
    "num_requests_waiting": ("gauge", ENGINE, None),
    "kv_cache_usage_perc": ("gauge", ENGINE, None),
    "prefix_cache_queries": ("counter", ENGINE, None),
    "prefix_cache_hits": ("counter", ENGINE, None),
    "num_preemptions": ("counter", ENGINE, None),
    "prompt_tokens": ("counter", ENGINE, None),
    "generation_tokens": ("counter", ENGINE, None),
    "request_success": ("counter", ENGINE | {"finished_reason"}, None),
    "spec_decode_num_draft_tokens": ("counter", ENGINE, None),
    "spec_decode_num_accepted_tokens": ("counter", ENGINE, None),
    "iteration_tokens_total": ("histogram", ENGINE, [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]),
    "request_prompt_tokens": ("histogram", ENGINE, LENGTH_BUCKETS),
    "request_generation_tokens": ("histogram", ENGINE, LENGTH_BUCKETS),
    "request_max_num_generation_tokens": ("histogram", ENGINE, LENGTH_BUCKETS),
    "request_params_n": ("histogram", ENGINE, [1, 2, 5, 10, 20]),
    "request_params_max_tokens": ("histogram", ENGINE, LENGTH_BUCKETS),
    "time_to_first_token_seconds": ("histogram", ENGINE, [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0, 2560.0]),
    "inter_token_latency_seconds": ("histogram", ENGINE, TOKEN_LATENCY),
    "request_time_per_output_token_seconds": ("histogram", ENGINE, TOKEN_LATENCY),
    "e2e_request_latency_seconds": ("histogram", ENGINE, REQUEST_LATENCY),
    "request_queue_time_seconds": ("histogram", ENGINE, REQUEST_LATENCY),
    "request_inference_time_seconds": ("histogram", ENGINE, REQUEST_LATENCY),
    "request_prefill_time_seconds": ("histogram", ENGINE, REQUEST_LATENCY),
    "request_decode_time_seconds": ("histogram", ENGINE, REQUEST_LATENCY),
}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}


def scrape(url: str) -> dict:
    """/metrics as {family name: family}."""
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)}


def value(families: dict, name: str, **labels: str) -> float:
    """The sum of a family's samples called ``name`` whose labels include ``labels``."""
    family = families[re.sub(r"_(total|bucket|sum|count)$", "", name)]
    return sum(s.value for s in family.samples if s.name == name and labels.items() <= s.labels.items())


def series_names(families) -> set[str]:
    """Every sample name the families can produce (a family with no samples yet still counts)."""
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]} | {f.name for f in families}


@pytest.fixture(scope="module")
def server():
    server, _ = serve(fast_engine())
    yield server
    server.stop()


def complete(url: str, **body) -> httpx.Response:
    r = httpx.post(f"{url}/v1/completions", json={"max_tokens": 4, "ignore_eos": True, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_vllm_series_have_vllm_types_labels_and_buckets(server):
    complete(server.url, prompt="The quick brown fox", n=2, max_tokens=5)
    complete(server.url, prompt="Hello", stream=True)
    families = scrape(server.url)
    for name, (kind, labels, buckets) in VLLM.items():
        family = families.get(f"shoal:{name}")
        assert family is not None, name
        assert family.type == kind, name
        assert family.samples and all(set(s.labels) - {"le"} == labels for s in family.samples), name
        if buckets is not None:
            les = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
            assert les == [*buckets, float("inf")], name
    reasons = {s.labels["finished_reason"] for s in families["shoal:request_success"].samples}
    assert {"stop", "length", "abort"} <= reasons  # every reason shows from the start, as vLLM's do
    info = families["shoal:cache_config_info"]
    assert info.type == "gauge" and {"engine", "block_size", "num_gpu_blocks"} <= set(info.samples[0].labels)
    assert info.samples[0].labels["num_gpu_blocks"] == "512" and info.samples[0].value == 1


def test_request_histograms_follow_the_request(server):
    before = scrape(server.url)
    body = complete(server.url, prompt="Count: one two three", n=2, max_tokens=6).json()
    after = scrape(server.url)

    def delta(name: str) -> float:
        return value(after, name) - value(before, name)

    prompt = body["usage"]["prompt_tokens"]  # once, though each of the 2 choices prefills it
    assert delta("shoal:prompt_tokens_total") == 2 * prompt
    assert delta("shoal:generation_tokens_total") == 12
    assert delta("shoal:request_params_n_count") == 1 and delta("shoal:request_params_n_sum") == 2
    assert delta("shoal:request_params_max_tokens_sum") == 12  # 6 per choice
    assert delta("shoal:request_max_num_generation_tokens_sum") == 6
    assert delta("shoal:request_prompt_tokens_sum") == 2 * prompt
    assert delta("shoal:request_generation_tokens_sum") == 12
    for name in ("request_time_per_output_token_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds", "e2e_request_latency_seconds"):
        assert delta(f"shoal:{name}_count") == 2, name
    assert delta("shoal:iteration_tokens_total_sum") == 2 * prompt + 12
    assert delta("shoal:inter_token_latency_seconds_count") == 10  # 5 gaps per 6-token choice


def test_prompt_tokens_count_prefilled_prompts_only():
    """A request ended while still queued adds no prompt tokens; a completed one adds its prompt
    when its first token comes."""
    engine = fast_engine(max_num_seqs=1)
    metrics = ServerMetrics("m")
    metrics.set_max_model_len(engine.max_model_len)
    labels = {"model_name": "m", "engine": "0"}

    def prompt() -> float:
        return metrics.registry.get_sample_value("shoal:prompt_tokens_total", labels)

    def step() -> None:
        metrics.observe_step(engine.step(), engine.load(), time.monotonic())

    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add(list(range(100, 120)), params, req_id="runs")
    engine.add(list(range(200, 230)), params, req_id="queued")
    step()  # "runs" takes the one seat and produces its first token; "queued" waits
    assert prompt() == 20
    engine.abort("queued")
    while engine.has_unfinished():
        step()
    assert prompt() == 20
    get = metrics.registry.get_sample_value
    assert get("shoal:request_success_total", {**labels, "finished_reason": "abort"}) == 1
    assert get("shoal:request_prompt_tokens_count", labels) == 1


def test_process_and_http_series(server):
    complete(server.url, prompt="Hi")
    assert httpx.get(f"{server.url}/v1/models/no-such-model", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/no/such/path", timeout=10).status_code == 404
    families = scrape(server.url)
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert families[name].samples, name
    requests = families["http_requests"]
    assert requests.type == "counter"
    assert value(families, "http_requests_total", handler="/v1/completions", method="POST", status="2xx") >= 1
    assert value(families, "http_requests_total", handler="/v1/models/{model_id:path}", status="4xx") >= 1
    assert value(families, "http_requests_total", handler="none", method="GET", status="4xx") >= 1
    assert not any(s.labels["handler"] in ("/metrics", "/health") for s in requests.samples)
    duration = families["http_request_duration_seconds"]
    assert duration.type == "histogram" and {"method", "handler", "le"} == set(duration.samples[0].labels)
    assert value(families, "http_request_duration_highr_seconds_count") >= 1


def test_dashboard_queries_only_series_that_exist(server):
    """Every series an expr of the Grafana dashboard names is served by /metrics or by the
    cluster's ClusterMetrics, so the dashboard cannot go stale silently."""
    pytest.importorskip("ray")  # shoal.cluster imports it
    from shoal.cluster.cluster import ClusterMetrics
    from shoal.control.global_scheduler import GlobalScheduler
    from shoal.control.policies import LeastLoad

    registry = CollectorRegistry()
    ClusterMetrics(registry, GlobalScheduler(LeastLoad()))
    known = series_names(scrape(server.url).values()) | series_names(registry.collect())
    dashboard = json.loads((DEPLOY / "grafana" / "shoal-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) > 40
    named = {m for e in exprs for m in re.findall(r"\b(?:shoal:|http_|process_|python_)[a-z0-9_:]+", e)}
    assert {n for n in named if n.startswith("shoal:instance")}  # the cluster is on the dashboard
    assert named - known == set()


def test_grafana_and_prometheus_provisioning_fit_together():
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert "shoal:8000" in targets
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "shoal.yml").read_text())["providers"][0]
    assert provider["options"]["path"]
    dashboard = json.loads((DEPLOY / "grafana" / "shoal-dashboard.json").read_text())
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
