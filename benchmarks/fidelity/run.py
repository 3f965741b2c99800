"""Is the simulator right on this machine? Each workload runs on the real engine (one instance,
in process, open loop) and in the simulator on the cost profile; prints the relative errors of
TTFT, TPOT and E2E at p50 and p90, how far the cost model prices the real steps off, and the
errors again with a cost model fitted on the run's own steps (what is left is the scheduling), with
the profile scaled to the machine's pace during each run (one number: the real steps' time against
the profile's price of them; this machine's pace drifts by ~25% within minutes) and, for the later
workloads, with the one fitted on the first slice's steps (out of sample). ``--rescore RESULT``
adds the pace-scaled errors to a stored result without running the engine again.

    python benchmarks/fidelity/run.py [--profile PATH] [--also-profile PATH ...] [--real-runs N]
        [--rescore RESULT] [--out benchmarks/fidelity/result.json]

Workloads: two slices of the Azure conversation trace (its first 50 requests and 50 from half an
hour in; time scale 8, clipped to 1,024 tokens: the README's fidelity command) and one
prefill-heavy synthetic workload (Poisson, 900-token prompts, 16-token outputs). Run it on an
otherwise idle machine: the real runs are timed by the wall clock. With ``--real-runs N`` each
workload runs N times on the real engine; the spread of those runs is the floor under any
simulator's error on that workload.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from shoal.bench.workloads import Workload, load_trace, synthetic
from shoal.engine.config import EngineConfig
from shoal.engine.cost_model import CostModel, LinearCostModel, ScaledCostModel, default_profile_path
from shoal.engine.engine import Engine
from shoal.sim.validate import COMPARED, compare, metric_row, quantile, simulated_summary

TRACE = Path(__file__).resolve().parents[2].parent / "shared/data/traces/azure_conv_2023.csv"
SLO = (5000.0, 200.0)  # TTFT, TPOT ms


def _line(label: str, metrics: dict) -> str:
    return f"{label:42s} " + "  ".join(f"{k} {v['rel_error']:.1%}" for k, v in metrics.items())


def at_its_pace(wl: Workload, engine: Engine, cm: CostModel, run: dict) -> dict:
    """One real run against the simulator on ``cm`` scaled to the machine's pace during that run
    (the real steps' time against the profile's price of the same steps, one number): the error
    left once the machine's speed of the moment is taken out."""
    pace = run["step_time"]["predicted_s"] / run["step_time"]["real_s"]
    s = simulated_summary(wl, engine, ScaledCostModel(cm, pace), SLO)
    return {"pace": pace, "metrics": {k: metric_row(run["metrics"][k]["real_ms"], quantile(s, k), "ms") for k in COMPARED}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--real-runs", type=int, default=1,
                    help="real runs of each workload: with 2 or more, also their own spread and the errors "
                         "against their median (the simulator is deterministic)")
    ap.add_argument("--also-profile", type=Path, action="append", default=[],
                    help="another profile to simulate each workload with, against the same real runs")
    ap.add_argument("--rescore", type=Path, default=None,
                    help="no real runs: add each stored run's errors at its pace to this result file (--out)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
    args = ap.parse_args()
    cm = LinearCostModel.load(args.profile or default_profile_path())
    others = {f"profile {p.name}": LinearCostModel.load(p) for p in args.also_profile}
    workloads = {
        "conv trace, first 50": load_trace(TRACE, time_scale=8, max_context=1024, num_requests=50),
        "conv trace, 50 from 1800 s": load_trace(TRACE, time_scale=8, max_context=1024, num_requests=50, start_s=1800),
        "prefill-heavy poisson (900 in / 16 out)": synthetic("poisson", 30, 0.5, 900, 16, seed=0),
    }
    if args.rescore is not None:
        stored, engine = json.loads(args.rescore.read_text()), Engine(EngineConfig(num_blocks=2800))
        for name, summary in stored["workloads"].items():
            for run in summary["runs"]:
                run["at_its_pace"] = paced = at_its_pace(workloads[name], engine, cm, run)
                print(_line(f"{name[:28]} at its pace {paced['pace']:.3f}", paced["metrics"]), flush=True)
        args.out.write_text(json.dumps(stored, indent=2))
        print(f"wrote {args.out}")
        return
    out = {"profile": {"device": cm.device, "fit": cm.fit}, "real_runs": args.real_runs, "workloads": {}}
    first_fit = None  # the cost model calibrated on the first slice's steps, tried on the others
    for name, wl in workloads.items():
        runs = []
        for _ in range(args.real_runs):
            engine = Engine(EngineConfig(num_blocks=2800))
            also = {**others, **({"calibrated on conv slice 1": first_fit} if first_fit is not None else {})}
            fid = compare(wl, engine, cm, SLO, also=also)
            fid["at_its_pace"] = paced = at_its_pace(wl, engine, cm, fid)
            runs.append(fid)
            print(f"{_line(name, fid['metrics'])}  (steps priced {fid['step_time']['rel_error']:+.1%})", flush=True)
            print(_line(f"  at this run's pace ({paced['pace']:.3f})", paced["metrics"]), flush=True)
            if "calibrated" in fid:
                print(_line("  calibrated on its own steps", fid["calibrated"]["metrics"]), flush=True)
            for label, other in fid.get("also", {}).items():
                print(f"{_line('  ' + label, other['metrics'])}  (steps priced {other['step_time']['rel_error']:+.1%})",
                      flush=True)
        if first_fit is None and "calibrated" in runs[0]:
            first_fit = LinearCostModel.from_dict(runs[0]["calibrated"]["cost_model"])
        out["workloads"][name] = summary = {"runs": runs}
        if len(runs) > 1:
            real = {k: [r["metrics"][k]["real_ms"] for r in runs] for k in runs[0]["metrics"]}
            summary["real_spread"] = {k: max(v) / min(v) - 1 for k, v in real.items()}
            summary["vs_median_real"] = {k: metric_row(statistics.median(v), runs[0]["metrics"][k]["sim_ms"], "ms")
                                         for k, v in real.items()}
            print(f"{'  real runs against each other (max/min-1)':42s} "
                  + "  ".join(f"{k} {v:.1%}" for k, v in summary["real_spread"].items()), flush=True)
            print(_line("  simulator against their median", summary["vs_median_real"]), flush=True)
            for label in others:
                summary.setdefault("also_vs_median_real", {})[label] = row = {
                    k: metric_row(statistics.median(v), runs[0]["also"][label]["metrics"][k]["sim_ms"], "ms")
                    for k, v in real.items()}
                print(_line(f"  {label} against their median", row), flush=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
