"""Capacity (DistServe's: the busiest arrival rate at which >= 90% of requests meet both SLOs) of
the simulated 16-instance cluster on the Azure conversation trace, for the baseline and for each
of the control plane's pieces alone and together; then every configuration's latency at the
baseline's capacity rate. Homogeneous, and heterogeneous (8 instances at half speed).

    python benchmarks/capacity/run.py [--requests 3000] [--fleet homogeneous] [--profile PATH] [--out benchmarks/capacity/result.json]

The README's figures were made on the 2026-12-02 profile: ``--profile benchmarks/profiles/smollm2_cpu_2026-12-02.json``.

Everything runs on the simulator's virtual clock, so the figures do not depend on how busy the
machine is (only ``sim_wall_s`` does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shoal.bench.workloads import load_trace
from shoal.engine.cost_model import LinearCostModel, default_profile_path
from shoal.engine.metadata import SLO
from shoal.sim.capacity import find_capacity
from shoal.sim.experiment import SimSetup, parse_speeds

TRACE = Path(__file__).resolve().parents[2].parent / "shared/data/traces/azure_conv_2023.csv"
CONFIGS = {  # name: (dispatch, SLO-sized steps, deadline admission, live migration)
    "baseline: round_robin, fixed 512 budget": ("round_robin", False, False, "none"),
    "predicted_latency": ("predicted_latency", False, False, "none"),
    "slo budget (round_robin)": ("round_robin", True, False, "none"),
    "predicted_latency + slo budget + deadline admission": ("predicted_latency", True, True, "none"),
    "... + llumnix migration, every move": ("predicted_latency", True, True, "llumnix_ungated"),
    "... + llumnix migration, moves gated by predicted benefit (default)": ("predicted_latency", True, True, "llumnix"),
}

FLEETS = {"homogeneous": ("homogeneous", "16x1"), "heterogeneous": ("heterogeneous (8 at half speed)", "8x1,8x0.5")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
    ap.add_argument("--fleet", choices=[*FLEETS, "all"], default="all")
    ap.add_argument("--profile", type=Path, default=None, help="cost model (default: the committed profile)")
    args = ap.parse_args()
    cm = LinearCostModel.load(args.profile or default_profile_path())
    slo = SLO(5.0, 0.2)

    def workload(ts: float):
        return load_trace(TRACE, time_scale=ts, max_context=2048, num_requests=args.requests)

    out: dict = {"trace": TRACE.name, "requests": args.requests, "instances": 16, "num_blocks": 800,
                 "slo_ms": [5000, 200], "attainment_target": 0.9, "fleets": {}}
    for key, (fleet, speeds) in FLEETS.items():
        if args.fleet not in ("all", key):
            continue
        rows, base_ts = {}, None
        for name, (dispatch, steps, deadlines, migration) in CONFIGS.items():
            setup = SimSetup(cm, parse_speeds(speeds, 16), dispatch, migration=migration, slo=slo, slo_steps=steps,
                             deadlines=deadlines, num_blocks=800)
            found = find_capacity(lambda ts: setup.run(workload(ts))[0], 0.9, lo=0.5, hi=4.0, rel_tol=0.05)
            rows[name] = {"setup": setup, "time_scale": found.time_scale if found else None,
                          "rate_rps": found.rate_rps if found else 0.0}
            base_ts = base_ts or (found.time_scale if found else None)
            print(f"{fleet:34s} {name:55s} capacity {rows[name]['rate_rps']:.2f} req/s (time scale "
                  f"{rows[name]['time_scale']})", flush=True)
        base = rows[next(iter(CONFIGS))]
        table = {}
        for name, row in rows.items():
            at_base = row["setup"].run(workload(base_ts))[0]
            table[name] = {
                "capacity_rps": row["rate_rps"], "capacity_time_scale": row["time_scale"],
                "capacity_x_baseline": row["rate_rps"] / base["rate_rps"] if base["rate_rps"] else None,
                "at_baseline_capacity": {k: at_base[k] for k in ("slo_attainment", "goodput_rps", "ttft_ms", "tpot_ms")},
                "migrations_at_baseline_capacity": {"done": at_base["migrations"]["done"],
                                                    "by_reason": at_base["migrations"]["by_reason"],
                                                    "declined": at_base["migrations_declined"]},
            }
            p99 = table[name]["at_baseline_capacity"]["ttft_ms"]["p99"]
            print(f"  at the baseline's capacity: {name:55s} attainment {at_base['slo_attainment']:.3f} "
                  f"TTFT p99 {p99:.0f} ms, migrations {at_base['migrations']['done']} "
                  f"(declined {sum(sum(w.values()) for w in at_base['migrations_declined'].values())})", flush=True)
        base_p99 = table[next(iter(CONFIGS))]["at_baseline_capacity"]["ttft_ms"]["p99"]
        for row in table.values():
            row["ttft_p99_x_lower_than_baseline"] = base_p99 / row["at_baseline_capacity"]["ttft_ms"]["p99"]
        out["fleets"][fleet] = {"speeds": speeds, "baseline_time_scale": base_ts, "configs": table}
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
