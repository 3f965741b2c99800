"""Skipping ahead through steady decode stretches.

Between events, an instance often runs the same batch of decodes step after step: nothing waits,
nothing is swapped, nobody finishes, KV suffices. The scheduler's decision in each such step is
forced (every running request gets one token), so the simulator may apply ``k`` of them at once.
``tests/test_sim.py`` checks that this gives exactly the records of stepping one by one.
"""

from __future__ import annotations

from typing import Iterator

from shoal.engine.core import EngineCore
from shoal.engine.cost_model import CostModel, FEATURES, step_features

_CTX, _SPAN = FEATURES.index("decode_context"), FEATURES.index("decode_span")


def steady_decode_steps(engine: EngineCore, limit: int) -> int:
    """How many of the coming steps are forced pure-decode steps of the current running set
    (0 when any scheduling decision could differ)."""
    s, bm = engine.scheduler, engine.block_manager
    if limit <= 0 or engine._pending or s.waiting or s.swapped or not s.running:
        return 0
    if len(s.running) > s.config.max_num_batched_tokens:
        return 0
    k = limit
    blocks = 0
    for r in s.running:
        p = r.params
        if r.num_computed_tokens != r.num_tokens - 1 or not p.ignore_eos or p.stop_token_ids or p.stop:
            return 0
        # leave the finishing step to the engine itself
        k = min(k, p.max_tokens - len(r.output_token_ids) - 1, engine.max_model_len - r.num_tokens - 1)
    if k <= 0:
        return 0
    for r in s.running:
        blocks += bm.slots_needed(r.req_id, r.num_computed_tokens + k)
    return k if blocks <= bm.num_free else 0


def step_times(engine: EngineCore, cost_model: CostModel, k: int) -> Iterator[float]:
    """Durations of the next ``k`` forced decode steps (context grows by one token a step),
    lazily: callers stop at their horizon."""
    n = len(engine.scheduler.running)
    ctx = sum(r.num_computed_tokens + 1 for r in engine.scheduler.running)
    span = n * max(r.num_computed_tokens + 1 for r in engine.scheduler.running)
    coef = getattr(cost_model, "coefficients", None)
    if coef is not None and len(coef) == len(FEATURES):  # linear: no plan objects needed
        base = sum(c * f for c, f in zip(coef, step_features(tokens=n, decodes=n, sampled=n)))
        for j in range(k):  # every context, the longest too, grows by one a step
            yield max(1e-6, base + coef[_CTX] * (ctx + j * n) + coef[_SPAN] * (span + j * n))
        return
    for j in range(k):
        yield cost_model.step_time(_decode_plan(engine, j))


def _decode_plan(engine: EngineCore, j: int):
    from shoal.engine.scheduler import ScheduledChunk, StepPlan

    return StepPlan(chunks=[ScheduledChunk(r.req_id, r.num_computed_tokens + j, [0], [], True)
                            for r in engine.scheduler.running])


def advance(engine: EngineCore, k: int, token_id: int, times: list[float]) -> dict[str, list[float]]:
    """Apply ``k`` forced decode steps that end at ``times``; returns each request's token times."""
    bm = engine.block_manager
    out: dict[str, list[float]] = {}
    for r in engine.scheduler.running:
        r.num_computed_tokens += k
        bm.ensure_slots(r.req_id, r.num_computed_tokens)
        r.output_token_ids.extend([token_id] * k)
        if bm.has_new_full_blocks(r.req_id, r.num_computed_tokens):
            bm.commit(r.req_id, r.all_token_ids, r.num_computed_tokens)
        out[r.req_id] = times
    return out
