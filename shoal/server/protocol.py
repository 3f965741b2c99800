"""OpenAI API request schemas (pydantic) and their translation to :class:`SamplingParams`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator, model_validator

from shoal.engine.guided import StructuredOutputs
from shoal.engine.request import PRIORITY_MAX, PRIORITY_MIN
from shoal.engine.sampling_params import MAX_INT32, MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingParams
from shoal.engine.speculative import MAX_LOOKUP, MAX_SPECULATIVE_TOKENS, SpeculativeConfig



def _integral(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer, so the API does; ``true`` and ``"2"`` stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Int(ge: int, le: int, bound: str | None = None, **field: Any) -> Any:
    """A strictly typed integer in [ge, le]. ``bound`` marks limits the served OpenAPI document
    states exactly (see :func:`bind_limits`): the model's ("vocab", "context"), or 64-bit ones
    ("int64"), which FastAPI would otherwise round through a float."""
    extra = {"json_schema_extra": {"x-shoal-bound": bound}} if bound else {}
    return Annotated[int, Field(strict=True, ge=ge, le=le, **extra, **field), BeforeValidator(_integral)]


# Every number is bounded and strictly typed at the edge: ``false`` is not token 0, "0.5" is not a
# float, and no integer reaches the engine that it cannot hold (a 10**400 priority once stopped it).
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TokenId = Int(0, MAX_INT32, "vocab")
Count = Int(1, MAX_INT32, "context")
Text = Annotated[str, Field(min_length=1)]
MAX_STOPS = 64  # stop strings (or stop token ids) per request: each is checked on every token


def bind_limits(schema: dict, max_token_id: int, max_tokens: int) -> dict:
    """Write the exact bounds of every marked field of an OpenAPI document: the served model's
    largest token id and completion length, and 64-bit seeds; returns the document."""
    limits = {"vocab": (0, max_token_id), "context": (1, max_tokens), "int64": (SEED_MIN, SEED_MAX)}
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            bound = node.pop("x-shoal-bound", None)
            if bound in limits:
                node["minimum"], node["maximum"] = limits[bound]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every 4xx and 5xx answer has."""

    error: ErrorInfo


def _reject_surrogates(value: Any) -> None:
    """Raise if any string in a parsed JSON value holds a lone UTF-16 surrogate (JSON allows
    ``"\\ud800"``; no tokenizer or encoder can take it). Iterative: nesting depth is the client's."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise ValueError(f"text holds a lone UTF-16 surrogate at position {exc.start}, "
                                     "which is not valid Unicode") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


class _Body(BaseModel):
    """A request body: any string in it must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _reject_surrogates(data)
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # usage so far on every chunk (vLLM)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None  # guided decoding is always strict


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of these."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[Text], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None


class SpeculativeConfigBody(BaseModel):
    """A request's n-gram speculative decoding (vLLM's ``speculative_config`` shape)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram"] = "ngram"
    num_speculative_tokens: Int(0, MAX_SPECULATIVE_TOKENS) = SpeculativeConfig.num_speculative_tokens
    prompt_lookup_max: Int(1, MAX_LOOKUP) = SpeculativeConfig.prompt_lookup_max
    prompt_lookup_min: Int(1, MAX_LOOKUP) = SpeculativeConfig.prompt_lookup_min


IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")
"""Accepted fields that change nothing in the output (``user`` names the tenant). Any other field
Shoal does not implement is refused with a 400 naming it."""


class _SamplingRequest(_Body):
    """Fields shared by completions and chat completions (OpenAI names, plus vLLM extensions)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: Count | None = None
    temperature: Annotated[Float, Field(ge=0)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    n: Int(1, 16) = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Int(SEED_MIN, SEED_MAX, "int64") | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    logit_bias: Annotated[dict[str, Annotated[Float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = None
    response_format: ResponseFormat | None = None
    # extensions, as vLLM names them
    top_k: Int(-1, MAX_INT32) | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[Float, Field(gt=0)] = 1.0
    stop_token_ids: Annotated[list[Int(0, MAX_INT32)], Field(max_length=MAX_STOPS)] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: Int(PRIORITY_MIN, PRIORITY_MAX, description="Lower runs first.") = 0
    session_id: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="The conversation or agent program this request belongs to (or the X-Session-Id "
                          "header): it stays on the instance holding its KV, and its turns are scheduled together.")
    more_turns: StrictBool | None = Field(
        None, description="Another turn of this session follows (or the X-More-Turns header): the engine keeps "
                          "its KV for a time learned from the session's and tool's past pauses.")
    tool: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        None, description="The tool this turn's reply calls (or the X-Tool header); pauses are learned per tool.")
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="Share prefix-cache KV only with requests of the same salt (vLLM's field).")
    slo_ttft_ms: Annotated[Float, Field(ge=1, le=3_600_000)] | None = Field(
        None, description="This request's time-to-first-token objective (default: the server's --slo-ttft-ms): "
                          "deadline admission orders by it and dispatch predicts against it.")
    slo_tpot_ms: Annotated[Float, Field(ge=1, le=3_600_000)] | None = Field(
        None, description="This request's time-per-output-token objective (default: the server's --slo-tpot-ms).")
    structured_outputs: StructuredOutputsBody | None = None
    speculative_config: SpeculativeConfigBody | None = Field(
        None, description="Draft tokens by prompt lookup (n-gram) and verify them in one pass; overrides the "
                          "server's --speculative-config (num_speculative_tokens 0 turns it off).")
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[Text], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None and not all(re.fullmatch(r"\d{1,10}", k) for k in bias):
            raise ValueError("logit_bias keys must be token ids")
        return bias

    def structured(self) -> tuple[StructuredOutputs | None, str | None]:
        """The output constraint this request asks for, and the field that asked (ValueError if
        more than one field asks)."""
        asked: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise ValueError("response_format of type json_schema needs a json_schema")
            asked.append(("response_format", {"json": rf.json_schema.schema_}))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            asked.append(("structured_outputs", {k: v for k, v in {
                "json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                "json_object": so.json_object or False}.items() if v}))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked.append((name, {key: getattr(self, name)}))
        if not asked:
            return None, None
        if len(asked) > 1:
            raise ValueError(f"give one output constraint, not {len(asked)}: {', '.join(n for n, _ in asked)}")
        name, spec = asked[0]
        return StructuredOutputs(**spec), name

    def sampling_params(self, default_max_tokens: int, logprobs: int | None, index: int = 0,
                        structured: StructuredOutputs | None = None) -> SamplingParams:
        """Engine sampling parameters for choice ``index`` (seeds differ per choice), held to
        ``structured`` if given."""
        return SamplingParams(
            n=self.n,
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            structured_outputs=structured,
            speculative_config=None if self.speculative_config is None else SpeculativeConfig(
                **self.speculative_config.model_dump()),
        ).for_choice(index)


class CompletionRequest(_SamplingRequest):
    prompt: (Text | Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
    logprobs: Int(0, MAX_LOGPROBS) | None = None
    echo: StrictBool = False
    suffix: str | None = None  # refused when given: Shoal does not insert
    add_special_tokens: StrictBool = True  # text prompts get the tokenizer's BOS etc., as in vLLM


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are served (an image or audio part
    is refused with a 400 naming its type)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type", "text") != "text":
            raise ValueError(f"content part of type {str(data['type'])[:40]!r} is not supported (text only)")
        return data


class FunctionCall(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str | dict[str, Any]


class ToolCallMessage(BaseModel):
    """A call in an assistant turn of the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None  # calls are always held to the schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    max_completion_tokens: Count | None = None
    logprobs: StrictBool = False
    top_logprobs: Int(0, MAX_LOGPROBS) | None = None
    add_generation_prompt: StrictBool = True

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def effective_tool_choice(self) -> str | dict:
        """``tool_choice`` as given, defaulting as OpenAI does (``auto`` with tools, else ``none``);
        ValueError if it names a tool not offered."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if choice != "none" and not self.tools:
            raise ValueError(f"tool_choice {choice if isinstance(choice, str) else 'of a function'} needs tools")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
            return choice.model_dump()
        return choice


class TokenizeCompletionRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True


class TokenizeChatRequest(_Body):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: StrictBool = True


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[TokenId]
