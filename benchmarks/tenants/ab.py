"""Two checkouts' servers, paired, on the tenants benchmark's 10:1 mix (``serve.py``): light's P99
TTFT and output tok/s under ``vtc`` with the given options, for workload seeds 0-2, the two
checkouts alternated within each seed (the order flipping from seed to seed and round to round) so
that the machine's drift hits both alike; the per-seed ratios B/A and their medians. ~7 min per
seed and round, on an otherwise idle machine.

    git worktree add /tmp/base <commit>
    python benchmarks/tenants/ab.py --a /tmp/base --b . [--rounds 1] [-- --fair-prefill-stretch 0.3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve import light_p99, mix, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("extra", nargs="*", help="shoal serve options for both (after --)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for seed in (0, 1, 2):
                mixed, _ = mix(seed)
                order = ("a", "b") if (rnd + seed) % 2 == 0 else ("b", "a")
                got = {}
                for side in order:
                    r = run(f"{side}_seed{seed}_round{rnd}", mixed, Path(tmp), "--scheduling-policy", "vtc", *args.extra,
                            checkout=getattr(args, side))
                    got[side] = {"light_p99_ttft_ms": round(light_p99(r), 1), "tok_s": round(r["output_token_throughput"], 1)}
                rows.append({"round": rnd, "seed": seed, **got,
                             "light_p99_b_over_a": round(got["b"]["light_p99_ttft_ms"] / got["a"]["light_p99_ttft_ms"], 3),
                             "tok_s_b_over_a": round(got["b"]["tok_s"] / got["a"]["tok_s"], 3)})
                print(json.dumps(rows[-1]), flush=True)
    out = {"a": str(args.a), "b": str(args.b), "extra": args.extra, "rows": rows,
           **{f"median_{k}": statistics.median(r[k] for r in rows) for k in ("light_p99_b_over_a", "tok_s_b_over_a")}}
    Path(__file__).with_name("ab.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
