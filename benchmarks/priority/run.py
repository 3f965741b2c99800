"""Priorities that hold at ``max_num_seqs``: an engine (SmolLM2, bf16) running ``max_num_seqs``
low-priority decodes gets one urgent (priority -1) request; its TTFT is compared with the same
request's on an idle engine. Medians of 5 trials.

    python benchmarks/priority/run.py
"""

from __future__ import annotations

import json
import statistics
import time

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.sampling_params import SamplingParams

SEQS = 8


def ttft(engine: Engine, busy: bool) -> float:
    tok = engine.tokenizer
    ids = tok.encode("Write a long story about a lighthouse keeper.")
    if busy:
        for i in range(SEQS):
            engine.add(ids, SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True), req_id=f"low{i}", priority=1)
        for _ in range(5):
            engine.step()
    t0 = time.perf_counter()
    engine.add(ids, SamplingParams(temperature=0.0, max_tokens=1), req_id="urgent", priority=-1)
    while True:
        if any(o.req_id == "urgent" and o.new_token_ids for o in engine.step()):
            took = time.perf_counter() - t0
            break
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return took


def main() -> None:
    engine = Engine(EngineConfig(dtype="bfloat16", max_num_seqs=SEQS, max_model_len=1024, kv_cache_gb=0.25))
    idle = [ttft(engine, False) for _ in range(5)]
    busy = [ttft(engine, True) for _ in range(5)]
    result = {"max_num_seqs": SEQS, "idle_ttft_ms": round(statistics.median(idle) * 1e3, 1),
              "full_ttft_ms": round(statistics.median(busy) * 1e3, 1),
              "ratio": round(statistics.median(busy) / statistics.median(idle), 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
