"""Incremental detokenization with stop-string detection (vLLM's prefix/read offsets).

Each step decodes only the few tokens since ``prefix_offset``: the text of
``tokens[prefix_offset:read_offset]`` (already emitted) is subtracted from the
text of ``tokens[prefix_offset:]``. While the new text ends in U+FFFD (a
multi-byte character split across tokens under byte-level BPE) nothing is
emitted and the offsets stay put, so the character appears whole once the
token completing it arrives.
"""

from __future__ import annotations

from typing import Any

from shoal.engine.sampling_params import SamplingParams

# Prompt tokens decoded as left context so the first output token's text
# (e.g. a leading space under SentencePiece) comes out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, one token at a time.

    ``output_text`` holds all text so far (cut at a matched stop string); new
    text is handed out by :meth:`get_delta`, which holds back the last
    ``len(longest stop) - 1`` characters until finished so that a stop string
    is never streamed partially. EOS and stop token ids are the engine's job.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        # What ``tokenizer.decode(skip_special_tokens=True)`` drops: named special
        # tokens and added tokens flagged special (``all_special_ids`` alone misses the latter).
        self._skip_ids: set[int] = (
            set(tokenizer.all_special_ids)
            | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            if params.skip_special_tokens
            else set()
        )
        context = [i for i in prompt_token_ids if i not in self._skip_ids][-_CONTEXT_TOKENS:]
        self.tokens: list[str] = [tokenizer.convert_ids_to_tokens(i) for i in context]
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.output_text = ""
        self.finished = False
        self._sent = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    def update(self, token_id: int) -> str | None:
        """Append one generated token; return the stop string it completed, if any."""
        if self.finished:
            raise RuntimeError("update() called after the detokenizer finished")
        if token_id in self._skip_ids:
            return None
        self.tokens.append(self.tokenizer.convert_ids_to_tokens(token_id))
        return self._decode_pending(flush=False)

    def get_delta(self) -> str:
        """Text not handed out yet (minus the held-back tail while not finished)."""
        end = len(self.output_text)
        if not self.finished:
            end = max(end - self._hold, self._sent)
        delta = self.output_text[self._sent : end]
        self._sent = end
        return delta

    def finish(self) -> str:
        """Finish the request: decode any pending tokens and return all remaining text."""
        if not self.finished:
            self._decode_pending(flush=True)
            self.finished = True
        return self.get_delta()

    @property
    def emitted_len(self) -> int:
        """Characters of ``output_text`` already handed out by :meth:`get_delta`."""
        return self._sent

    def replay(self, token_ids: list[int], emitted_len: int) -> None:
        """Rebuild the state after ``token_ids`` on another engine (migration), marking the first
        ``emitted_len`` characters as already handed out."""
        for t in token_ids:
            self.update(t)
        self._sent = min(emitted_len, len(self.output_text))

    def _decode_pending(self, flush: bool) -> str | None:
        """Decode tokens after ``read_offset`` into ``output_text``; return a matched stop string."""
        if self.read_offset == len(self.tokens):
            return None
        to_string = self.tokenizer.convert_tokens_to_string
        prefix = to_string(self.tokens[self.prefix_offset : self.read_offset])
        text = to_string(self.tokens[self.prefix_offset :])
        if not flush and (len(text) <= len(prefix) or text.endswith("\ufffd")):
            return None  # incomplete character: wait for the token that completes it
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        start = len(self.output_text)
        self.output_text += text[len(prefix) :]
        return self._check_stop(start)

    def _check_stop(self, start: int) -> str | None:
        """Find the earliest stop string ending in text added at ``start``; cut output_text there."""
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            i = self.output_text.find(stop, max(start - len(stop) + 1, 0))
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        self.output_text = self.output_text[: i + len(stop) if self.params.include_stop_str_in_output else i]
        self.finished = True
        return stop
