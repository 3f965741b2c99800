"""The cost model a simulated benchmark runs on: ``--profile PATH`` on its command line, else the
committed profile (``benchmarks/profiles/`` keeps earlier ones, on which older figures were made)."""

from __future__ import annotations

import argparse
import functools

from shoal.engine.cost_model import LinearCostModel, default_profile_path


@functools.cache
def bench_profile() -> LinearCostModel:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--profile", default=None)
    args, _ = ap.parse_known_args()
    return LinearCostModel.load(args.profile or default_profile_path())
