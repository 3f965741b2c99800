"""Agent programs in ``shoal sim`` (the engine's scheduler on the committed SmolLM2-on-CPU cost
model): mean and p90 job completion time (JCT) with program-level FCFS + KV time-to-live pins
(``continuum``) against request-level FCFS with no pins (``none``, the baseline), and the prompt
tokens each program prefilled again.

Workload: the ``swe`` preset (SWE-agent-shaped programs, tokens scaled by 0.25 for a 135M model on
CPU), at a load where the baseline's KV is contended: 1 instance with 800 KV blocks at 0.2
programs/s, and 16 instances (the same per-instance load: 3.2 programs/s, predicted-latency
dispatch, which keeps a program's turns on the instance holding its KV). Pins take the engine's
default share of the pool (``ProgramConfig().max_pinned_fraction``). Then the pool sweep: 10
programs on one instance with pools of 200, 300 and 400 blocks, from smaller than the working set
up, where pins cost more than they save.

    python benchmarks/agent/sim.py [--profile PATH]   # writes benchmarks/agent/sim.json (about 2 minutes)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shoal.bench import agent
from shoal.engine.programs import ProgramConfig
from shoal.sim.experiment import SimSetup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_profile import bench_profile  # noqa: E402

PER_INSTANCE_RATE, PROGRAMS_PER_INSTANCE, BLOCKS, SCALE = 0.2, 40, 800, 0.25


def compare(instances: int, seed: int, programs_per_instance: int = PROGRAMS_PER_INSTANCE, blocks: int = BLOCKS) -> dict:
    programs = agent.generate("swe", programs_per_instance * instances, PER_INSTANCE_RATE * instances, seed=seed,
                              scale_tokens=SCALE)
    wl = agent.AgentWorkload("agent", programs, {"kind": "agent", "preset": "swe"})
    runs = {}
    for sched in ("none", "continuum"):
        setup = SimSetup(cost_model=bench_profile(), speeds=[1.0] * instances,
                         dispatch="predicted_latency", num_blocks=blocks,
                         programs=ProgramConfig(scheduling=sched), seed=seed)
        runs[sched] = setup.run(wl)[0]["programs"]
    base, cont = runs["none"], runs["continuum"]
    return {
        "instances": instances, "num_blocks": blocks, "programs": len(programs), "turns": wl.num_turns, "seed": seed,
        **{f"{name}_jct_s": {q: round(r["jct_s"][q], 1) for q in ("mean", "p50", "p90", "p99")}
           for name, r in runs.items()},
        **{f"{name}_recomputed_prefill_per_program": round(r["recomputed_prefill_tokens_per_program"]["mean"])
           for name, r in runs.items()},
        "continuum_pins": {k: cont[k] for k in ("pins", "pin_hits", "expired", "yielded", "displaced")},
        "mean_jct_speedup": round(base["jct_s"]["mean"] / cont["jct_s"]["mean"], 2),
        "p90_jct_speedup": round(base["jct_s"]["p90"] / cont["jct_s"]["p90"], 2),
        "completed": {name: r["completed"] for name, r in runs.items()},
    }


def main() -> None:
    out = {"setup": {"preset": "swe", "scale_tokens": SCALE, "per_instance_rate": PER_INSTANCE_RATE,
                     "programs_per_instance": PROGRAMS_PER_INSTANCE, "num_blocks": BLOCKS,
                     "max_pinned_fraction": ProgramConfig().max_pinned_fraction,
                     "cost_model": "committed SmolLM2-135M on 2 CPU cores"},
           "runs": [compare(1, seed) for seed in (1, 2, 3)] + [compare(16, 1)],
           "pool_sweep": [compare(1, seed, 10, blocks) for seed in (4, 5) for blocks in (200, 300, 400)]}
    path = Path(__file__).with_name("sim.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
