"""``shoal profile``: time the real engine's steps over a grid of batch shapes and fit a cost model."""

from __future__ import annotations

import time

import numpy as np

from shoal.engine.engine import Engine
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.cost_model import FEATURES, LinearCostModel, plan_features
from shoal.progress import Progress

DECODES = (0, 1, 2, 4, 8, 16, 32)
CONTEXTS = (64, 256, 768)
PREFILLS = (0, 16, 64, 256, 512)


def _timed_step(engine: Engine) -> tuple[list[float], float]:
    t = time.perf_counter()
    engine.step()
    dt = time.perf_counter() - t
    return plan_features(engine.last_plan), dt


def profile_engine(engine: Engine, repeats: int = 3, decodes=DECODES, contexts=CONTEXTS,
                   prefills=PREFILLS, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Measure steps with ``d`` running decodes at context ``c`` plus a prefill chunk of ``p``
    tokens, for every grid point (``progress`` hears of each). Returns (features, seconds)."""
    vocab = engine.vocab_size
    rng = np.random.default_rng(0)
    feats, secs = [], []
    long = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    grid = [(d, c) for d in decodes for c in contexts if d or c == contexts[0]]
    for k, (d, c) in enumerate(grid):
        ids = [engine.add(rng.integers(1, vocab, c).tolist(), long) for _ in range(d)]
        while any(engine.requests[i].is_prefilling or engine.requests[i].num_computed_tokens == 0 for i in ids):
            engine.step()
        for p in prefills:
            for _ in range(repeats):
                if p == 0:
                    if d == 0:
                        continue
                    f, s = _timed_step(engine)
                else:
                    rid = engine.add(rng.integers(1, vocab, p + 1).tolist(), one)
                    f, s = _timed_step(engine)
                    while rid in engine.requests:
                        engine.step()
                feats.append(f)
                secs.append(s)
        for i in ids:
            engine.abort(i)
        engine.step()
        if progress is not None:
            progress(k + 1, len(grid))
    return np.asarray(feats), np.asarray(secs)


def fit_profile(engine: Engine, repeats: int = 3, progress: Progress | None = None) -> LinearCostModel:
    """Profile ``engine`` over the grid (``progress`` hears of each point) and fit the cost model."""
    # Warm up once so one-time costs do not land in the samples.
    engine.add(list(range(1, 65)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return fit_steps(engine, *profile_engine(engine, repeats, progress=progress))


def fit_steps(engine: Engine, features: np.ndarray, seconds: np.ndarray) -> LinearCostModel:
    """The cost model fitted on steps ``engine`` ran (their features and seconds), labelled with
    what it was measured on. Its decode attention is priced on ``decode_span`` alone: the engine
    pads every decode's K/V to the longest, so the contexts' sum does not enter its time."""
    features = np.array(features, dtype=float)
    features[:, FEATURES.index("decode_context")] = 0.0
    cost = LinearCostModel.fit_samples(
        features, seconds, device=_device_name(engine), model=engine.model_config.name,
        dtype=str(engine.dtype).removeprefix("torch.")
    )
    cost.fit["against"] = fitted_against(engine)
    return cost


def fitted_against(engine: Engine) -> dict:
    """What the profile was measured on, so a stale one can be told apart: the code's commit (if
    a git checkout), torch, the threads and the engine's settings that shape a step."""
    import datetime
    import subprocess
    from pathlib import Path

    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cfg = engine.config
    return {"shoal_commit": commit, "torch": torch.__version__, "cpu": _cpu_model(), "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "int4_small_batch": cfg.int4_small_batch, "block_size": cfg.block_size}


def _cpu_model() -> str | None:
    """The CPU's model name and its widest vector / matrix extensions (Linux), e.g. "AMD EPYC
    (avx512_bf16)": profiles from different CPUs differ by up to 2x."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    ext = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags][:1]
    return f"{name} ({ext[0]})" if ext else name


def _device_name(engine: Engine) -> str:
    import os
    import platform

    import torch

    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads ({os.cpu_count()} cpus)"
