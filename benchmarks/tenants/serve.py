"""Fair share on the real server: ``shoal serve`` (SmolLM2, this machine) under two tenants of equal
weight, ``heavy`` sending 10x ``light``'s rate, together overloading it; ``light``'s P99 TTFT under
``--scheduling-policy fcfs``, ``vtc``, ``vtc --no-fair-first-token``, ``vtc --fair-prefill-tokens 32``
and ``vtc --fair-prefill-stretch 0.3`` and ``0.25`` against the same light requests sent alone, and
total output throughput; the stretches and alone also on two more workload seeds. The tenants are
named by ``user`` (no keys file: equal weights). Run it on an otherwise idle machine (~27 min).

    python benchmarks/tenants/serve.py            # writes benchmarks/tenants/serve.json
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from server_process import Server  # noqa: E402

from shoal.bench import report  # noqa: E402
from shoal.bench.serve import run_workload  # noqa: E402
from shoal.bench.workloads import Workload, synthetic, with_tenants  # noqa: E402
from shoal.model.loader import default_model_path, load_tokenizer  # noqa: E402

RATE, N, PROMPT, OUTPUT = 4.0, 300, 128, 128  # the server serves ~2 req/s of this shape on 2 cores
STRETCHES = {f"vtc_prefill_stretch_{f}": f for f in ("0.3", "0.25")}


def run(name: str, workload: Workload, log_dir: Path, *args: str, checkout: Path | None = None) -> dict:
    """``workload`` through a fresh ``shoal serve *args`` (of ``checkout`` when given; else the installed one)."""
    srv = Server(*args, "--max-waiting", "100000", "--max-model-len", "1024", log_dir=log_dir, name=name,
                 checkout=checkout)
    try:
        srv.wait_ready()
        records, _, duration = asyncio.run(run_workload(srv.url, workload, load_tokenizer(default_model_path()),
                                                        max_duration_s=900))
    finally:
        srv.stop()
    return report.summarize(records, workload.description, 2000, 200, duration_s=duration)


def light_p99(result: dict) -> float:
    return result["tenants"]["by_tenant"]["light"]["ttft_ms"]["p99"]


def mix(seed: int) -> tuple[Workload, Workload]:
    """The 10:1 mix of ``seed``, and its light requests alone."""
    mixed = with_tenants(synthetic("poisson", N, RATE, PROMPT, OUTPUT, seed=seed, len_jitter=0.5),
                         {"heavy": 10, "light": 1}, seed=seed)
    return mixed, mixed.of_tenant("light")


def main() -> None:
    mixed, alone = mix(0)
    vtc = ("--scheduling-policy", "vtc")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"fcfs": run("fcfs", mixed, Path(tmp), "--scheduling-policy", "fcfs"),
                "vtc": run("vtc", mixed, Path(tmp), *vtc),
                "vtc_no_first_token": run("vtc_no_first_token", mixed, Path(tmp), *vtc, "--no-fair-first-token"),
                "vtc_prefill_cap_32": run("vtc_prefill_cap_32", mixed, Path(tmp), *vtc, "--fair-prefill-tokens", "32"),
                **{name: run(name, mixed, Path(tmp), *vtc, "--fair-prefill-stretch", f) for name, f in STRETCHES.items()},
                "light_alone": run("light_alone", alone, Path(tmp), *vtc)}
        # Light sends ~27 requests a run, so its P99 is its slowest one: two more workload seeds,
        # the stretches and alone only.
        more = []
        for seed in (1, 2):
            seed_mixed, seed_alone = mix(seed)
            capped = {name: light_p99(run(f"{name}_seed{seed}", seed_mixed, Path(tmp), *vtc, "--fair-prefill-stretch", f))
                      for name, f in STRETCHES.items()}
            lone_s = light_p99(run(f"light_alone_seed{seed}", seed_alone, Path(tmp), *vtc))
            more.append({"seed": seed, "light_requests": len(seed_alone.requests), "light_alone_p99_ttft_ms": round(lone_s, 1),
                         **{f"{name}_light_p99_ttft_ms": round(p99, 1) for name, p99 in capped.items()},
                         **{f"{name}_light_vs_alone": round(p99 / lone_s, 2) for name, p99 in capped.items()}})
    light = {k: r["tenants"]["by_tenant"]["light"] for k, r in runs.items()}
    lone = light["light_alone"]["ttft_ms"]["p99"]
    mixes = {k: v for k, v in light.items() if k != "light_alone"}
    out = {
        "workload": {"rate": RATE, "num_requests": N, "prompt_len": PROMPT, "output_len": OUTPUT,
                     "len_jitter": 0.5, "tenants": {"heavy": 10, "light": 1},
                     "light_requests": light["light_alone"]["num_requests"]},
        "light_alone_p99_ttft_ms": round(lone, 1),
        **{f"{k}_light_p99_ttft_ms": round(v["ttft_ms"]["p99"], 1) for k, v in mixes.items()},
        **{f"{k}_light_vs_alone": round(v["ttft_ms"]["p99"] / lone, 2) for k, v in mixes.items()},
        "light_p50_ttft_ms": {k: round(v["ttft_ms"]["p50"], 1) for k, v in light.items()},
        "heavy_p50_ttft_ms": {k: round(r["tenants"]["by_tenant"]["heavy"]["ttft_ms"]["p50"], 1) for k, r in runs.items()
                              if k != "light_alone"},
        "output_tok_s": {k: round(r["output_token_throughput"], 1) for k, r in runs.items()},
        **{f"{k}_throughput_vs_fcfs": round(runs[k]["output_token_throughput"] / runs["fcfs"]["output_token_throughput"], 3)
           for k in mixes if k != "fcfs"},
        "failed": {k: r["failed"] for k, r in runs.items()},
        "more_seeds": more,
        **{f"{name}_light_vs_alone_median_of_3_seeds": statistics.median(
            [round(light_p99(runs[name]) / lone, 2)] + [m[f"{name}_light_vs_alone"] for m in more]) for name in STRETCHES},
    }
    Path(__file__).with_name("serve.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
