"""Two checkouts' servers, paired: time to ready and output tok/s at 1, 8 and 32 concurrent (110
tokens in, 128 out, ``ignore_eos``), A B A B ... so that the machine's drift hits both alike;
medians and the per-round ratios B/A. Run it on an otherwise idle machine.

    git worktree add /tmp/base <commit>
    python benchmarks/serving/ab.py --a /tmp/base --b . [--rounds 3] [-- extra serve options]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from server_process import Server, measure_levels  # noqa: E402

from shoal.model.loader import default_model_path, load_tokenizer  # noqa: E402

PROMPT, OUTPUT = 110, 128
LEVELS = {1: 4, 8: 16, 32: 64}  # concurrency: requests


def one(checkout: Path, log_dir: Path, name: str, extra: list[str]) -> dict:
    t0 = time.monotonic()
    srv = Server(*extra, "--max-num-seqs", "64", log_dir=log_dir, name=name, checkout=checkout)
    try:
        srv.wait_ready()
        ready = time.monotonic() - t0
        levels = measure_levels(srv.url, load_tokenizer(default_model_path()), LEVELS, PROMPT, OUTPUT)
        return {"ready_s": ready, **{c: levels[c]["tok_s"] for c in LEVELS}}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("extra", nargs="*", help="options for both servers (after --)")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for side in ("a", "b"):
                runs[side].append(one(getattr(args, side), Path(tmp), f"{side}{k}", args.extra))
                print(side, k, {key: round(v, 1) for key, v in runs[side][-1].items()}, flush=True)
    keys = ["ready_s", *LEVELS]
    out = {side: {str(key): round(statistics.median(r[key] for r in runs[side]), 2) for key in keys} for side in runs}
    out["b_over_a_median_of_rounds"] = {
        str(key): round(statistics.median(b[key] / a[key] for a, b in zip(runs["a"], runs["b"])), 3) for key in keys}
    out["a_checkout"], out["b_checkout"], out["rounds"] = str(args.a), str(args.b), args.rounds
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
