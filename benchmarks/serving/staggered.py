"""In-process decode throughput with a batch that keeps changing: C requests in flight, the first C
ending at 4, 8, ..., 128 tokens (110-token prompts) and the rest at 128, so a request joins and one
leaves every few steps, as on a busy server. Prints output tok/s, the median step and how many steps
regathered the whole carried decode K/V (``engine/decode_kv.py``). Run it on an otherwise idle machine;
to compare two checkouts, alternate them:

    git worktree add /tmp/base <commit>
    for i in 1 2 3; do PYTHONPATH=/tmp/base python benchmarks/serving/staggered.py; python benchmarks/serving/staggered.py; done
"""

from __future__ import annotations

import argparse
import statistics
import time

from shoal.bench.offline import make_prompts
from shoal.engine.sampling_params import SamplingParams
from shoal.llm import LLM

PROMPT, OUTPUT = 110, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--concurrency", type=int, default=32)
    ap.add_argument("-n", "--num-requests", type=int, default=160)
    args = ap.parse_args()
    conc = args.concurrency
    engine = LLM().engine
    prompts = make_prompts(engine.tokenizer, engine.model_config.vocab_size, args.num_requests, PROMPT)
    engine.add(prompts[0][:16], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))  # warm up
    while engine.has_unfinished():
        engine.step()
    plans = []
    buffer = engine.runner.decode_kv
    planned = buffer.plan
    buffer.plan = lambda *a, **k: plans.append(p := planned(*a, **k)) or p
    queue, in_flight, tokens, steps = list(range(len(prompts))), 0, 0, []
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and in_flight < conc:
            i = queue.pop(0)
            length = min(OUTPUT, 4 * (i + 1)) if i < conc else OUTPUT
            engine.add(prompts[i], SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True))
            in_flight += 1
        t = time.perf_counter()
        for out in engine.step():
            tokens += len(out.new_token_ids)
            in_flight -= out.finished
        steps.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    rebuilt = sum(p is None or p.rebuild for p in plans)
    print(f"{conc} in flight: {tokens / elapsed:.1f} tok/s, {len(steps)} steps, median step "
          f"{1000 * statistics.median(steps):.1f} ms, whole decode K/V gathered on {rebuilt} of {len(plans)}")


if __name__ == "__main__":
    main()
