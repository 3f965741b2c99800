"""Per-request sampling parameters (a subset of vLLM's ``SamplingParams``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from shoal.engine.guided import StructuredOutputs
from shoal.engine.speculative import SpeculativeConfig

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit seed, as vLLM takes (choice i adds i)
MAX_INT32 = 2**31 - 1  # the bound on token ids, top_k and max_tokens


@dataclass
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    ``n`` > 1 asks for several completions of one prompt; with a ``seed``, completion ``i`` uses
    ``seed + i``. ``top_k`` of 0 or -1 disables top-k; ``logprobs`` is the number of top
    alternatives to return per token (0 = only the sampled token's logprob,
    None = no logprobs). ``stop`` accepts a single string; ``stop`` and
    ``stop_token_ids`` accept None for none, as in vLLM. ``structured_outputs`` holds the output
    to a schema, regex, choice or grammar (guided decoding); ``logit_bias`` adds a bias in
    [-100, 100] to a token's logit before sampling, as OpenAI's does. ``speculative_config``
    (a :class:`SpeculativeConfig` or its dict) sets this request's n-gram drafting, overriding the
    engine's; ``num_speculative_tokens=0`` turns it off.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    n: int = 1  # completions per prompt (LLM and the server fan out; one engine request each)
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[int, float] | None = None
    speculative_config: SpeculativeConfig | None = None  # n-gram drafting for this request (else the engine's)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, [])
            elif isinstance(value, (list, tuple)):
                setattr(self, name, list(value))
            else:
                raise ValueError(f"{name} must be a list, got {value!r}")
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.n) or self.n < 1:
            fail("n", "an integer >= 1")
        if not is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_INT32:
            fail("max_tokens", f"an integer in [1, {MAX_INT32}]")
        if not is_num(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]")
        if not is_int(self.top_k) or not -1 <= self.top_k <= MAX_INT32:
            fail("top_k", "-1 or 0 (disabled) or an integer >= 1")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                fail(name, "in [-2, 2]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0")
        if self.seed is not None and (not is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            fail("seed", f"None or an integer in [{SEED_MIN}, {SEED_MAX}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "a list of non-empty strings")
        if not all(is_int(t) and 0 <= t <= MAX_INT32 for t in self.stop_token_ids):
            fail("stop_token_ids", f"a list of integers in [0, {MAX_INT32}]")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            fail("structured_outputs", "None or a StructuredOutputs")
        if self.logit_bias is not None and not (
                isinstance(self.logit_bias, dict)
                and all(is_int(t) and 0 <= t <= MAX_INT32 for t in self.logit_bias)
                and all(is_num(b) and -100 <= b <= 100 for b in self.logit_bias.values())):
            fail("logit_bias", "None or a dict of token ids to biases in [-100, 100]")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of completion ``index`` of ``n``: one sequence, its own seed."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature below 1e-5)."""
        return self.temperature < _GREEDY_EPS
