"""Tool calling on the chat API: tools into the prompt, a grammar that holds the model to a valid
call, and the model's calls back out as OpenAI ``tool_calls``.

One wire format, Hermes-style (Qwen 2.5, Hermes 2/3, and what Shoal teaches a model whose chat
template knows no tools)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that takes ``tools`` renders them itself; for one that does not (SmolLM2's), the
tools are described in the system message and tool results come back as ``tool`` turns wrapped
in ``<tool_response>``. Either way the output is constrained by a Lark grammar: ``required`` and
a named function allow only calls of the offered tools with arguments valid against their schemas;
``auto`` allows those or a plain answer (one that does not start with ``<``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from shoal.engine.guided import COMPACT, StructuredOutputs

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def template_knows_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` argument."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template


def call_grammar(tools: list[dict], choice: str | dict, parallel: bool) -> StructuredOutputs | None:
    """The constraint for ``tool_choice``: None for ``none``; a call of one of ``tools`` (or the
    named one) for ``required`` / named; a call or a plain answer for ``auto``."""
    if choice == "none":
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    rules = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        schema = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": fn["name"]},
                                 "arguments": fn.get("parameters") or {"type": "object"}}}
        rules.append(f"tool_{i}: %json {json.dumps({**schema, 'x-guidance': COMPACT})}")
    alternatives = " | ".join(f"tool_{i}" for i in range(len(tools)))
    calls = "call+" if parallel else "call"
    start = "start: TEXT | calls\nTEXT: /[^<\\s](.|\\n)*/" if choice == "auto" else "start: calls"
    grammar = "\n".join([start, f"calls: {calls}", f'call: "{OPEN}\\n" ({alternatives}) "\\n{CLOSE}"', *rules])
    return StructuredOutputs(grammar=grammar)


def system_prompt(tools: list[dict], choice: str | dict) -> str:
    """The tools described for a model whose template cannot render them."""
    lines = ["You can call these tools. Each is a JSON schema of a function:", "<tools>"]
    lines += [json.dumps(t["function"]) for t in tools]
    lines.append("</tools>")
    if isinstance(choice, dict):
        lines.append(f"Call the function {choice['function']['name']}.")
    elif choice == "required":
        lines.append("Call one of the functions.")
    else:
        lines.append("Call a function if it helps answer; otherwise answer directly.")
    lines.append(f'To call one, answer with {OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n{CLOSE}')
    return "\n".join(lines)


def conversation(messages: list[dict], tools: list[dict] | None, choice: str | dict,
                 template_renders_tools: bool) -> list[dict]:
    """Messages for the chat template. ``messages`` are OpenAI dicts (``tool_calls`` on assistant
    turns, ``tool_call_id`` on tool turns). For a template that renders tools, calls are passed
    as the template expects them (arguments as objects); otherwise calls become the assistant's
    text in the wire format, tool results ``<tool_response>`` turns, and the tools a system message."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if template_renders_tools:
            msg = {"role": m["role"], "content": m.get("content") or ""}
            if calls:
                msg["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
                    "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}} for c in calls]
            if m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
            out.append(msg)
            continue
        content = m.get("content") or ""
        if calls:
            content = "\n".join([content] * bool(content) + [
                f'{OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])})}\n{CLOSE}'
                for c in calls])
        if m["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": m["role"], "content": content})
    if tools and choice != "none" and not template_renders_tools:
        described = system_prompt(tools, choice)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _arguments(arguments: str | dict) -> dict:
    """A call's arguments as an object (OpenAI sends them as JSON text)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(f"a tool call's arguments are not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("a tool call's arguments must be a JSON object")
    return value


def parse_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split the model's answer into its plain content and its calls (the wire format above)."""
    calls = []
    for m in _CALL.finditer(text):
        try:
            value = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = value.get("arguments", value.get("parameters", {}))
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments)))
    if not calls:
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, calls


class CallStream:
    """Turns streamed text into content deltas and whole tool calls: text that may still become
    ``<tool_call>`` is held back; each call is sent once it is complete."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of text handed out as content, or consumed by calls
        self.calls: list[ToolCall] = []
        self.in_calls = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The content to send now and the calls completed by ``delta``."""
        self.text += delta
        if not self.in_calls:
            head = self.text.lstrip()
            if head.startswith(OPEN):
                self.in_calls = True
            elif OPEN.startswith(head) and head and not final:
                return "", []  # may still become a call
            else:
                content, self.sent = self.text[self.sent:], len(self.text)
                return content, []
        new = []
        for m in _CALL.finditer(self.text, self.sent):
            _, parsed = parse_calls(m.group(0))
            new += parsed
            self.sent = m.end()
        self.calls += new
        return "", new
