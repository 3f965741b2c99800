"""Predicting a request's latency on an instance from that instance's cost profile and load.

For an arriving request of ``prompt_len`` tokens, ``cached`` of them already in the instance's
prefix cache, :meth:`LatencyPredictor.predict` estimates

- **TTFT**: the prefill work queued ahead of it (queued prompts and running ones mid-prefill)
  plus its own uncached tokens, run in steps that each carry the running decodes and one prefill
  chunk (as large as the token budget, or the SLO time budget, allows), plus a wait for KV blocks
  when what is queued does not fit in what is free;
- **TPOT**: a decode step of the running batch with this request in it, plus that queued prefill
  work spread over its expected output (what the requests decoding there will also see).

Every number comes from the profile's :meth:`CostModel.time`, so a slower instance predicts
slower; nothing reads a clock. llm-d's predicted-latency scheduling and Llumnix's load model
are the inspiration; the estimate is deliberately coarse (one chunk shape per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.engine.cost_model import CostModel, step_features, with_chunk
from shoal.engine.metadata import SLO
from shoal.engine.outputs import InstanceLoad
from shoal.engine.step_budget import StepTimeBudget


@dataclass(frozen=True)
class InstanceProfile:
    """How an instance computes: its cost model, its per-step token budget and, if it sizes steps
    from the TPOT SLO, that time budget."""

    cost_model: CostModel
    max_num_batched_tokens: int = 512
    step_time_budget: StepTimeBudget | None = None


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float

    def meets(self, slo: SLO | None) -> bool:
        return slo is None or (self.ttft_s <= slo.ttft_s and self.tpot_s <= slo.tpot_s)

    def violation(self, slo: SLO | None) -> float:
        """How far past the SLO (1.0: exactly at it); the TTFT itself without an SLO."""
        if slo is None:
            return self.ttft_s
        return max(self.ttft_s / slo.ttft_s, self.tpot_s / slo.tpot_s)


@dataclass(frozen=True)
class LatencyPredictor:
    """``expected_output_tokens``: the output length assumed for requests whose length is not
    known (how long the running batch keeps its KV, and over how many tokens queued prefill
    work is spread)."""

    expected_output_tokens: int = 128

    def predict(self, profile: InstanceProfile, load: InstanceLoad, prompt_len: int, cached: int = 0) -> Prediction:
        cm = profile.cost_model
        decodes = load.num_running
        context = load.tokens_in_flight
        longest = max((r.num_tokens for r in load.running), default=context // max(decodes, 1))
        own = max(1, prompt_len - cached)
        queued = load.waiting_prompt_tokens + own
        decode_step = step_features(tokens=decodes, decodes=decodes, decode_context=context, sampled=decodes,
                                    decode_span=decodes * longest)
        start = cached + own // 2  # where a typical chunk of this prompt starts
        chunk = max(1, profile.max_num_batched_tokens - decodes)
        if profile.step_time_budget is not None:
            chunk = max(1, profile.step_time_budget.fit(decode_step, start, chunk))
        chunk = min(chunk, queued)
        prefill_step = cm.time(with_chunk(decode_step, start, chunk))
        steps = math.ceil(queued / chunk)
        ttft = steps * prefill_step + self._kv_wait(cm, load, own, decode_step)
        # this request decoding: the batch with it, plus the queued prefill spread over its output
        joined = step_features(tokens=decodes + 1, decodes=decodes + 1, decode_context=context + prompt_len,
                               sampled=decodes + 1, decode_span=(decodes + 1) * max(longest, prompt_len))
        extra = steps * max(0.0, prefill_step - cm.time(decode_step)) if decodes else 0.0
        tpot = cm.time(joined) + extra / self.expected_output_tokens
        return Prediction(ttft, tpot)

    def _kv_wait(self, cm: CostModel, load: InstanceLoad, own: int, decode_step: list[float]) -> float:
        """Time until enough running requests finish for the queued prompts' blocks to fit: the
        missing fraction of the blocks in use, times how long the batch takes to turn over."""
        bs = load.block_size
        need = -(-(load.waiting_prompt_tokens + own) // bs)
        missing = need - (load.num_free_blocks + load.num_cached_blocks)
        in_use = -(-load.tokens_in_flight // bs)
        if missing <= 0 or in_use == 0:
            return 0.0
        turnover = self.expected_output_tokens * cm.time(decode_step)
        return min(missing / in_use, 4.0) * turnover
