"""Plain data the engine hands out: per-step request outputs, load snapshots, exported state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.engine.request import FinishReason
from shoal.engine.sampler import Logprob
from shoal.engine.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    """What one step did for one request: the new tokens and text, and whether it ended."""

    req_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    logprobs: list[tuple[Logprob, list[Logprob]]] | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    metadata: Any = None  # the request's RequestMetadata, as it came in


def failed_output(req_id: str, error: str, num_prompt_tokens: int = 0, num_output_tokens: int = 0,
                  metadata: Any = None) -> RequestOutput:
    """The final output of a request that ends in ``error`` outside an engine step (its engine
    stopped, its instance died)."""
    return RequestOutput(req_id=req_id, new_token_ids=[], new_text="", finished=True,
                         num_prompt_tokens=num_prompt_tokens, num_output_tokens=num_output_tokens,
                         finish_reason=FinishReason.ERROR, error=error, metadata=metadata)


@dataclass(frozen=True)
class RunningRequest:
    """What a migration policy may know about a running request."""

    req_id: str
    priority: int
    num_tokens: int


@dataclass(frozen=True)
class InstanceLoad:
    """A snapshot of one engine's load, for dispatch and migration policies."""

    num_running: int
    num_waiting: int
    num_swapped: int
    num_total_blocks: int
    num_free_blocks: int
    num_used_blocks: int
    num_cached_blocks: int
    num_pinned_blocks: int
    block_size: int
    tokens_in_flight: int  # tokens held in KV by running requests
    waiting_prompt_tokens: int  # prompt tokens still to prefill: queued requests' and running ones' mid-prefill
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens looked up so far
    prefix_cache_hits: int = 0  # of which found cached
    max_num_seqs: int = 0  # the running batch's bound (summed over a cluster's instances)
    num_restarts: int = 0  # times the engine started over after a step itself failed
    running: tuple[RunningRequest, ...] = ()  # the running batch (migration policies choose from it)
    lowest_waiting_priority: int | None = None  # the worst priority among queued requests that produced nothing yet
    num_added: int = 0  # requests ever queued by ``add`` (dispatch compares it with what it sent here)
    num_draft_tokens: int = 0  # speculative tokens scored so far
    num_accepted_tokens: int = 0  # of which accepted
    program_pins: int = 0  # agent programs' KV pins made so far (a turn ended, more follow)
    program_pin_hits: int = 0  # next turns admitted onto their pin
    program_pins_expired: int = 0  # pins whose time-to-live ran out
    program_pins_yielded: int = 0  # pins given up under pressure (to running requests or older programs)
    num_tier_blocks: int = 0  # the second KV tier's capacity (0: no tier)
    num_tier_used_blocks: int = 0  # of which holding evicted prefix blocks
    tier_demoted_blocks: int = 0  # blocks copied into the tier so far
    tier_loaded_blocks: int = 0  # blocks loaded back from it instead of recomputed (tier hits)

    @property
    def kv_usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks

    def waiting_for_room(self, unseen: int = 0) -> int:
        """Requests beyond the running batch's free slots: the queued and swapped ones, plus
        ``unseen`` submitted since this snapshot. A burst that fits in free slots counts zero."""
        free_slots = max(0, self.max_num_seqs - self.num_running)
        return max(0, self.num_waiting + self.num_swapped + unseen - free_slots)


SHED_ERROR = "shed under overload: a request of better priority took its place in the queue; retry later"
"""The error of a queued request ended by :meth:`EngineCore.shed` (the API answers it with a 429)."""


@dataclass
class RequestState:
    """Everything needed to continue a request on another engine (live migration).

    ``kv`` is ``[2, layers, kv_heads, blocks, block_size, head_dim]`` on CPU covering the blocks
    from ``kv_start_block`` to the last of the first ``num_computed_tokens`` tokens, or None when
    the request has no KV yet.
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    num_computed_tokens: int
    generator_state: torch.Tensor | None
    emitted_text_len: int
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    first_token_time: float | None = None
    kv: torch.Tensor | None = None
    kv_start_block: int = 0  # blocks before this one were staged on the destination already
    metadata: Any = None  # RequestMetadata (its SLO and arrival_time give the deadline)
    extra: dict = field(default_factory=dict)
