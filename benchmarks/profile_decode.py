"""Where an engine step's time goes: pure-decode step times at batch 1 / 8 / 32 beside the time of
the model's linear layers alone at that batch (the floor no engine computing the same matmuls goes
under), and the torch profiler's top operators over pure decode steps (prefill excluded).

    python benchmarks/profile_decode.py [--batch 32] [--prompt-len 110] [--dtype auto]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.sampling_params import SamplingParams
from shoal.model.linear import PackedLinear


def decode_steps(engine: Engine, batch: int, prompt_len: int = 110, steps: int = 64,
                 during_decode: contextlib.AbstractContextManager | None = None) -> float:
    """Median seconds of a pure decode step with ``batch`` running requests; ``during_decode``
    (e.g. a profiler) is entered once the prompts are prefilled."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add([1000 + i] + list(range(100, 99 + prompt_len)), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    times = []
    with during_decode or contextlib.nullcontext():
        while engine.has_unfinished():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def linears_only(model: torch.nn.Module, rows: int, head: bool = True, repeats: int = 7) -> float:
    """Median seconds to run every linear layer of ``model`` once on ``rows`` rows, in model order
    (the LM head only if ``head``: a prefill samples one row per prompt): a step's matmuls alone."""
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))
               and (head or m is not model.lm_head)]
    weight = next(model.parameters())
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=weight.dtype, device=weight.device)
              for m in linears}
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            sync()
            t = time.perf_counter()
            for m in linears:
                m(inputs[m.in_features])
            sync()
            times.append(time.perf_counter() - t)
    times = sorted(times[1:])
    return times[len(times) // 2]


def prefill_rate(engine: Engine, prompt_len: int, n: int = 16) -> float:
    """Prompt tokens per second over ``n`` new prompts of ``prompt_len`` tokens, prefilled in the
    engine's chunks (one output token each)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i in range(n):
        engine.add([2000 + i] + list(range(300, 299 + prompt_len)), params)
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return n * prompt_len / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32, help="batch size for the operator profile")
    ap.add_argument("--prompt-len", type=int, default=110)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    engine = Engine(EngineConfig(dtype=args.dtype, max_num_seqs=64))
    print(f"dtype {engine.dtype}, {torch.get_num_threads()} threads, prompts of {args.prompt_len} tokens")
    for b in (1, 8, 32):
        dt = decode_steps(engine, b, args.prompt_len)
        floor = linears_only(engine.model, b)
        print(f"batch {b:3d}: {dt * 1e3:6.1f} ms/step  {b / dt:7.1f} tok/s   "
              f"linears alone {floor * 1e3:6.1f} ms ({floor / dt:.0%} of the step)")
    floor = linears_only(engine.model, 512, head=False)
    rate = prefill_rate(engine, args.prompt_len)
    print(f"prefill: {rate:.0f} tok/s in chunks of {engine.config.max_num_batched_tokens}   "
          f"decoder linears alone on 512 rows {512 / floor:.0f} tok/s ({rate * floor / 512:.0%})")
    prof = torch.profiler.profile()
    dt = decode_steps(engine, args.batch, args.prompt_len, steps=16, during_decode=prof)
    print(f"profiled batch {args.batch}: {dt * 1e3:.1f} ms/step (median, with the profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
