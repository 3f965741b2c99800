"""Guided decoding: a request's output held to a JSON schema, any JSON, a regex, a choice among
strings or a Lark grammar, with llguidance.

:class:`StructuredOutputs` says what the output must be (vLLM's ``StructuredOutputsParams``
shape); :class:`GrammarCompiler` turns it into a per-request llguidance matcher (compiled grammars
are cached, so a repeated schema costs a copy); the sampler masks each guided row's logits with
its matcher's allowed tokens, and the engine advances the matcher with every accepted token. The
matcher's state is a function of the output tokens alone, so preemption (swap or recompute) keeps
it, and an imported request rebuilds it by replaying its output tokens.

llguidance over xgrammar (both measured on this CPU, ``benchmarks/structured/backends.py``): a
schema compiles in ~1 ms against xgrammar's ~250 ms, a token mask takes ~0.02 ms (xgrammar
~0.003 ms, both far below a step), and it needs no torch-side build (xgrammar pulls triton).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark
import torch

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON on one line with ``", "`` and ``": "``: free whitespace lets a small model wander into
newlines and indentation until it runs out of tokens."""


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint: ``json`` (a JSON schema, as a dict or its text), ``json_object``
    (any JSON object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (a Lark
    grammar in llguidance's dialect, which embeds JSON schemas with ``%json {...}``, or a GBNF /
    EBNF one with ``root ::= ...`` rules, as vLLM's xgrammar backend takes)."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of json, json_object, regex, choice, grammar; got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured outputs: json must be a JSON schema (an object or its text)")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError("structured outputs: regex must be a string")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError("structured outputs: grammar must be a string")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured outputs: choice must be a non-empty list of non-empty strings")

    def grammar_text(self) -> str:
        """The llguidance grammar this constraint compiles from."""
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return llguidance.LLMatcher.grammar_from_json_schema(schema, COMPACT)
        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, COMPACT)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(self.grammar))  # GBNF becomes Lark


class GrammarCompiler:
    """Compiles :class:`StructuredOutputs` into matchers for one tokenizer; thread-safe (the API
    compiles a new grammar in a worker thread to refuse a bad one with a 400, so the engine's own
    compile of it is a cache hit)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance.hf  # here, not at import: it costs every process that never compiles a grammar

        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """A fresh matcher for ``spec``; ValueError naming the problem if it does not compile."""
        try:
            text = spec.grammar_text()
        except Exception as exc:  # llguidance refuses some inputs before compiling
            raise ValueError(f"the structured output does not compile: {exc}") from None
        with self._lock:
            proto = self._cache.get(text)
            if proto is not None:
                self._cache.move_to_end(text)
                return proto.deep_copy()
        proto = llguidance.LLMatcher(self._tokenizer, text)
        if proto.is_error():
            raise ValueError(f"the structured output does not compile: {proto.get_error()}")
        with self._lock:
            self._cache[text] = proto
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return proto.deep_copy()


def replay(matcher: llguidance.LLMatcher, token_ids: list[int]) -> None:
    """Advance a fresh matcher over tokens already generated (an imported request)."""
    for t in token_ids:
        if not matcher.consume_token(t):
            raise ValueError(f"the request's output does not follow its grammar: {matcher.get_error()}")


_BITS = torch.arange(32, dtype=torch.int32)


def mask_logits(logits: torch.Tensor, matchers: list[Any]) -> None:
    """Set to -inf, in place, every token row ``i`` of ``logits`` may not take next under
    ``matchers[i]`` (None: unconstrained). The bitmask is unpacked with plain tensor ops, not
    llguidance's ``torch.compile`` kernel: that one compiles C++ at run time on the first request
    of each shape (seconds; and for some batch shapes the compile fails, failing the whole step).
    Each matcher writes its row through ``LLMatcher.unsafe_compute_mask_ptr`` (what
    ``llguidance.torch.fill_next_token_bitmask`` calls; importing that module costs ~2 s of
    ``torch._dynamo`` in every process)."""
    vocab = logits.shape[1]
    rows = [i for i, m in enumerate(matchers) if m is not None]
    bitmask = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    for j, i in enumerate(rows):
        row = bitmask[j]
        matchers[i].unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).reshape(len(rows), -1)[:, :vocab].bool()
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
