"""Tool calling on the chat API: tools into the prompt, a grammar that holds the model to a valid
call, and the model's calls back out as OpenAI ``tool_calls``.

Two wire formats (:data:`FORMATS`), chosen per model and overridable:

- ``hermes`` (Qwen 2.5, Hermes 2/3, and the default for a template that knows no tools)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- ``llama3_json`` (Llama 3.1+ JSON tool calling): ``{"name": "get_weather", "parameters": {...}}``,
  parallel calls separated by ``; ``.

A chat template that takes ``tools`` renders them itself (``prompt="template"``); for one that does
not (SmolLM2's, ``prompt="system"``), the tools are described in the system message, past calls
are written in the wire format and tool results come back as ``tool`` turns in
``<tool_response>``. Either way the output is held by a Lark grammar: ``required`` and a named
function allow only calls of the offered tools with arguments valid against their schemas;
``auto`` allows those or a plain answer (one that does not start as a call does).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from shoal.engine.guided import COMPACT, StructuredOutputs

PROMPTS = ("auto", "template", "system")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes a call: ``open`` + JSON ``{"name", args_key}`` + ``close``."""

    name: str
    open: str
    close: str
    separator: str  # between parallel calls
    args_key: str

    def write(self, name: str, arguments: dict) -> str:
        return f"{self.open}{json.dumps({'name': name, self.args_key: arguments})}{self.close}"


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "", "arguments"),
    "llama3_json": ToolFormat("llama3_json", "", "", "; ", "parameters"),
}


class ToolCalling:
    """One model's tool calling: its wire format and whether its template renders tools."""

    def __init__(self, tokenizer, parser: str | None = None, prompt: str = "auto") -> None:
        if parser is not None and parser not in FORMATS:
            raise ValueError(f"tool-call parser must be one of {', '.join(FORMATS)}, got {parser!r}")
        if prompt not in PROMPTS:
            raise ValueError(f"tool prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
        template = getattr(tokenizer, "chat_template", None) or ""
        self.template_renders = "tools" in template if prompt == "auto" else prompt == "template"
        if parser is None:
            parser = "llama3_json" if "<|python_tag|>" in template or "ipython" in template else "hermes"
        self.format = FORMATS[parser]

    # ---- into the prompt ------------------------------------------------------------------------

    def conversation(self, messages: list[dict], tools: list[dict] | None, choice: str | dict) -> list[dict]:
        """Messages for the chat template. ``messages`` are OpenAI dicts (``tool_calls`` on
        assistant turns, ``tool_call_id`` on tool turns). For a template that renders tools, calls
        are passed as templates expect them (arguments as objects); otherwise calls become the
        assistant's text in the wire format, tool results ``<tool_response>`` turns, and the tools
        a system message."""
        out = []
        for m in messages:
            calls = m.get("tool_calls") or []
            if self.template_renders:
                msg = {"role": m["role"], "content": m.get("content") or ""}
                if calls:
                    msg["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
                        "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
                        for c in calls]
                if m.get("tool_call_id"):
                    msg["tool_call_id"] = m["tool_call_id"]
                out.append(msg)
                continue
            content = m.get("content") or ""
            if calls:
                written = self.format.separator.join(
                    self.format.write(c["function"]["name"], _arguments(c["function"]["arguments"])) for c in calls)
                content = f"{content}\n{written}" if content else written
            if m["role"] == "tool":
                content = f"<tool_response>\n{content}\n</tool_response>"
            out.append({"role": m["role"], "content": content})
        if tools and choice != "none" and not self.template_renders:
            described = self.system_prompt(tools, choice)
            if out and out[0]["role"] in ("system", "developer"):
                out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + described}
            else:
                out.insert(0, {"role": "system", "content": described})
        return out

    def template_tools(self, tools: list[dict] | None, choice: str | dict) -> list[dict] | None:
        """The ``tools`` argument for the chat template (None when it does not render them)."""
        return tools if self.template_renders and tools and choice != "none" else None

    def system_prompt(self, tools: list[dict], choice: str | dict) -> str:
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
        key = self.format.args_key
        lines.append(f"To call one, answer with {self.format.open}"
                     f'{{"name": <function name>, "{key}": <arguments object>}}{self.format.close}')
        return "\n".join(lines)

    # ---- the constraint -------------------------------------------------------------------------

    def grammar(self, tools: list[dict], choice: str | dict, parallel: bool) -> StructuredOutputs | None:
        """The constraint for ``tool_choice``: None for ``none``; a call of one of ``tools`` (or the
        named one) for ``required`` / named; a call or a plain answer for ``auto``."""
        if choice == "none":
            return None
        if isinstance(choice, dict):
            tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
        fmt = self.format
        rules = []
        for i, tool in enumerate(tools):
            fn = tool["function"]
            schema = {"type": "object", "additionalProperties": False, "required": ["name", fmt.args_key],
                      "properties": {"name": {"const": fn["name"]},
                                     fmt.args_key: fn.get("parameters") or {"type": "object"}},
                      "x-guidance": COMPACT}
            rules.append(f"tool_{i}: %json {json.dumps(schema)}")
        alternatives = " | ".join(f"tool_{i}" for i in range(len(tools)))
        calls = (f"call ({json.dumps(fmt.separator)} call)*" if fmt.separator else "call+") if parallel else "call"
        first = (fmt.open or "{")[0]
        start = f"start: TEXT | calls\nTEXT: /[^{_regex_escape(first)}\\s](.|\\n)*/" if choice == "auto" else "start: calls"
        call = " ".join([json.dumps(fmt.open)] * bool(fmt.open) + [f"({alternatives})"] + [json.dumps(fmt.close)] * bool(fmt.close))
        return StructuredOutputs(grammar="\n".join([start, f"calls: {calls}", f"call: {call}", *rules]))

    # ---- out of the answer ----------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Split the model's answer into its plain content and its calls."""
        opener = self.format.open.strip()
        start = text.find(opener) if opener else 0  # a tagged call may follow some text
        calls, end = self._calls(text, max(start, 0)) if start >= 0 else ([], 0)
        if not calls:
            return text, []
        return (text[:start] + text[end:]).strip() or None, calls

    def _calls(self, text: str, pos: int) -> tuple[list[ToolCall], int]:
        """The complete calls in ``text`` from ``pos`` on, and where they end."""
        fmt, decoder, calls = self.format, json.JSONDecoder(), []
        while True:
            at = pos + len(text[pos:]) - len(text[pos:].lstrip())
            if fmt.separator and at > 0 and text.startswith(fmt.separator.strip(), at):  # after a call
                at += len(fmt.separator.strip())
                at += len(text[at:]) - len(text[at:].lstrip())
            if not text.startswith(fmt.open.strip() or "{", at):
                return calls, pos
            at += len(fmt.open.strip())
            at += len(text[at:]) - len(text[at:].lstrip())
            try:
                value, after = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return calls, pos
            if fmt.close:
                rest = text[after:].lstrip()
                if not rest.startswith(fmt.close.strip()):
                    return calls, pos
                after = len(text) - len(rest) + len(fmt.close.strip())
            if not (isinstance(value, dict) and isinstance(value.get("name"), str)):
                return calls, pos
            arguments = value.get(fmt.args_key, value.get("arguments", value.get("parameters", {})))
            calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments)))
            pos = after

    def stream(self) -> CallStream:
        return CallStream(self)


@dataclass
class CallStream:
    """Turns streamed text into content deltas and whole tool calls: text that may still become a
    call is held back; each call is sent once it is complete."""

    calling: ToolCalling
    text: str = ""
    sent: int = 0  # characters handed out as content, or consumed by calls
    calls: list[ToolCall] = field(default_factory=list)
    in_calls: bool = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The content to send now and the calls completed by ``delta``."""
        self.text += delta
        opener = self.calling.format.open.strip() or "{"
        if not self.in_calls:
            head = self.text.lstrip()
            if head.startswith(opener):
                self.in_calls = True
            elif head and opener.startswith(head) and not final:
                return "", []  # may still become a call
            else:
                content, self.sent = self.text[self.sent:], len(self.text)
                return content, []
        new, self.sent = self.calling._calls(self.text, self.sent)
        self.calls += new
        return "", new


def _regex_escape(ch: str) -> str:
    return "\\" + ch if ch in "\\^]-[{}/" else ch


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
