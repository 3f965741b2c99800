"""The gateway in the simulator: the trace format, the cache and router deciding in virtual time
(a repeat hits only once the first answer is complete, per tenant; escalations reach the large pool
when the small request completes; up-front categories skip the small pool), the config's prices,
and the same decisions as the real HTTP layer replayed in the simulator's order."""

from __future__ import annotations

import asyncio
import json

import pytest

from shoal.bench import gateway_trace
from shoal.bench.agent import TraceError
from shoal.bench.workloads import RequestSpec, Workload
from tests._cli_util import cli
from shoal.sim.gateway import draw_small_ok, parse_pass_rates
from tests._gateway_sim_util import CATEGORIES, CATEGORY_FILE, CONFIG, FakeEmbedder, LayerReplay, base_setup, config, q, run, simulated

GOOD = {"arrival_s": 0.5, "query": "capital of France?", "prompt_tokens": 30, "output_tokens": 20}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a line must be a JSON object"),
    (json.dumps({**GOOD, "arrival_s": -1}), "arrival_s must be a number >= 0"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "query"}), "query must be a non-empty string (missing)"),
    (json.dumps({**GOOD, "query": "  "}), "query must be a non-empty string"),
    (json.dumps({**GOOD, "prompt_tokens": 0}), "prompt_tokens must be an integer >= 1"),
    (json.dumps({**GOOD, "output_tokens": 2.5}), "output_tokens must be an integer >= 1"),
    (json.dumps({**GOOD, "tenant": 3}), "tenant must be a string"),
    (json.dumps({**GOOD, "small_ok": "yes"}), "small_ok must be true or false"),
    (json.dumps({**GOOD, "colour": "red"}), "unknown fields colour"),
])
def test_the_trace_loader_names_the_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(TraceError) as err:
        gateway_trace.load(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_a_generated_trace_repeats_and_paraphrases_earlier_queries_and_reads_back(tmp_path):
    source = gateway_trace.QuerySource([("factual", "capital of France?"), ("factual", "capital of Peru?"),
                                        ("coding", "reverse a list?")],
                                       {"capital of France?": ["France's capital?"]})
    trace = gateway_trace.generate(source, 40, rate=4.0, repeat=0.5, paraphrase=0.5, count_tokens=len,
                                   output_len=50, tenants={"a": 1, "b": 1}, seed=3)
    texts = [t.query for t in trace]
    assert len(set(texts)) < len(texts) and "France's capital?" in texts
    assert {t.tenant for t in trace} == {"a", "b"} and all(t.prompt_tokens == len(t.query) for t in trace)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))
    gateway_trace.dump(trace, tmp_path / "t.jsonl")
    assert gateway_trace.load(tmp_path / "t.jsonl") == trace
    assert trace == gateway_trace.generate(source, 40, 4.0, 0.5, 0.5, len, 50, {"a": 1, "b": 1}, seed=3)


def test_bench_gateway_trace_writes_a_trace_from_paraphrase_pairs(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"category": c, "query": a, "candidate": b, "match": m}) + "\n" for c, a, b, m in [
        ("factual", "What is the capital of France?", "Which city is the capital of France?", True),
        ("factual", "What is the capital of Peru?", "What is the capital of Chile?", False)]))
    r = cli("bench", "gateway-trace", str(tmp_path / "t.jsonl"), "--queries", str(pairs), "-n", "30", "--repeat", "0.6",
            "--tenants", "a=1,b=1")
    assert r.exit_code == 0, r.output
    trace = gateway_trace.load(tmp_path / "t.jsonl")
    assert len(trace) == 30 and {t.category for t in trace} == {"factual"} and {t.tenant for t in trace} == {"a", "b"}
    assert all(t.prompt_tokens > 25 for t in trace), "the chat template's system prompt and markers count"
    bad = cli("bench", "gateway-trace", str(tmp_path / "u.jsonl"), "--queries", str(tmp_path / "t.jsonl"))
    assert bad.exit_code == 2 and "t.jsonl:1: candidate must be a string" in bad.output


def test_small_pass_rates_by_category_and_the_traces_own_verdicts():
    assert parse_pass_rates("0.5,coding=0", CATEGORIES) == (0.5, {"coding": 0.0})
    for bad in ("1.5", "sports=0.5", "coding=x"):
        with pytest.raises(ValueError, match="--small-pass-rate"):
            parse_pass_rates(bad, CATEGORIES)
    trace = [q(0, "a", small_ok=None), q(0, "b", small_ok=None), q(0, "c", small_ok=True)]
    assert draw_small_ok(trace, ["coding", "factual", "coding"], 1.0, {"coding": 0.0}, seed=0) == [False, True, True]


def test_a_repeat_hits_only_once_the_first_answer_is_complete():
    sim = run([q(0, "capital of France?"), q(0.05, "capital of France?"), q(50, "capital of France?"),
               q(51, "France's capital?"), q(52, "capital of Peru?")])
    first_end = sim.outcomes[0].sent[0].record.end_s
    assert sim.outcomes[1].sent[0].arrival_s < first_end, "the repeat arrived while the first was running"
    assert [o.cache for o in sim.outcomes] == ["miss", "miss", "exact", "semantic", "miss"]
    assert [o.route for o in sim.outcomes] == ["direct", "direct", "cache", "cache", "direct"]
    hit = sim.records[2]
    assert hit.ttft == hit.e2e == pytest.approx(0.01), "a hit is answered at the lookup cost"
    assert hit.output_tokens == 20 and sim.outcomes[2].sent == [] and sim.outcomes[2].pool == "m"


def test_tenants_do_not_share_hits():
    sim = run([q(0, "capital of France?", "a"), q(50, "capital of France?", "b"), q(60, "capital of France?", "a"),
               q(70, "France's capital?", "b")])
    assert [o.cache for o in sim.outcomes] == ["miss", "miss", "exact", "semantic"]


@pytest.mark.parametrize("large", ["upstream", "local"])
def test_an_escalated_query_reaches_the_large_pool_when_its_small_request_completes(large):
    pools = CONFIG["pools"] if large == "upstream" else [
        CONFIG["pools"][0], {"name": "big", "model": "/models/big.gguf", "prompt_cost": 10.0, "completion_cost": 30.0}]
    sim = run([q(0, "capital of France?", small_ok=False), q(0.2, "capital of Peru?"),
               q(0.3, "capital of Chile?", small_ok=False)], target="auto", gateway=config(pools=pools))
    assert [o.route for o in sim.outcomes] == ["escalated", "small", "escalated"]
    for out, rec in ((sim.outcomes[0], sim.records[0]), (sim.outcomes[2], sim.records[2])):
        small, big = out.sent
        assert (small.pool, small.route, big.pool, big.route) == ("m", "small", "big", "escalated")
        assert big.arrival_s == small.record.end_s
        assert rec.first_token_s == big.record.first_token_s and rec.end_s == big.record.end_s
    small_only = sim.records[1]
    assert small_only.first_token_s == small_only.end_s == sim.outcomes[1].sent[0].record.end_s, \
        "a small answer is sent once whole and checked"


def test_upfront_categories_never_touch_the_small_pool():
    sim = run([q(0, "reverse a list?"), q(0.1, "reverse a list?", tenant="b"), q(9, "capital of Peru?")],
              target="auto")
    assert [(o.category, o.route, [s.pool for s in o.sent]) for o in sim.outcomes] == [
        ("coding", "upfront", ["big"]), ("coding", "upfront", ["big"]), ("factual", "small", ["m"])]
    assert len(sim.clusters["m"].arrivals) == 1


def test_a_pool_runs_as_the_plain_simulator_runs_the_same_arrivals():
    """Stepped event by event among the gateway's events, a pool's cluster gives the records a plain
    run of its arrivals gives (fast-forwarding included)."""
    trace = [q(i * 0.05, f"question {i}", out=40 + i) for i in range(30)]
    sim = run(trace, gateway=config(cache={"enabled": False}))
    assert {o.cache for o in sim.outcomes} == {"bypass"} and all(o.sent[0].arrival_s == t.arrival_s
                                                                for o, t in zip(sim.outcomes, trace))
    specs = [RequestSpec(t.arrival_s, t.prompt_tokens, t.output_tokens) for t in trace]
    _, plain = base_setup().run(Workload("poisson", specs, {}))
    assert [(r.first_token_s, r.end_s, r.token_times_s) for r in sim.records] == \
        [(r.first_token_s, r.end_s, r.token_times_s) for r in plain]


def test_cost_totals_equal_the_configs_prices():
    # m: 1 / 2 per million prompt / completion tokens; big: 10 / 30. Every query: 30 prompt tokens.
    sim = run([q(0, "capital of France?", out=20), q(1, "capital of Peru?", out=40, small_ok=False),
               q(2, "reverse a list?", out=10), q(50, "capital of France?"), q(51, "reverse a list?")],
              target="auto")
    summary = sim.summary()
    small = (30 * 1 + 20 * 2) + (30 * 1 + 40 * 2)  # France answered small; Peru tried small first
    big = (30 * 10 + 40 * 30) + (30 * 10 + 10 * 30)  # Peru escalated; the list question up front
    assert summary["cost"]["by_pool"] == {"m": pytest.approx(small / 1e6), "big": pytest.approx(big / 1e6)}
    assert summary["cost"]["total"] == pytest.approx((small + big) / 1e6)
    assert summary["cost"]["per_request"] == pytest.approx((small + big) / 5e6)
    assert summary["cost"]["saved_by_pool"] == {"m": pytest.approx(70 / 1e6), "big": pytest.approx(600 / 1e6)}
    assert summary["routes"] == {"cache": 2, "direct": 0, "small": 1, "escalated": 1, "upfront": 1}
    assert summary["escalations"] == 1 and summary["cache"]["exact_hits"] == 2
    assert summary["tokens"]["m"] == {"prompt": 60, "completion": 60}


def test_ic_examples_lengthen_the_small_request():
    routers = [{**CONFIG["routers"][0], "ic_examples": 2, "ic_min_similarity": 0.5}]
    sim = run([q(0, "capital of France?", small_ok=False), q(10, "capital of Peru?")], target="auto",
              gateway=config(routers=routers))
    peru = sim.outcomes[1]
    assert peru.ic_examples == 1
    # the example: the French query and a stand-in answer of its 20 tokens, 4 characters a token
    assert peru.sent[0].prompt_tokens == 30 + (len("capital of France?") + 20 * 4) // 4


@pytest.mark.parametrize("target", ["m", "auto", "big"])
def test_the_server_decides_as_the_simulator(target):
    """The real layer, sent each query when the simulator decided it and each pool's answer when the
    simulator completed it, makes the same cache lookups and routes and bills the same cost."""
    trace = [q(0, "capital of France?"), q(0.001, "capital of France?"), q(30, "capital of France?"),
             q(31, "France's capital?"), q(32, "reverse a list?"), q(33, "capital of Peru?", small_ok=False),
             q(33.001, "capital of Peru?", tenant="b"), q(60, "capital of Peru?"), q(61, "reverse a list?", tenant="b")]
    sim = run(trace, target=target)
    replay = LayerReplay(sim, config(), FakeEmbedder())
    served = asyncio.run(replay.run())
    assert served == [simulated(o) for o in sim.outcomes]
    billed = {p: replay.metrics.cost.labels(pool=p)._value.get() for p in ("m", "big")}
    expected = sim.summary()["cost"]["by_pool"]
    assert billed == pytest.approx(expected)


def test_sim_gateway_prints_the_usual_json_with_a_gateway_object(tmp_path, monkeypatch):
    monkeypatch.setattr("shoal.gateway.embedder.Embedder", lambda *a, **kw: FakeEmbedder())
    trace = tmp_path / "t.jsonl"
    gateway_trace.dump([q(0, "capital of France?"), q(5, "France's capital?"), q(6, "reverse a list?", small_ok=False)],
                       trace)
    (tmp_path / "categories.json").write_text(json.dumps(CATEGORY_FILE))
    (tmp_path / "gw.json").write_text(json.dumps({**CONFIG, "pools": [{**CONFIG["pools"][0], "name": "m"},
                                                                      CONFIG["pools"][1]],
                                                  "cache": {"categories": str(tmp_path / "categories.json")}}))
    r = cli("sim", "--gateway", str(tmp_path / "gw.json"), "--workload", f"gateway:{trace}", "--pool-speed", "big=0.5",
            "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["num_requests"] == result["completed"] == 3 and result["ttft_ms"]["p50"] > 0
    gw = result["gateway"]
    assert gw["target"] == "auto" and gw["routes"]["cache"] == 1 and gw["routes"]["upfront"] == 1
    assert gw["cache"]["semantic_hits"] == 1 and gw["pools"]["big"] == {
        "kind": "upstream", "speed": 0.5, "prompt_cost": 10.0, "completion_cost": 30.0}
    bad = cli("sim", "--gateway", str(tmp_path / "gw.json"), "--workload", f"gateway:{trace}", "--gateway-model", "nope")
    assert bad.exit_code == 2 and "nope" in bad.output
