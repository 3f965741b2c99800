"""Helpers for tests that drive an engine: step it to the end, read its tokens, and make a tokenizer
add BOS as Llama's does."""

from __future__ import annotations

from collections import defaultdict

from shoal.engine.engine import Engine
from shoal.engine.outputs import RequestOutput


def run_all(engine: Engine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    """Step until every request ended; returns each request's outputs in order."""
    outs: dict[str, list[RequestOutput]] = defaultdict(list)
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs[o.req_id].append(o)
    raise AssertionError("engine did not finish")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def add_bos_on_encode(monkeypatch, tokenizer, bos: int) -> None:
    """Make ``tokenizer.encode`` prepend ``bos`` when asked for special tokens, as Llama's does
    (SmolLM2's adds none, so its prompts cannot show whether the caller asked)."""
    real = tokenizer.encode

    def encode(text, add_special_tokens=True, **kwargs):
        return ([bos] if add_special_tokens else []) + real(text, add_special_tokens=False, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
