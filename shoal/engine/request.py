"""A request's life inside one engine: its tokens, progress, status and timings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shoal.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shoal.engine.metadata import RequestMetadata


PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
"""The priorities a request may have (lower runs first); anything else is refused at the edge."""


class Status(enum.Enum):
    WAITING = "waiting"  # not started, or preempted by recompute
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted; its KV sits in the swap pool
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller (client gone, migration, ...)
    ERROR = "error"  # failed; ``Request.error`` says why


@dataclass
class Request:
    """Everything the scheduler tracks about one request. Times come from the caller's clock."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    num_preemptions: int = 0
    deadline: float | None = None  # when the first token is due (deadline admission only)
    metadata: RequestMetadata | None = None  # handed back on its outputs
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    draft_token_ids: list[int] = field(default_factory=list)  # speculative tokens proposed for the next step
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def cache_salt(self) -> int | None:
        """The seed of this request's prefix-cache hash chain (its metadata's ``cache_salt``)."""
        return None if self.metadata is None else self.metadata.salt

    @property
    def tenant(self) -> str | None:
        return None if self.metadata is None else self.metadata.tenant

    @property
    def weight(self) -> float:
        """The tenant's share under fair scheduling."""
        return 1.0 if self.metadata is None else self.metadata.weight

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """True while more than the newest token still needs a forward pass."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def sort_key(self) -> tuple[int, float, str]:
        """Scheduling order: lower priority number first, then first come first served."""
        return (self.priority, self.arrival_time, self.req_id)
