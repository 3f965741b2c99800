"""Per-tenant limits at the gateway, checked before any engine work: requests per second and
tokens per minute (token buckets), requests in flight, and requests queued (not yet producing).

A request that would exceed a limit is refused with :class:`LimitExceeded` (the API answers 429
with ``Retry-After`` and an OpenAI error body naming the limit) and changes no count. Tokens per
minute are charged for the prompt plus ``max_tokens`` when a request is admitted, and the output
tokens it did not use are given back when it ends (as OpenAI estimates and settles).
Time comes from the clock handed in; the gate holds no thread or task.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from shoal.engine.outputs import RequestOutput

LIMIT_FIELDS = ("requests_per_s", "tokens_per_min", "max_concurrent", "max_queued")


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits; None: unlimited."""

    requests_per_s: float | None = None
    tokens_per_min: float | None = None
    max_concurrent: int | None = None  # sequences in flight (a request with n=4 is four)
    max_queued: int | None = None  # sequences admitted that have not produced a token yet

    def __post_init__(self) -> None:
        for name in LIMIT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            integral = name.startswith("max_")
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)) \
                    or not 0 < value < math.inf:
                kind = "an integer" if integral else "a number"
                raise ValueError(f"{name} must be {kind} > 0, got {value!r}")

    @property
    def any(self) -> bool:
        return any(getattr(self, n) is not None for n in LIMIT_FIELDS)


class LimitExceeded(Exception):
    """A request refused by a limit: ``limit`` names it, ``retry_after_s`` says when to try again."""

    def __init__(self, limit: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit, self.retry_after_s = limit, retry_after_s


class _Bucket:
    """A token bucket: ``capacity`` at most, refilled at ``rate`` per second."""

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity, self.rate, self.level, self.t = capacity, rate, capacity, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_s(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate)


@dataclass
class _Usage:
    requests: _Bucket | None
    tokens: _Bucket | None
    in_flight: int = 0
    queued: int = 0


@dataclass
class Admission:
    """One admitted sequence's claim on its tenant's limits, settled once by :meth:`QuotaGate.release`."""

    usage: _Usage
    reserved_output: int
    queued: bool = True
    released: bool = False


@dataclass
class QuotaGate:
    """The limits of every tenant, keyed by tenant name."""

    clock: Callable[[], float] = time.monotonic
    _usage: dict[str, _Usage] = field(default_factory=dict)

    def admit(self, tenant: str, limits: TenantLimits, prompt_tokens: list[int], max_tokens: list[int]) -> list[Admission]:
        """Claim room for a request's sequences (one per prompt-and-choice, with their token counts);
        LimitExceeded, changing nothing, if any limit would be passed."""
        now = self.clock()
        usage = self._usage.get(tenant)
        if usage is None:
            usage = self._usage[tenant] = _Usage(
                None if limits.requests_per_s is None else _Bucket(max(1.0, limits.requests_per_s), limits.requests_per_s, now),
                None if limits.tokens_per_min is None else _Bucket(limits.tokens_per_min, limits.tokens_per_min / 60, now))
        n = len(prompt_tokens)
        tokens = sum(prompt_tokens) + sum(max_tokens)
        if limits.max_concurrent is not None and usage.in_flight + n > limits.max_concurrent:
            raise LimitExceeded("max_concurrent", f"{usage.in_flight} requests of yours are in flight "
                                f"(limit {limits.max_concurrent}); this one asks for {n} more", 1.0)
        if limits.max_queued is not None and usage.queued + n > limits.max_queued:
            raise LimitExceeded("max_queued", f"{usage.queued} requests of yours are queued "
                                f"(limit {limits.max_queued}); this one asks for {n} more", 1.0)
        if usage.requests is not None:
            usage.requests.refill(now)
            if usage.requests.level < 1:
                wait = usage.requests.wait_s(1)
                raise LimitExceeded("requests_per_s", f"rate limit reached on requests_per_s: limit "
                                    f"{limits.requests_per_s:g}; try again in {wait:.2f} s", wait)
        if usage.tokens is not None:
            usage.tokens.refill(now)
            if tokens > usage.tokens.capacity:
                raise LimitExceeded("tokens_per_min", f"request too large for tokens_per_min: limit "
                                    f"{limits.tokens_per_min:g}, requested {tokens} (prompt plus max_tokens); "
                                    "lower max_tokens or shorten the prompt", 60.0)
            if usage.tokens.level < tokens:
                wait = usage.tokens.wait_s(tokens)
                raise LimitExceeded("tokens_per_min", f"rate limit reached on tokens_per_min: limit "
                                    f"{limits.tokens_per_min:g}, used {usage.tokens.capacity - usage.tokens.level:.0f}, "
                                    f"requested {tokens}; try again in {wait:.2f} s", wait)
            usage.tokens.level -= tokens
        if usage.requests is not None:
            usage.requests.level -= 1
        usage.in_flight += n
        usage.queued += n
        return [Admission(usage, m) for m in max_tokens]

    def started(self, claim: Admission) -> None:
        """The sequence produced its first token: it no longer counts as queued."""
        if claim.queued and not claim.released:
            claim.queued = False
            claim.usage.queued -= 1

    def release(self, claim: Admission, output_tokens: int) -> None:
        """The sequence ended (or was never started) having produced ``output_tokens``."""
        if claim.released:
            return
        self.started(claim)
        claim.released = True
        claim.usage.in_flight -= 1
        if claim.usage.tokens is not None:
            claim.usage.tokens.level = min(claim.usage.tokens.capacity,
                                           claim.usage.tokens.level + max(0, claim.reserved_output - output_tokens))


class LimitedStream:
    """A request's output stream that settles its claim on the tenant's limits as it goes:
    started at the first token, released when it ends or is closed."""

    def __init__(self, stream, gate: QuotaGate, claim: Admission) -> None:
        self._stream, self._gate, self._claim = stream, gate, claim
        self._outputs = 0
        self.req_id = stream.req_id

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self._stream.__anext__()
        except BaseException:
            self._gate.release(self._claim, self._outputs)
            raise
        if out.new_token_ids:
            self._outputs += len(out.new_token_ids)
            self._gate.started(self._claim)
        if out.finished:
            self._gate.release(self._claim, self._outputs)
        return out

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._gate.release(self._claim, self._outputs)
