"""Speculative decoding without a second model: prompt-lookup (n-gram) drafts, verified in one pass.

A request whose last few tokens occurred earlier in its prompt or output (code edits, JSON
extraction, an agent quoting its context) likely goes on as it did then. :func:`propose_ngram`
finds the latest earlier occurrence of the last ``n`` tokens (``n`` from ``prompt_lookup_max`` down
to ``prompt_lookup_min``) and proposes the tokens that followed it. The scheduler runs the newest
token and its drafts as one chunk, inside the step's token budget and KV; the forward pass scores
every position; :func:`shoal.engine.spec_verify.verify` keeps the longest run of drafts the model accepts and adds one token
of its own. Under greedy decoding that is exactly what plain decoding gives; under sampling each
token is drawn from the same distribution (rejection sampling against a point-mass draft: draft
``d`` is accepted with probability ``p(d)``, else a token is drawn from ``p`` with ``d`` removed).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal.engine.sampling_params import SamplingParams

SPECULATIVE_METHODS = ("ngram",)
MAX_SPECULATIVE_TOKENS = 16
MAX_LOOKUP = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config`` for its n-gram method; ``num_speculative_tokens=0`` turns it off."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(SPECULATIVE_METHODS)} "
                             f"(drafting with a second model is not supported), got {self.method!r}")

        def check(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"speculative_config.{name} must be an integer in [{low}, {high}], got {value!r}")

        check("num_speculative_tokens", 0, MAX_SPECULATIVE_TOKENS)
        check("prompt_lookup_min", 1, MAX_LOOKUP)
        check("prompt_lookup_max", self.prompt_lookup_min, MAX_LOOKUP)

    @classmethod
    def from_dict(cls, data: Any) -> "SpeculativeConfig":
        """Parse ``{"method": "ngram", "num_speculative_tokens": 3, ...}``; ValueError names what is wrong."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"speculative_config must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0


def speculates(params: SamplingParams, default: SpeculativeConfig | None) -> SpeculativeConfig | None:
    """The drafting a request gets: its own ``speculative_config``, else the engine's; None when off
    or when the request's tokens depend on the ones before them in ways the verifier does not
    replay (penalties, a grammar) or it asks for logprobs."""
    cfg = params.speculative_config or default
    if cfg is None or not cfg.enabled:
        return None
    if (params.structured_outputs is not None or params.logprobs is not None or params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0):
        return None
    return cfg


def propose_ngram(token_ids: list[int], cfg: SpeculativeConfig, max_drafts: int) -> list[int]:
    """Up to ``min(num_speculative_tokens, max_drafts)`` tokens that followed the latest earlier
    occurrence of the sequence's last ``n`` tokens, trying the longest ``n`` first; [] if none."""
    k = min(cfg.num_speculative_tokens, max_drafts)
    length = len(token_ids)
    if k <= 0 or length < 2:
        return []
    ids = array("i", token_ids)
    data, width = ids.tobytes(), ids.itemsize  # bytes.rfind searches in C; a hit must be aligned
    for n in range(min(cfg.prompt_lookup_max, length - 1), cfg.prompt_lookup_min - 1, -1):
        pattern = data[-n * width:]
        end = (length - 1) * width  # the match must leave at least one token after it
        while True:
            pos = data.rfind(pattern, 0, end)
            if pos < 0:
                break
            if pos % width == 0:
                start = pos // width + n
                return token_ids[start : start + k]
            end = pos + len(pattern) - 1
    return []
