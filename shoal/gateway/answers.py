"""One answer as the gateway keeps it (a cached reply, a small model's checked reply): taken from a
whole OpenAI response or from its event stream, and given back as either."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Answer:
    """The single choice of a chat or text completion."""

    chat: bool
    content: str
    finish_reason: str | None
    usage: dict

    @classmethod
    def of_response(cls, data: dict | None, chat: bool) -> "Answer | None":
        """The answer of a whole response, if it has exactly one plain choice (no tool calls)."""
        try:
            (choice,) = data["choices"]
            text = choice["message"]["content"] if chat else choice["text"]
            if chat and choice["message"].get("tool_calls"):
                return None
            return cls(chat, text or "", choice.get("finish_reason"), dict(data.get("usage") or {}))
        except (KeyError, TypeError, ValueError):
            return None

    def response(self, model: str) -> dict:
        """A whole OpenAI response carrying this answer."""
        base = {"id": _id(self.chat), "created": int(time.time()), "model": model, "usage": self.usage}
        if self.chat:
            return {**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": self.content},
                "logprobs": None, "finish_reason": self.finish_reason}]}
        return {**base, "object": "text_completion", "choices": [{
            "index": 0, "text": self.content, "logprobs": None, "finish_reason": self.finish_reason}]}

    def events(self, model: str, include_usage: bool, piece_chars: int = 16) -> list[bytes]:
        """The answer as server-sent events, ``piece_chars`` characters an event, then ``[DONE]``."""
        rid, created = _id(self.chat), int(time.time())
        kind = "chat.completion.chunk" if self.chat else "text_completion"

        def event(choices: list[dict], **extra) -> bytes:
            data = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
            return f"data: {json.dumps(data)}\n\n".encode()

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not self.chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        out = [event([choice(None, None, first=True)])] if self.chat else []
        pieces = [self.content[i:i + piece_chars] for i in range(0, len(self.content), piece_chars)]
        out += [event([choice(p, None)]) for p in pieces[:-1]]
        out.append(event([choice(pieces[-1] if pieces else "", self.finish_reason)]))
        if include_usage:
            out.append(event([], usage=self.usage))
        return out + [b"data: [DONE]\n\n"]


class StreamCapture:
    """Reads the events relayed to a client and keeps the answer they spell (for the cache)."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self._buffer = b""
        self._text: list[str] = []
        self._finish: str | None = None
        self._usage: dict = {}
        self._broken = False  # an error event, a tool call or a second choice: nothing to keep

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            try:
                data = json.loads(line[6:])
            except ValueError:
                self._broken = True
                continue
            if "error" in data:
                self._broken = True
            self._usage = data.get("usage") or self._usage
            for choice in data.get("choices", []):
                if choice.get("index", 0) != 0:
                    self._broken = True
                delta = choice.get("delta", {}) if self.chat else {"content": choice.get("text")}
                if delta.get("tool_calls"):
                    self._broken = True
                self._text.append(delta.get("content") or "")
                self._finish = choice.get("finish_reason") or self._finish

    def answer(self) -> Answer | None:
        if self._broken or self._finish is None:
            return None
        return Answer(self.chat, "".join(self._text), self._finish, self._usage)


def _id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
