"""SLO-sized steps (Sarathi-Serve): cut prefill chunks so a step that carries decodes stays
within the time-per-output-token SLO under the instance's cost model.

A fixed token budget (512) makes every decode that shares a step with a long prefill chunk wait
for the whole chunk; on a slow device that alone breaks the TPOT SLO. Here the scheduler asks,
for each prefill chunk it is about to add, how many tokens fit in what is left of the step's time
once the decodes and chunks already planned are counted. Steps without decodes are not limited
(nobody is waiting for a token), and a step always makes some prefill progress.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.engine.cost_model import FEATURES, CostModel, plan_features, step_features, with_chunk

_DECODES, _DECODE_CONTEXT, _CHUNKS = (FEATURES.index(f) for f in ("decodes", "decode_context", "prefill_chunks"))


@dataclass(frozen=True)
class StepTimeBudget:
    """``limit_s``: the longest a step with decodes may take (the TPOT SLO); ``min_chunk``: the
    prefill tokens a step with decodes may still take when nothing fits, so prompts keep moving."""

    cost_model: CostModel
    limit_s: float
    min_chunk: int = 32

    def __post_init__(self) -> None:
        if not self.limit_s > 0:
            raise ValueError(f"the step time limit must be positive, got {self.limit_s}")
        if self.min_chunk < 1:
            raise ValueError(f"min_chunk must be at least 1, got {self.min_chunk}")

    def chunk_tokens(self, plan, start: int, want: int) -> int:
        """The most of ``want`` prefill tokens, from position ``start``, that keep ``plan`` (the
        step planned so far) plus this chunk within the limit."""
        return self.fit(plan_features(plan), start, want)

    def fit(self, base: list[float], start: int, want: int) -> int:
        """As :meth:`chunk_tokens`, for a step whose features so far are ``base``."""
        if base[_DECODES] == 0 or want <= 0:
            return want
        n = longest_fit(self.cost_model, base, start, want, self.limit_s)
        if n == 0 and base[_CHUNKS] == 0:
            return min(want, self.min_chunk)
        return n


@dataclass(frozen=True)
class PrefillStretch:
    """Under fair share (``SchedulerConfig.fair_prefill_stretch``): while a tenant behind has work,
    the prefill chunks of the tenants ahead of it may lengthen a step by at most ``fraction`` of a
    full decode step (``max_num_seqs`` decodes), under ``cost_model``. Where prefill is dear (a CPU)
    that is a few dozen tokens beside the decodes; where small chunks ride on memory-bound decode
    steps (a GPU), many more. The yardstick is the full step, not the step at hand: a fraction of
    the step at hand would shrink with the decodes, refill their slots slower still, and spiral."""

    cost_model: CostModel
    fraction: float

    def __post_init__(self) -> None:
        if not 0 < self.fraction < float("inf"):
            raise ValueError(f"the prefill stretch must be a positive fraction, got {self.fraction}")

    def seconds(self, base: list[float], max_num_seqs: int) -> float:
        """What the prefill of the tenants ahead may add to a step whose features so far are
        ``base``: ``fraction`` of a step of ``max_num_seqs`` decodes at its decodes' mean context."""
        decodes = base[_DECODES]
        context = base[_DECODE_CONTEXT] / decodes if decodes else 0.0
        full = step_features(tokens=max_num_seqs, decodes=max_num_seqs, decode_context=max_num_seqs * context,
                             sampled=max_num_seqs)
        return self.fraction * self.cost_model.time(full)


def longest_fit(cost_model: CostModel, base: list[float], start: int, want: int, limit_s: float) -> int:
    """The most of ``want`` prefill tokens, from position ``start``, that keep a step whose features
    so far are ``base`` within ``limit_s`` seconds (0 if not one token does)."""
    if cost_model.time(with_chunk(base, start, want)) <= limit_s:
        return want
    lo, hi = 0, want  # time(lo) fits, time(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost_model.time(with_chunk(base, start, mid)) <= limit_s:
            lo = mid
        else:
            hi = mid
    return lo
