"""Is the simulator right on this machine? Each workload runs on the real engine (one instance,
in process, open loop) and in the simulator on the cost profile; prints the relative errors of
TTFT, TPOT and E2E at p50 and p90, how far the cost model prices the real steps off, and the
errors again with a cost model fitted on the run's own steps (what is left is the scheduling) and,
for the later workloads, with the one fitted on the first slice's steps (out of sample).

    python benchmarks/fidelity/run.py [--profile PATH] [--out benchmarks/fidelity/result.json]

Workloads: two slices of the Azure conversation trace (its first 50 requests and 50 from half an
hour in; time scale 8, clipped to 1,024 tokens: the README's fidelity command) and one
prefill-heavy synthetic workload (Poisson, 900-token prompts, 16-token outputs). Run it on an
otherwise idle machine: the real runs are timed by the wall clock.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shoal.bench.workloads import load_trace, synthetic
from shoal.engine.config import EngineConfig
from shoal.engine.cost_model import LinearCostModel, default_profile_path
from shoal.engine.engine import Engine
from shoal.sim.validate import compare

TRACE = Path(__file__).resolve().parents[2].parent / "shared/data/traces/azure_conv_2023.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
    args = ap.parse_args()
    cm = LinearCostModel.load(args.profile or default_profile_path())
    workloads = {
        "conv trace, first 50": load_trace(TRACE, time_scale=8, max_context=1024, num_requests=50),
        "conv trace, 50 from 1800 s": load_trace(TRACE, time_scale=8, max_context=1024, num_requests=50, start_s=1800),
        "prefill-heavy poisson (900 in / 16 out)": synthetic("poisson", 30, 0.5, 900, 16, seed=0),
    }
    out = {"profile": {"device": cm.device, "fit": cm.fit}, "workloads": {}}
    first_fit = None  # the cost model calibrated on the first slice's steps, tried on the others
    for name, wl in workloads.items():
        engine = Engine(EngineConfig(num_blocks=2800))
        also = {"calibrated on conv slice 1": first_fit} if first_fit is not None else None
        fid = compare(wl, engine, cm, (5000.0, 200.0), also=also)
        if first_fit is None and "calibrated" in fid:
            first_fit = LinearCostModel.from_dict(fid["calibrated"]["cost_model"])
        out["workloads"][name] = fid
        errs = "  ".join(f"{k} {v['rel_error']:.1%}" for k, v in fid["metrics"].items())
        print(f"{name:42s} {errs}  (steps priced {fid['step_time']['rel_error']:+.1%})", flush=True)
        if "calibrated" in fid:
            errs = "  ".join(f"{k} {v['rel_error']:.1%}" for k, v in fid["calibrated"]["metrics"].items())
            print(f"{'  calibrated on its own steps':42s} {errs}", flush=True)
        for label, other in fid.get("also", {}).items():
            errs = "  ".join(f"{k} {v['rel_error']:.1%}" for k, v in other["metrics"].items())
            print(f"{'  ' + label:42s} {errs}", flush=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
