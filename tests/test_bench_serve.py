"""``shoal bench serve``: workloads and the result summary (no server), then end-to-end runs of the
command against a real server (SmolLM2, one per module)."""

from __future__ import annotations

import copy
import csv
import json
import socket
from pathlib import Path
from unittest import mock

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from shoal.bench import report, workloads
from shoal.bench.report import RequestRecord
from shoal.cli import app as cli_app
from tests._server_util import MODEL_NAME, load_engine, serve

AZURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_conv_2023.csv"
needs_azure = pytest.mark.skipif(not AZURE.is_file(), reason=f"Azure trace not found at {AZURE}")

RESULT_KEYS = {"num_requests", "completed", "failed", "duration_s", "request_throughput",
               "output_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "slo", "goodput_rps",
               "slo_attainment", "workload"}


def azure_rows(n: int, start_s: float = 0.0) -> list[tuple[float, int, int]]:
    """The first ``n`` rows at or after ``start_s``, read independently of the loader."""
    rows = []
    with AZURE.open(newline="") as f:
        for row in csv.DictReader(f):
            t = float(row["arrived_at"])
            if t >= start_s:
                rows.append((t, int(row["num_prefill_tokens"]), int(row["num_decode_tokens"])))
            if len(rows) == n:
                break
    return rows


# ---- arrival processes ---------------------------------------------------------------------------


def gaps_of(wl: workloads.Workload) -> np.ndarray:
    return np.diff([r.arrival_s for r in wl.requests])


def test_poisson_mean_rate_and_lengths():
    wl = workloads.synthetic("poisson", 20_000, rate=4.0, prompt_len=100, output_len=50, seed=1)
    assert wl.kind == "poisson" and len(wl.requests) == 20_000
    assert wl.requests[0].arrival_s == 0.0
    gaps = gaps_of(wl)
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: CV 1
    assert {(r.prompt_len, r.output_len) for r in wl.requests} == {(100, 50)}  # no jitter asked
    assert wl.description == {"kind": "poisson", "rate": 4.0, "num_requests": 20_000, "prompt_len": 100,
                              "output_len": 50, "seed": 1}
    # seeded: the same arrivals again, others with another seed
    again = workloads.synthetic("poisson", 20_000, rate=4.0, prompt_len=100, output_len=50, seed=1)
    assert again.requests == wl.requests
    assert workloads.synthetic("poisson", 100, 4.0, 100, 50, seed=2).requests != wl.requests[:100]


def test_gamma_is_burstier_than_poisson_at_the_same_rate():
    poisson = workloads.synthetic("poisson", 20_000, rate=2.0, prompt_len=10, output_len=10, seed=3)
    gamma = workloads.synthetic("gamma", 20_000, rate=2.0, prompt_len=10, output_len=10, burstiness=0.25, seed=3)
    gp, gg = gaps_of(poisson), gaps_of(gamma)
    assert gg.mean() == pytest.approx(0.5, rel=0.05) and gp.mean() == pytest.approx(0.5, rel=0.05)
    cv_p, cv_g = gp.std() / gp.mean(), gg.std() / gg.mean()
    assert cv_g > 1.5 * cv_p
    assert cv_g == pytest.approx(2.0, rel=0.15)  # Gamma(shape k): CV = 1/sqrt(k)
    assert gamma.description["burstiness"] == 0.25 and gamma.description["kind"] == "gamma"
    smooth = workloads.synthetic("gamma", 20_000, rate=2.0, prompt_len=10, output_len=10, burstiness=4.0, seed=3)
    assert gaps_of(smooth).std() / gaps_of(smooth).mean() < 0.7 * cv_p


def test_length_jitter_and_bad_arguments():
    wl = workloads.synthetic("poisson", 2000, 1.0, prompt_len=100, output_len=20, seed=0, len_jitter=0.5)
    p = np.array([r.prompt_len for r in wl.requests])
    o = np.array([r.output_len for r in wl.requests])
    assert p.min() >= 50 and p.max() <= 150 and len(set(p)) > 50
    assert o.min() >= 10 and o.max() <= 30
    with pytest.raises(ValueError, match="unknown arrival process"):
        workloads.synthetic("uniform", 10, 1.0, 10, 10)
    for kw in (dict(rate=0), dict(rate=-1), dict(num_requests=0), dict(burstiness=0)):
        args = dict(kind="gamma", num_requests=10, rate=1.0, prompt_len=10, output_len=10, burstiness=0.5) | kw
        with pytest.raises(ValueError, match="positive"):
            workloads.synthetic(**args)


def test_closed_loop_workload():
    wl = workloads.closed_loop(5, 2, 32, 8)
    assert wl.kind == "concurrency" and [r.arrival_s for r in wl.requests] == [0.0] * 5
    assert {(r.prompt_len, r.output_len) for r in wl.requests} == {(32, 8)}
    assert wl.description["concurrency"] == 2


# ---- traces --------------------------------------------------------------------------------------


@needs_azure
def test_load_azure_trace_time_scale_and_clipping():
    rows = azure_rows(200)
    wl = workloads.load_trace(AZURE, time_scale=0.5, max_context=512, num_requests=200)
    assert wl.kind == "trace" and len(wl.requests) == 200
    t0 = rows[0][0]
    clipped = 0
    for (t, p, o), r in zip(rows, wl.requests):
        assert r.arrival_s == pytest.approx((t - t0) * 0.5)
        assert r.prompt_len + r.output_len <= 512 and r.prompt_len > 0 and r.output_len > 0
        if p + o > 512:
            clipped += 1
            assert r.output_len == min(o, 256) and r.prompt_len == 512 - r.output_len
        else:
            assert (r.prompt_len, r.output_len) == (p, o)
    assert clipped > 0  # Azure conversation prompts are long: this window needs clipping
    d = wl.description
    assert d["clipped_requests"] == clipped
    assert d["kind"] == "trace" and d["format"] == "azure" and d["trace"] == AZURE.name
    assert d["time_scale"] == 0.5 and d["max_context"] == 512 and d["num_requests"] == 200
    assert d["span_s"] == pytest.approx((rows[-1][0] - t0) * 0.5)
    assert d["rate"] == pytest.approx(200 / d["span_s"])
    # time_scale 1 keeps the trace's own gaps; no max_context clips nothing
    raw = workloads.load_trace(AZURE, num_requests=200)
    assert raw.description["clipped_requests"] == 0
    assert [(r.prompt_len, r.output_len) for r in raw.requests] == [(p, o) for _, p, o in rows]
    assert raw.description["span_s"] == pytest.approx(2 * d["span_s"])


@needs_azure
def test_load_azure_trace_window():
    rows = azure_rows(10, start_s=600.0)
    wl = workloads.load_trace(AZURE, num_requests=10, start_s=600.0, time_scale=2.0)
    assert wl.requests[0].arrival_s == 0.0
    assert [(r.prompt_len, r.output_len) for r in wl.requests] == [(p, o) for _, p, o in rows]
    assert wl.requests[-1].arrival_s == pytest.approx(2.0 * (rows[-1][0] - rows[0][0]))
    # max_duration_s bounds the replayed (scaled) span
    short = workloads.load_trace(AZURE, start_s=600.0, time_scale=2.0, max_duration_s=20.0)
    assert short.requests[-1].arrival_s <= 20.0 + 1e-9 and len(short.requests) > 1


BURSTGPT_HEADER = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"]


def test_load_burstgpt_trace_skips_failed_rows(tmp_path):
    path = tmp_path / "burst.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(BURSTGPT_HEADER)
        w.writerow([5, "ChatGPT", 100, 20, 120, "Conversation log"])
        w.writerow([6, "ChatGPT", 300, 0, 300, "Conversation log"])  # failed request: no response
        w.writerow([9, "GPT-4", 50, 10, 60, "API log"])
        w.writerow([15, "ChatGPT", 1000, 400, 1400, "Conversation log"])
        w.writerow([20, "GPT-4", 70, 30, 100, "API log"])
    wl = workloads.load_trace(path, time_scale=0.5, max_context=1024)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in wl.requests] == [
        (0.0, 100, 20), (2.0, 50, 10), (5.0, 1024 - 400, 400), (7.5, 70, 30)]
    d = wl.description
    assert d["format"] == "burstgpt" and d["num_requests"] == 4 and d["clipped_requests"] == 1
    assert d["span_s"] == 7.5
    # num_requests counts kept rows (the failed one does not use up the budget)
    assert len(workloads.load_trace(path, num_requests=2).requests) == 2
    assert [r.prompt_len for r in workloads.load_trace(path, num_requests=2).requests] == [100, 50]


def test_load_trace_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("time,input,output\n0,10,10\n")
    with pytest.raises(ValueError, match="unknown trace columns") as exc:
        workloads.load_trace(bad)
    assert "Azure" in str(exc.value) and "BurstGPT" in str(exc.value) and "time" in str(exc.value)
    with pytest.raises(ValueError, match="not found"):
        workloads.load_trace(tmp_path / "missing.csv")
    ok = tmp_path / "ok.csv"
    ok.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,10\n1,20,0\n")
    with pytest.raises(ValueError, match="time_scale"):
        workloads.load_trace(ok, time_scale=0)
    with pytest.raises(ValueError, match="no requests"):
        workloads.load_trace(ok, start_s=5)
    assert len(workloads.load_trace(ok).requests) == 1


# ---- the summary ---------------------------------------------------------------------------------


def hand_records() -> list[RequestRecord]:
    """Times are dyadic fractions, so every latency below is exact in floating point."""
    a = RequestRecord(0.0, 100, 11, start_s=0.0, first_token_s=0.125, end_s=1.125, output_tokens=11,
                      token_times_s=[0.125, 0.375, 0.625])  # ttft 125 ms, tpot 100 ms
    b = RequestRecord(1.0, 100, 5, start_s=1.0, first_token_s=1.5, end_s=2.5, output_tokens=5,
                      token_times_s=[1.5, 2.5])  # ttft 500 ms (misses), tpot 250 ms
    c = RequestRecord(2.0, 100, 1, start_s=2.0, first_token_s=2.0625, end_s=2.0625, output_tokens=1,
                      token_times_s=[2.0625])  # ttft 62.5 ms, one token: no tpot
    d = RequestRecord(3.0, 100, 8, start_s=3.0, error="HTTP 500: boom")
    e = RequestRecord(3.5, 100, 4, start_s=3.5, first_token_s=3.625, end_s=4.0, output_tokens=4,
                      token_times_s=[3.625, 4.0])  # ttft 125 ms, tpot 125 ms
    return [a, b, c, d, e]


def test_summarize_hand_computed():
    recs = hand_records()
    res = report.summarize(recs, {"kind": "test"}, slo_ttft_ms=200, slo_tpot_ms=150, duration_s=4.0,
                           extra={"url": "x"})
    assert RESULT_KEYS <= set(res)
    assert (res["num_requests"], res["completed"], res["failed"]) == (5, 4, 1)
    assert res["duration_s"] == 4.0
    assert res["request_throughput"] == pytest.approx(4 / 4.0)
    assert res["output_token_throughput"] == pytest.approx((11 + 5 + 1 + 4) / 4.0)
    assert res["input_token_throughput"] == pytest.approx(400 / 4.0)
    # good: a (125/100), c (62.5/-), e (125/125); b misses the TTFT SLO, d failed
    assert res["goodput_rps"] == pytest.approx(3 / 4.0)
    assert res["slo_attainment"] == pytest.approx(3 / 5)  # failed requests count against attainment
    ttft = res["ttft_ms"]  # 125, 500, 62.5, 125 -> sorted 62.5, 125, 125, 500
    assert ttft["mean"] == pytest.approx(812.5 / 4)
    assert ttft["p50"] == pytest.approx(125)
    assert ttft["p90"] == pytest.approx(125 + 0.7 * 375)  # rank 2.7: between 125 and 500
    assert ttft["p99"] == pytest.approx(125 + 0.97 * 375)
    tpot = res["tpot_ms"]  # 100, 250, 125
    assert tpot["mean"] == pytest.approx(475 / 3) and tpot["p50"] == pytest.approx(125)
    itl = res["itl_ms"]  # a: 250, 250; b: 1000; e: 375
    assert itl["mean"] == pytest.approx(1875 / 4) and itl["p50"] == pytest.approx(312.5)
    e2e = res["e2e_ms"]  # 1125, 1500, 62.5, 500
    assert e2e["mean"] == pytest.approx(3187.5 / 4) and e2e["p50"] == pytest.approx(812.5)
    assert res["slo"] == {"ttft_ms": 200, "tpot_ms": 150}
    assert res["errors"] == ["HTTP 500: boom"] and res["url"] == "x" and res["workload"] == {"kind": "test"}
    # SLO bounds are inclusive: at ttft 125 / tpot 100, a (exactly on both) and c are good, e is not
    tight = report.summarize(recs, {}, slo_ttft_ms=125, slo_tpot_ms=100, duration_s=4.0)
    assert tight["goodput_rps"] == pytest.approx(2 / 4.0)
    assert tight["slo_attainment"] == pytest.approx(2 / 5)


def test_summarize_without_duration_and_empty():
    recs = hand_records()
    res = report.summarize(recs, {}, 1000, 1000)
    assert res["duration_s"] == pytest.approx(4.0)  # the last end
    empty = report.summarize([], {}, 1000, 1000)
    assert empty["completed"] == 0 and empty["slo_attainment"] == 0.0
    assert empty["ttft_ms"] == {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_report_write(tmp_path):
    recs = hand_records()
    res = report.summarize(recs, {"kind": "test"}, 200, 150, duration_s=4.0)
    report.write(tmp_path, res, recs, [(0.0, 0.0), (1.0, 2.0), (2.0, 1.0)])
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(res))
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert [json.loads(x)["output_tokens"] for x in lines] == [11, 5, 1, 0, 4]
    for name in ("latency_cdf.png", "timeline.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- a URL that is not a server ------------------------------------------------------------------


def refused_url() -> str:
    """A port bound but not listening: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("answer, reason", [
    (None, "Connection refused"),
    (httpx.Response(200, text="<html>a web page</html>"), "not an OpenAI-compatible server"),
    (httpx.Response(404, text="not found"), "HTTP 404 from /v1/models"),
    (httpx.Response(401, json={"error": "no key"}), "give the server's key with --api-key"),
])
def test_bench_serve_against_no_server_is_one_line_naming_the_url(tmp_path, monkeypatch, answer, reason):
    url = refused_url()
    if answer is not None:
        monkeypatch.setattr(httpx, "get", lambda *args, **kwargs: answer)
    result = CliRunner().invoke(cli_app, ["bench", "serve", "--url", url, "-n", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"Error: cannot reach {url}: ") and reason in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


# ---- end to end against a real server ------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    """The server, plus a private copy of its tokenizer that the bench command gets instead of loading
    the GGUF tokenizer again (seconds per run); the server keeps its own instance."""
    engine = load_engine()
    srv, _ = serve(engine)
    srv.engine = engine
    srv.bench_tokenizer = copy.deepcopy(engine.tokenizer)
    yield srv
    srv.stop()


def invoke_bench(server, out: Path, *args: str):
    with mock.patch("shoal.model.loader.load_tokenizer", return_value=server.bench_tokenizer) as loader:
        result = CliRunner().invoke(cli_app, ["bench", "serve", "--url", server.url, "--out", str(out), *args])
    assert loader.call_count == 1
    return result


def run_bench(server, out: Path, *args: str) -> tuple[dict, list[dict]]:
    result = invoke_bench(server, out, *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "wrote" in result.stderr
    json.loads(result.stdout)  # stdout carries only the result
    res = json.loads((out / "result.json").read_text())
    records = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    for name in ("latency_cdf.png", "timeline.png"):
        png = (out / name).read_bytes()
        assert len(png) > 1000 and png[:4] == b"\x89PNG", name
    return res, records


def check_result(res: dict, records: list[dict], n: int) -> None:
    assert RESULT_KEYS <= set(res)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(res[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < res[key]["p50"] <= res[key]["p90"] <= res[key]["p99"], key
    assert res["num_requests"] == n and res["completed"] == n and res["failed"] == 0
    assert "errors" not in res
    assert 0 < res["ttft_ms"]["p50"] <= res["e2e_ms"]["p50"]
    assert res["tpot_ms"]["p50"] < res["e2e_ms"]["p50"]
    assert len(records) == n
    for r in records:
        assert r["error"] is None
        assert r["output_tokens"] == r["output_len"]  # ignore_eos: exactly the requested length
        if res["workload"]["kind"] == "trace":
            assert r["start_s"] >= r["arrival_s"] - 1e-6  # open loop: not sent before its arrival
        assert r["start_s"] <= r["first_token_s"] <= r["end_s"]
    total_out = sum(r["output_len"] for r in records)
    assert res["output_token_throughput"] == pytest.approx(total_out / res["duration_s"])
    assert res["request_throughput"] == pytest.approx(n / res["duration_s"])
    assert 0 <= res["goodput_rps"] <= res["request_throughput"]
    assert 0 <= res["slo_attainment"] <= 1
    assert res["url"]


@needs_azure
def test_bench_serve_trace_end_to_end(server, tmp_path):
    n = 6
    res, records = run_bench(server, tmp_path, "--workload", f"trace:{AZURE}", "-n", str(n), "--time-scale", "0.05",
                             "--max-context", "512", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000")
    check_result(res, records, n)
    wl = res["workload"]
    rows = azure_rows(n)
    assert wl["kind"] == "trace" and wl["time_scale"] == 0.05 and wl["max_context"] == 512
    assert wl["num_requests"] == n and wl["clipped_requests"] == sum(p + o > 512 for _, p, o in rows)
    expected = workloads.load_trace(AZURE, time_scale=0.05, max_context=512, num_requests=n).requests
    assert [(r["arrival_s"], r["prompt_len"], r["output_len"]) for r in records] == [
        (pytest.approx(x.arrival_s), x.prompt_len, x.output_len) for x in expected]
    assert res["duration_s"] >= expected[-1].arrival_s  # open loop: the last one was sent on time or later
    # generous SLOs: every request is good
    assert res["slo_attainment"] == 1.0 and res["goodput_rps"] == pytest.approx(res["request_throughput"])


@needs_azure
def test_bench_serve_trace_context_from_server(server, tmp_path):
    """Without --max-context the loader clips to the server's max_model_len (from /v1/models)."""
    res, records = run_bench(server, tmp_path, "--workload", f"trace:{AZURE}", "-n", "1", "--model", MODEL_NAME)
    assert res["workload"]["max_context"] == 1024 and res["completed"] == 1
    assert records[0]["output_tokens"] == azure_rows(1)[0][2]


def test_bench_serve_closed_loop(server, tmp_path):
    res, records = run_bench(server, tmp_path, "--concurrency", "2", "-n", "4", "--prompt-len", "48",
                             "--output-len", "12", "--slo-ttft-ms", "1e-3")
    check_result(res, records, 4)
    assert res["workload"] == {"kind": "concurrency", "concurrency": 2, "num_requests": 4, "prompt_len": 48,
                               "output_len": 12}
    assert all(r["output_tokens"] == 12 and r["prompt_len"] == 48 for r in records)
    # never more than 2 in flight, and the pipe was kept full (a third started only after one ended)
    events = sorted([(r["start_s"], 1) for r in records] + [(r["end_s"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    level, peak = 0, 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak == 2
    starts = sorted(r["start_s"] for r in records)
    ends = sorted(r["end_s"] for r in records)
    assert starts[2] >= ends[0] - 1e-6 and starts[3] >= ends[1] - 1e-6
    # an impossible TTFT SLO: nothing is good, and the verdict says so
    assert res["goodput_rps"] == 0 and res["slo_attainment"] == 0
    assert res["verdict"]["status"] == "overloaded" and "for an SLO of 0.001 ms" in res["verdict"]["message"]
    assert (tmp_path / "report.html").is_file()


def test_bench_serve_counts_mid_stream_failures(server, tmp_path, monkeypatch):
    """A request the server fails after its first tokens (an SSE error event) is failed, not a
    short success."""
    real = server.engine.executor.execute
    calls = []

    def flaky(plan, states):
        calls.append(1)
        if len(calls) >= 3:  # prefill and one decode step succeed, then the device "fails"
            raise RuntimeError("simulated device fault")
        return real(plan, states)

    monkeypatch.setattr(server.engine.executor, "execute", flaky)
    result = invoke_bench(server, tmp_path, "--concurrency", "1", "-n", "1", "--prompt-len", "16", "--output-len", "8")
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "result.json").read_text())
    assert (res["completed"], res["failed"]) == (0, 1)
    assert any("simulated device fault" in e for e in res["errors"]), res["errors"]
    assert res["goodput_rps"] == 0 and res["slo_attainment"] == 0


def test_bench_serve_replays_an_agent_trace_with_its_history(server, tmp_path):
    """Each turn's prompt is the previous prompt, the server's real reply and new text, sent with its
    session, so the server's prefix cache serves the history (reported as cached tokens); the
    result has the programs' job completion time."""
    from shoal.bench import agent

    progs = [agent.AgentProgram("a", 0.0, (agent.AgentTurn(40, 6, 0.05, "bash"), agent.AgentTurn(30, 6, 0.05, "edit"),
                                           agent.AgentTurn(20, 4))),
             agent.AgentProgram("b", 0.1, (agent.AgentTurn(50, 5, 0.0, "bash"), agent.AgentTurn(25, 5)))]
    agent.dump(progs, tmp_path / "t.jsonl")
    seen = []
    real_add = server.engine.add

    def recording(prompt, params=None, **kw):
        seen.append((kw.get("metadata"), list(prompt)))
        return real_add(prompt, params, **kw)

    with mock.patch.object(server.engine, "add", recording):
        res, records = run_bench(server, tmp_path / "out", "--workload", f"agent:{tmp_path / 't.jsonl'}")
    assert res["completed"] == 5 and res["failed"] == 0
    prog = res["programs"]
    assert (prog["num_programs"], prog["completed"], prog["turns_completed"]) == (2, 2, 5)
    assert 0 < prog["jct_s"]["p50"] <= prog["jct_s"]["p90"]
    by_turn = {(r["program_id"], r["turn"]): r for r in records}
    a = [by_turn["a", k] for k in range(3)]
    assert a[1]["start_s"] >= a[0]["end_s"] + 0.05 - 1e-3  # the tool's pause, after the reply
    assert a[1]["cached_tokens"] > 0 and a[2]["cached_tokens"] >= a[1]["cached_tokens"]
    metas = [m for m, _ in seen if m is not None and m.session_id == "a"]
    assert [(m.more_turns, m.tool) for m in metas] == [(True, "bash"), (True, "edit"), (False, None)]
    prompts = [p for m, p in seen if m is not None and m.session_id == "a"]
    assert prompts[1][:len(prompts[0]) - 2] == prompts[0][:-2]  # the history, as sent before
