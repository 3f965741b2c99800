"""Fair share between tenants in ``shoal sim`` (the engine's scheduler on the committed SmolLM2-on-CPU
cost model, one instance): the targets of the tenants issue.

1. Two tenants of equal weight, ``heavy`` sending 10x ``light``'s rate, together overloading the
   instance: ``light``'s P99 TTFT under FCFS, under VTC, and under VTC without first-token steps
   (``fair_first_token=False``) and under VTC with the prefill of the tenant ahead capped
   (``fair_prefill_tokens`` 32 and 64, ``fair_prefill_stretch`` 0.3 and 0.25), against the same light requests
   run alone, and total output throughput of each against FCFS; five seeds, with the medians of the
   ratios. The same on a prefill-heavy mix (1,024-token prompts, 64 out; CPU, five seeds).
2. Weighted 3:1 tenants (``gold`` weight 3, ``bronze`` 1, equal arrival rates) under saturation:
   tokens served to each while both still send.
3. The cost of switching: preemptions and swapped-out bytes per served output token, VTC with
   fairness preemption by resident swaps (the victim's cached prefix stays in the prefix cache), the
   same with whole-request swaps, and without fairness preemption.

    python benchmarks/tenants/sim.py [--profile PATH]   # writes benchmarks/tenants/sim.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from shoal.bench.workloads import synthetic, with_tenants
from shoal.engine.metadata import SLO
from shoal.sim.catalog import RooflineCostModel, gpus, model_shape
from shoal.sim.experiment import SimSetup

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_profile import bench_profile  # noqa: E402

N, PROMPT, OUTPUT = 1200, 128, 128
PREFILL_CAPS = {"vtc_prefill_cap_32": {"fair_prefill_tokens": 32}, "vtc_prefill_cap_64": {"fair_prefill_tokens": 64},
                "vtc_prefill_stretch_0.3": {"fair_prefill_stretch": 0.3},
                "vtc_prefill_stretch_0.25": {"fair_prefill_stretch": 0.25}}


def cpu_smollm2(policy: str, **kw) -> SimSetup:
    """The committed SmolLM2-135M-on-2-CPU-cores profile (serves ~4 req/s of this shape)."""
    kw.setdefault("slo", SLO(2.0, 0.2))
    return SimSetup(cost_model=bench_profile(), speeds=[1.0], dispatch="round_robin",
                    scheduling_policy=policy, **kw)


def a100_llama3_8b(policy: str, **kw) -> SimSetup:
    """Llama-3-8B on an A100-80G by the planner's roofline model (serves ~25 req/s of this shape)."""
    cost = RooflineCostModel(gpus()["A100-80G"], model_shape("llama-3-8b"))
    return SimSetup(cost_model=cost, speeds=[1.0], dispatch="round_robin", slo=SLO(2.0, 0.2),
                    scheduling_policy=policy, num_blocks=cost.kv_blocks(), **kw)


def light_p99(result: dict) -> float:
    return result["tenants"]["by_tenant"]["light"]["ttft_ms"]["p99"]


def ten_to_one_seed(setup, rate: float, seed: int, n: int = N, prompt: int = PROMPT, output: int = OUTPUT) -> dict:
    mixed = with_tenants(synthetic("poisson", n, rate, prompt, output, seed=seed, len_jitter=0.5),
                         {"heavy": 10, "light": 1}, seed=seed)
    alone = mixed.of_tenant("light")
    capped = [(name, "vtc", kw, mixed) for name, kw in PREFILL_CAPS.items()]
    runs = {name: setup(pol, **kw).run(wl)[0] for name, pol, kw, wl in (
        ("fcfs", "fcfs", {}, mixed), ("vtc", "vtc", {}, mixed),
        ("vtc_no_first_token", "vtc", {"fair_first_token": False}, mixed), *capped, ("light_alone", "fcfs", {}, alone))}
    lone = light_p99(runs["light_alone"])
    mixes = ("fcfs", "vtc", "vtc_no_first_token", *(name for name, *_ in capped))
    return {
        "seed": seed,
        "light_alone_p99_ttft_ms": round(lone, 1),
        **{f"{name}_light_p99_ttft_ms": round(light_p99(runs[name]), 1) for name in mixes},
        **{f"{name}_light_vs_alone": round(light_p99(runs[name]) / lone, 2) for name in mixes},
        **{f"{name}_throughput_vs_fcfs": round(runs[name]["output_token_throughput"] / runs["fcfs"]["output_token_throughput"], 3)
           for name in mixes[1:]},
        "heavy_p50_ttft_ms": {name: round(runs[name]["tenants"]["by_tenant"]["heavy"]["ttft_ms"]["p50"], 1) for name in mixes},
        "vtc_preemptions": runs["vtc"]["preemptions"],
        "vtc_tpot_p99_ms": round(runs["vtc"]["tpot_ms"]["p99"], 1),
        "vtc_no_first_token_tpot_p99_ms": round(runs["vtc_no_first_token"]["tpot_ms"]["p99"], 1),
        "alone_tpot_p50_ms": round(runs["light_alone"]["tpot_ms"]["p50"], 1),
    }


def ten_to_one(setup, rate: float, seeds: range = range(5), **shape: int) -> dict:
    """Each seed's figures, and the medians over seeds of the ratios (one seed's P99 rests on the
    slowest one or two of ~120 light requests); ``shape``: ``n``, ``prompt``, ``output``."""
    rows = [ten_to_one_seed(setup, rate, seed, **shape) for seed in seeds]
    keys = ("vtc_light_vs_alone", "vtc_no_first_token_light_vs_alone", "fcfs_light_vs_alone", "vtc_throughput_vs_fcfs",
            *(f"{name}_{what}" for name in PREFILL_CAPS for what in ("light_vs_alone", "throughput_vs_fcfs")))
    return {"rate": rate, "median_over_seeds": {k: round(statistics.median(r[k] for r in rows), 3) for k in keys},
            "seeds": rows}


def main() -> None:
    out = {"workload": {"num_requests": N, "prompt_len": PROMPT, "output_len": OUTPUT, "len_jitter": 0.5,
                        "tenants": {"heavy": 10, "light": 1}},
           "ten_to_one": {"cpu_smollm2": ten_to_one(cpu_smollm2, 8.0), "a100_llama3_8b": ten_to_one(a100_llama3_8b, 50.0)},
           # Prefill-heavy (1,024-token prompts, 64 out): where a prefill cap does not help.
           "prefill_heavy_cpu_smollm2": {"prompt_len": 1024, "output_len": 64,
                                         **ten_to_one(cpu_smollm2, 2.0, n=400, prompt=1024, output=64)}}
    weighted = with_tenants(synthetic("poisson", N, 8.0, PROMPT, OUTPUT, seed=1, len_jitter=0.5),
                            {"gold": 1, "bronze": 1}, {"gold": 3, "bronze": 1}, seed=1)
    w = cpu_smollm2("vtc").run(weighted)[0]["tenants"]
    served = {t: w["by_tenant"][t]["tokens_served_while_all_send"] for t in ("gold", "bronze")}
    out["weighted_3_to_1"] = {"window_s": round(w["window_s"], 1), "tokens_served": served,
                              "ratio": round(served["gold"] / served["bronze"], 3)}
    # Long outputs hold the slots: fairness preemption has something to do.
    long = with_tenants(synthetic("poisson", 300, 1.0, PROMPT, 512, seed=2, len_jitter=0.5),
                        {"heavy": 10, "light": 1}, seed=2)
    switching = {}
    for name, policy, gap, resident in (("vtc_fair_preemption", "vtc", 2048, True),
                                        ("vtc_fair_preemption_whole_swaps", "vtc", 2048, False),
                                        ("vtc_no_preemption", "vtc", None, True), ("fcfs", "fcfs", None, True)):
        r = cpu_smollm2(policy, max_num_seqs=16, fair_preempt_tokens=gap, resident_swap=resident).run(long)[0]
        tokens = r["output_token_throughput"] * r["duration_s"]
        switching[name] = {"light_p99_ttft_ms": round(light_p99(r), 1), "preemptions": r["preemptions"],
                           "preemptions_per_1k_tokens": round(1e3 * r["preemptions"] / tokens, 3),
                           "swapped_bytes_per_token": round(r["swapped_out_bytes"] / tokens, 1)}
    out["switching"] = switching
    path = Path(__file__).with_name("sim.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
