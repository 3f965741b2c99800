"""Prompt text to token ids for the API: chat templates and tokenization, off the event loop when
the input is large, and refusing text too long to fit before tokenizing any of it."""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

T = TypeVar("T")

# Below this many bytes of text, tokenizing inline costs less than the hop to a worker thread.
INLINE_BYTES = 16 << 10


class PromptBuilder:
    """Tokenizes for one server. The tokenizer releases the GIL, so a 10 MB prompt in a worker
    thread does not stall the event loop's streams."""

    def __init__(self, tokenizer, max_model_len: Callable[[], int]) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        # No token is longer than this many UTF-8 bytes, so a text of more than
        # max_model_len * max_token_bytes bytes cannot fit the context, whatever it holds.
        self.max_token_bytes = max(1, max((len(tokenizer.decode([i]).encode()) for i in range(len(tokenizer))), default=1))

    def _check_size(self, nbytes: int) -> None:
        max_len = self.max_model_len()
        if nbytes > max_len * self.max_token_bytes:
            raise ValueError(
                f"The prompt is {nbytes} bytes of text: more than the model's maximum context length of "
                f"{max_len} tokens can hold (no token is longer than {self.max_token_bytes} bytes).")

    async def _run(self, nbytes: int, fn: Callable[[], T]) -> T:
        return fn() if nbytes <= INLINE_BYTES else await asyncio.to_thread(fn)

    async def encode(self, text: str, add_special_tokens: bool, fit: bool = True) -> list[int]:
        """Token ids of ``text``; with ``fit``, ValueError if it cannot fit the context."""
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        if fit:
            self._check_size(nbytes)
        return await self._run(nbytes, lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def chat(self, conversation: list[dict], add_generation_prompt: bool, fit: bool = True,
                   tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation through the chat template (given ``tools`` if it renders
        them); with ``fit``, ValueError if it cannot fit the context."""
        nbytes = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in conversation)
        if fit:
            self._check_size(nbytes)

        def build() -> list[int]:
            try:
                text = self.tokenizer.apply_chat_template(conversation, tokenize=False, tools=tools,
                                                          add_generation_prompt=add_generation_prompt)
            except Exception as exc:  # the template refused this conversation (raise_exception)
                raise ValueError(f"the chat template cannot render these messages: {exc}") from exc
            return self.tokenizer.encode(text, add_special_tokens=False)

        return await self._run(nbytes, build)
