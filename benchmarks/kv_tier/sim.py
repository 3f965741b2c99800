"""The second KV tier in ``shoal sim`` (the engine's scheduler and block manager on the committed
SmolLM2-on-CPU cost model): prefill tokens recomputed per agent program, and job completion time
(JCT), with one tier against two, on multi-turn programs whose working set is 3x the device pool.

Workload: the ``swe`` preset (40 SWE-agent-shaped programs at 0.2 programs/s, tokens scaled by
0.25), one instance. The working set is the peak, over time, of the KV blocks of the final contexts
of the programs in flight, measured in a run whose pool never fills (20,000 blocks); the device
pool is a third of it. The second tier holds the working set (``tier = W``) or only as much as the
pool (``tier = W/3``); its copies cost ``kv_bytes / 5 GB/s`` a block. Both program schedulings are
run (``none``: request-level FCFS, no pins; ``continuum``: pins and program-level FCFS at the
engine's default pin share), so the tier's effect is shown alone and beside the pins.

    python benchmarks/kv_tier/sim.py [--profile PATH] # writes benchmarks/kv_tier/sim.json (about 20 s)

The real-engine runs beside it (`real/`) are `shoal sim --validate --workload agent:agents.jsonl
--num-blocks 112 --kv-tier-blocks 0|338 --program-scheduling none|continuum` on the trace of
`shoal bench agent-trace agents.jsonl --preset swe -n 6 --rate 0.2 --scale-tokens 0.1 --seed 4`.
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

PROGRAMS, RATE, SCALE, BLOCK_SIZE, UNBOUNDED = 40, 0.2, 0.25, 16, 20_000


def run(wl: agent.AgentWorkload, seed: int, blocks: int, tier: int, scheduling: str):
    setup = SimSetup(cost_model=bench_profile(), speeds=[1.0], dispatch="predicted_latency",
                     num_blocks=blocks, num_tier_blocks=tier, seed=seed,
                     programs=ProgramConfig(scheduling=scheduling))
    return setup.run(wl)


def working_set(wl: agent.AgentWorkload, records) -> int:
    """Peak KV blocks of the final contexts of the programs in flight at once."""
    end: dict[str, float] = {}
    for r in records:
        end[r.program_id] = max(end.get(r.program_id, 0.0), r.end_s or 0.0)
    events = []
    for p in wl.programs:
        blocks = -(-(p.context_before(len(p.turns) - 1) + p.turns[-1].output_tokens) // BLOCK_SIZE)
        events += [(p.arrival_s, blocks), (end[p.program_id], -blocks)]
    peak = now = 0
    for _, delta in sorted(events):
        now += delta
        peak = max(peak, now)
    return peak


def compare(seed: int) -> dict:
    wl = agent.AgentWorkload("agent", agent.generate("swe", PROGRAMS, RATE, seed=seed, scale_tokens=SCALE), {"kind": "agent"})
    ws = working_set(wl, run(wl, seed, UNBOUNDED, 0, "none")[1])
    pool = ws // 3
    out: dict = {"seed": seed, "working_set_blocks": ws, "device_blocks": pool, "runs": {}}
    for scheduling in ("none", "continuum"):
        for label, tier in (("one tier", 0), ("tier = W/3", pool), ("tier = W", ws)):
            res = run(wl, seed, pool, tier, scheduling)[0]
            p = res["programs"]
            out["runs"][f"{scheduling}, {label}"] = {
                "jct_mean_s": round(p["jct_s"]["mean"], 1), "jct_p90_s": round(p["jct_s"]["p90"], 1),
                "recomputed_prefill_per_program": round(p["recomputed_prefill_tokens_per_program"]["mean"]),
                "tier_loaded_blocks": res["kv_tier"]["loaded_blocks"], "completed": p["completed"]}
    runs = out["runs"]
    for scheduling in ("none", "continuum"):
        one = runs[f"{scheduling}, one tier"]
        for label in ("tier = W/3", "tier = W"):
            two = runs[f"{scheduling}, {label}"]
            out[f"{scheduling}: recomputed prefill, one tier / {label}"] = round(
                one["recomputed_prefill_per_program"] / max(1, two["recomputed_prefill_per_program"]), 1)
            out[f"{scheduling}: mean JCT, one tier / {label}"] = round(one["jct_mean_s"] / two["jct_mean_s"], 2)
    base = runs["none, one tier"]
    full = runs["continuum, tier = W"]
    out["mean / p90 JCT, none + one tier over continuum + tier = W"] = [
        round(base["jct_mean_s"] / full["jct_mean_s"], 2), round(base["jct_p90_s"] / full["jct_p90_s"], 2)]
    return out


def main() -> None:
    out = {"setup": {"preset": "swe", "programs": PROGRAMS, "rate": RATE, "scale_tokens": SCALE,
                     "cost_model": "committed SmolLM2-135M on 2 CPU cores", "tier_bytes_per_s": 5e9},
           "seeds": [compare(seed) for seed in (1, 2, 3)]}
    path = Path(__file__).with_name("sim.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
