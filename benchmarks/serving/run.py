"""The server against the engine: output tok/s of ``shoal serve`` with the engine core in a thread of
the server and in its own process (``--engine-process``), against the offline engine on the same
prompts (110 tokens in, 128 out, ``ignore_eos``), at 1, 8 and 32 concurrent; and each server mode
with a neighbour process spinning on one core. Run it on an otherwise idle machine.

The machine drifts by 15-30% between minutes, so the engine process is measured in ``--rounds``
paired rounds (offline, then the server, each round), and its fraction of offline is the median of
the rounds' ratios; the thread mode and the neighbour runs are measured once.

    python benchmarks/serving/run.py [--rounds 3]   # writes benchmarks/serving/result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from server_process import Server, measure_levels  # noqa: E402

from shoal.bench.offline import run_offline_bench  # noqa: E402
from shoal.engine.config import EngineConfig  # noqa: E402
from shoal.engine.engine import Engine  # noqa: E402
from shoal.model.loader import default_model_path, load_tokenizer  # noqa: E402

PROMPT, OUTPUT = 110, 128
LEVELS = {1: 4, 8: 16, 32: 64}  # concurrency: requests


def offline() -> dict[int, float]:
    engine = Engine(EngineConfig(max_num_seqs=64))
    return {c: run_offline_bench(engine, num_requests=n, concurrency=c, input_len=PROMPT,
                                 output_len=OUTPUT)["output_token_throughput"] for c, n in LEVELS.items()}


def spin() -> None:
    while True:
        pass


def served(mode: str, log_dir: Path, levels: dict[int, int], neighbour: bool = False, extra: tuple[str, ...] = ()) -> dict:
    args = ["--engine-process" if mode == "process" else "--engine-thread", *extra]
    t0 = time.monotonic()
    srv = Server(*args, "--max-num-seqs", "64", log_dir=log_dir, name=f"{mode}{'-busy' if neighbour else ''}")
    hog = None
    try:
        srv.wait_ready()
        ready_s = time.monotonic() - t0
        tok = load_tokenizer(default_model_path())
        if neighbour:
            hog = multiprocessing.Process(target=spin, daemon=True)
            hog.start()
        out = {"ready_s": round(ready_s, 1), **measure_levels(srv.url, tok, levels, PROMPT, OUTPUT)}
        return out
    finally:
        if hog is not None:
            hog.kill()
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="paired offline / engine-process rounds")
    args = ap.parse_args()
    out: dict = {"rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            round_ = {"offline_tok_s": offline(), "process": served("process", Path(tmp), LEVELS)}
            round_["process_vs_offline"] = {c: round(round_["process"][c]["tok_s"] / round_["offline_tok_s"][c], 3)
                                            for c in LEVELS}
            print(json.dumps(round_), flush=True)
            out["rounds"].append(round_)
        out["thread"] = served("thread", Path(tmp), LEVELS)
        for mode in ("thread", "process"):
            out[f"{mode}_with_neighbour"] = served(mode, Path(tmp), {32: 64}, neighbour=True)
    rounds = out["rounds"]
    out["process_vs_offline_median"] = {c: statistics.median(r["process_vs_offline"][c] for r in rounds) for c in LEVELS}
    out["thread_vs_offline"] = {c: round(out["thread"][c]["tok_s"] / rounds[-1]["offline_tok_s"][c], 3) for c in LEVELS}
    for mode, idle in (("thread", out["thread"]), ("process", rounds[-1]["process"])):
        out[f"{mode}_busy_vs_idle_32"] = round(out[f"{mode}_with_neighbour"][32]["tok_s"] / idle[32]["tok_s"], 3)
    path = Path(__file__).with_name("result.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
