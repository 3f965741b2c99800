"""Prompts of an exact token length, cut from real text (the corpus shipped with Shoal)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import numpy as np


@cache
def corpus_text() -> str:
    return resources.files("shoal.bench").joinpath("corpus.txt").read_text()


class PromptMaker:
    """Cuts windows of the tokenized corpus. Each prompt starts at a different offset (and with
    its own request number), so prompts do not share prefixes unless asked to."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = tokenizer.encode(corpus_text(), add_special_tokens=False)
        self.rng = np.random.default_rng(seed)

    def token_ids(self, length: int, index: int) -> list[int]:
        head = self.tokenizer.encode(f"Request {index}. ", add_special_tokens=False)
        need = max(0, length - len(head))
        start = int(self.rng.integers(0, len(self.tokens)))
        body = [self.tokens[(start + i) % len(self.tokens)] for i in range(need)]
        return (head + body)[:length]

    def text(self, length: int, index: int) -> str:
        return self.tokenizer.decode(self.token_ids(length, index))

    def for_request(self, spec, index: int, group_prefixes: dict[int, list[int]]) -> list[int]:
        """``spec``'s prompt: its group's shared prefix (made once, kept in ``group_prefixes``),
        then tokens of its own."""
        if spec.prefix_group is None or spec.prefix_len == 0:
            return self.token_ids(spec.prompt_len, index)
        prefix = group_prefixes.setdefault(spec.prefix_group, self.token_ids(spec.prefix_len, -1 - spec.prefix_group))
        return prefix[: spec.prefix_len] + self.token_ids(spec.prompt_len - spec.prefix_len, index)
