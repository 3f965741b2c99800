"""The run's report: its verdict, plots people read (units, SLO lines, percentile marks, steps from
0, whole-number counts) and one self-contained ``report.html``."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from shoal.bench import html_report, report
from shoal.bench.report import RequestRecord


def records(ttfts_s: list[float], tokens: int = 3, gap_s: float = 0.05) -> list[RequestRecord]:
    """One request a second, each with the given TTFT and ``tokens`` tokens ``gap_s`` apart."""
    out = []
    for i, ttft in enumerate(ttfts_s):
        times = [i + ttft + k * gap_s for k in range(tokens)]
        out.append(RequestRecord(float(i), 10, tokens, start_s=float(i), first_token_s=times[0], end_s=times[-1],
                                 output_tokens=tokens, token_times_s=times))
    return out


def result_of(recs: list[RequestRecord], ttft_ms: float = 1000, tpot_ms: float = 100) -> dict:
    res = report.summarize(recs, {"kind": "poisson", "rate": 2.0, "num_requests": len(recs)}, ttft_ms, tpot_ms)
    res["verdict"] = report.verdict(res, "lower --rate")
    return res


# ---- the verdict ---------------------------------------------------------------------------------


def test_verdict_ok_overloaded_and_failing():
    ok = result_of(records([0.1] * 10))
    assert ok["verdict"]["status"] == "ok" and ok["verdict"]["message"].startswith("OK: 100% of requests")
    slow = result_of(records([0.1, 0.2] + [30.0] * 8))
    assert slow["verdict"]["status"] == "overloaded"
    message = slow["verdict"]["message"]
    assert message.startswith("Overloaded: 20% of requests met both SLOs") and "\n" not in message
    assert "TTFT p50 30 s for an SLO of 1000 ms" in message and message.endswith("; lower --rate")
    late = records([0.1] * 4) + [RequestRecord(4.0, 10, 3, error=report.DURATION_LIMIT_ERRORS[0])]
    assert result_of(late)["verdict"]["message"].startswith("Overloaded: 1 of 5 requests not done by the duration limit")
    broken = records([0.1] * 4) + [RequestRecord(4.0, 10, 3, start_s=4.0, error="HTTP 500: boom")]
    assert result_of(broken)["verdict"] == {"status": "failing", "message": "Failing: 1 of 5 requests failed (HTTP 500: boom)"}


# ---- plot helpers --------------------------------------------------------------------------------


def test_latencies_switch_to_seconds_past_a_few_thousand_ms():
    assert report.time_unit(900_000.0) == ("s", 1e-3) and report.time_unit(800.0) == ("ms", 1.0)
    assert report.fmt_ms(900_000.0) == "900 s" and report.fmt_ms(1390.0) == "1390 ms" and report.fmt_ms(12.5) == "12.5 ms"
    slow = report.latency_figure(result_of(records([200.0, 900.0])), records([200.0, 900.0]))
    fast = report.latency_figure(result_of(records([0.1, 0.2])), records([0.1, 0.2]))
    assert slow.axes[0].get_xlabel() == "TTFT (s)" and fast.axes[0].get_xlabel() == "TTFT (ms)"
    assert max(slow.axes[0].get_xlim()) < 1000  # 900 s, not 900,000 ms


def test_cdfs_are_steps_from_zero_with_the_slo_and_percentiles_marked():
    x, y = report.cdf_steps([3.0, 1.0, 2.0])
    assert list(x) == [0.0, 1.0, 2.0, 3.0] and list(y) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    recs = records([0.1, 0.2, 0.4, 0.8])
    res = result_of(recs, ttft_ms=300)
    fig = report.latency_figure(res, recs)
    ttft_ax = fig.axes[0]
    cdf = ttft_ax.lines[0]
    assert cdf.get_drawstyle() == "steps-post" and tuple(cdf.get_xydata()[0]) == (0.0, 0.0)
    assert ttft_ax.get_xlim()[0] == 0
    slo_lines = [ln for ln in ttft_ax.lines if ln.get_linestyle() == "--"]
    assert [tuple(ln.get_xdata()) for ln in slo_lines] == [(300.0, 300.0)]
    marks = [t.get_text() for t in ttft_ax.texts]
    assert [m.split()[0] for m in marks] == ["p50", "p90", "p99"]
    assert marks[0] == f"p50 {res['ttft_ms']['p50']:.0f} ms"
    assert "poisson" in fig.texts[0].get_text() and "SLO TTFT 300 ms, TPOT 100 ms" in fig.texts[0].get_text()


def test_counts_get_whole_number_ticks():
    recs = records([0.1, 0.2, 0.3], tokens=2)
    fig = report.timeline_figure(result_of(recs), recs, [(0.0, 0.0), (0.5, 1.0), (1.0, 2.0)])
    for ax in fig.axes:
        ticks = ax.get_yticks()
        assert len(ticks) >= 2 and np.all(ticks == np.round(ticks)), ticks


# ---- report.html ---------------------------------------------------------------------------------


def test_report_html_is_one_self_contained_page(tmp_path):
    recs = records([0.1, 0.2] + [30.0] * 3)
    res = result_of(recs)
    res["url"] = "http://127.0.0.1:8000"  # text on the page, never fetched
    report.write(tmp_path, res, recs, [(0.0, 0.0), (1.0, 3.0)])
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page), "nothing fetched from anywhere"
    assert "<link" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert base64.b64decode(images[0]) == (tmp_path / "latency_cdf.png").read_bytes()
    assert res["verdict"]["message"].split(" (")[0] in page and 'class="verdict overloaded"' in page
    assert "SLO: TTFT</th><td>1000 ms" in page and "SLO: TPOT</th><td>100 ms" in page
    assert "<th>kind</th><td>poisson</td>" in page
    assert "<th>SLO attainment</th><td class=\"n\">0.4</td>" in page


def test_report_html_escapes_what_it_shows(tmp_path):
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    recs = records([0.1])
    res = report.summarize(recs, {"kind": "trace", "trace": "<b>x</b>.csv"}, 1000, 100)
    page = html_report.render(res, [png])
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;.csv" in page
