"""``report.html``: one run on one page that a browser opens from disk, with no server and nothing
fetched: the verdict, the workload and SLO, the result JSON's figures and the plots, embedded as
data URIs."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from shoal.bench.report import fmt_ms, run_title

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))
SUMMARY = (("requests", "num_requests"), ("completed", "completed"), ("failed", "failed"),
           ("duration (s)", "duration_s"), ("requests / s", "request_throughput"),
           ("output tokens / s", "output_token_throughput"), ("goodput (req/s meeting both SLOs)", "goodput_rps"),
           ("SLO attainment", "slo_attainment"))
SHOWN = {key for _, key in SUMMARY} | {key for _, key in LATENCIES} | {"workload", "slo", "verdict"}

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .7em;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.verdict{padding:.6em 1em;border-radius:4px;font-weight:600}.ok{background:#e6f4ea}.overloaded{background:#fde7c8}
.failing{background:#fbd5d5}img{max-width:100%;border:1px solid #eee;margin:.5em 0}"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f'<td class="n">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="n">{value}</td>'
    text = value if isinstance(value, str) else json.dumps(value)
    return f"<td>{html.escape(text)}</td>"


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th>{_cell(v)}</tr>" for k, v in rows) + "</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def render(result: dict, images: list[Path]) -> str:
    """The page for ``result`` with the PNG files ``images`` embedded."""
    title = run_title(result)
    verdict = result.get("verdict") or {}
    status = verdict.get("status", "ok")
    slo = result["slo"]
    latency_rows = "".join(
        f"<tr><th>{name}</th>" + "".join(f'<td class="n">{html.escape(fmt_ms(result[key][q]))}</td>'
                                        for q in ("mean", "p50", "p90", "p99")) + "</tr>"
        for name, key in LATENCIES if key in result)
    details = [(k, v) for k, v in result.items() if k not in SHOWN]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Shoal report: {html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="verdict {html.escape(status)}">{html.escape(verdict.get("message", ""))}</p>' if verdict else "",
        "<h2>Workload and SLO</h2>",
        _table([*(result.get("workload") or {}).items(), ("SLO: TTFT", fmt_ms(slo["ttft_ms"])),
                ("SLO: TPOT", fmt_ms(slo["tpot_ms"]))]),
        "<h2>Summary</h2>", _table([(label, result[key]) for label, key in SUMMARY if key in result]),
        "<h2>Latency</h2><table><tr><th></th><th>mean</th><th>p50</th><th>p90</th><th>p99</th></tr>",
        latency_rows, "</table>",
        "<h2>Plots</h2>", *(_image(p) for p in images),
        "<h2>Details</h2>" + _table(details) if details else "",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write(path: Path, result: dict, images: list[Path]) -> None:
    """Write :func:`render`'s page to ``path``."""
    path.write_text(render(result, images), encoding="utf-8")
