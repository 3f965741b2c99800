"""Offline batch API in the shape vLLM users know: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.outputs import RequestOutput
from shoal.engine.request import FinishReason
from shoal.engine.sampler import Logprob
from shoal.engine.sampling_params import SamplingParams
from shoal.server.tools import ToolCall, ToolCalling

Message = dict[str, Any]


@dataclass
class Completion:
    """One generated sequence."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[tuple[Logprob, list[Logprob]]] | None = None
    index: int = 0  # which of the prompt's n completions
    tool_calls: list[ToolCall] = field(default_factory=list)  # parsed out of text (chat with tools)


@dataclass
class GenerationOutput:
    """The result for one prompt; ``outputs[0].text`` is the answer, as in vLLM."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
    num_cached_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text


class LLM:
    """Runs prompts to completion on one in-process engine."""

    def __init__(self, model: str | None = None, *, tool_parser: str | None = None, tool_prompt: str = "auto",
                 **engine_options) -> None:
        """``tool_parser`` / ``tool_prompt`` override the model's tool-call format (see :class:`ToolCalling`)."""
        self.engine = Engine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self.tool_calling = ToolCalling(self.tokenizer, tool_parser, tool_prompt)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
    ) -> list[GenerationOutput]:
        """Generate for each prompt (text, or token ids). Results come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        texts: list[str | None] = []
        token_lists: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                token_lists.append(self.tokenizer.encode(p))  # with the model's BOS, as vLLM and HF do
            else:
                texts.append(None)
                token_lists.append(list(p))
        return self._run(texts, token_lists, params, priority)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
    ) -> list[GenerationOutput]:
        """Apply the model's chat template to each conversation and generate the assistant turn.
        With ``tools`` (OpenAI's format, and its ``tool_choice``), calls are held to the tools'
        schemas as the server does, and come back parsed as each completion's ``tool_calls``."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        choice = tool_choice or ("auto" if tools else "none")
        calling = bool(tools) and choice != "none"
        texts: list[str | None] = []
        token_lists: list[list[int]] = []
        for conv in conversations:
            conv = self.tool_calling.conversation([dict(m) for m in conv], tools, choice)
            text = self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True,
                                                      tools=self.tool_calling.template_tools(tools, choice))
            texts.append(text)
            token_lists.append(self.tokenizer.encode(text, add_special_tokens=False))
        if calling:
            grammar = self.tool_calling.grammar(tools, choice, parallel_tool_calls)
            listed = [params] * len(token_lists) if params is None or isinstance(params, SamplingParams) else params
            if any(p is not None and p.structured_outputs is not None for p in listed):
                raise ValueError("structured_outputs cannot be combined with tool calls (tool_choice other than none)")
            params = [dataclasses.replace(p or SamplingParams(), structured_outputs=grammar) for p in listed]
        results = self._run(texts, token_lists, params, None)
        if calling:
            for c in (c for r in results for c in r.outputs):
                content, c.tool_calls = self.tool_calling.parse(c.text)
                c.text = content or ""
        return results

    def _run(
        self,
        texts: list[str | None],
        token_lists: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None,
        priority: Sequence[int] | None,
    ) -> list[GenerationOutput]:
        n = len(token_lists)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * n
        if len(params) != n or (priority is not None and len(priority) != n):
            raise ValueError("params and priority must have one entry per prompt")
        # Validate every prompt before queueing any, so bad input changes nothing.
        for tokens in token_lists:
            self.engine._validate_prompt(tokens)
        for p in params:
            self.engine._matcher(p, [])  # a grammar that does not compile is refused here, not mid-batch
        results: list[GenerationOutput] = []
        owners: dict[str, tuple[GenerationOutput, Completion]] = {}  # engine request -> what it fills
        for i, tokens in enumerate(token_lists):
            result = GenerationOutput(prompt=texts[i], prompt_token_ids=tokens)
            results.append(result)
            for j in range(params[i].n):
                rid = self.engine.add(tokens, params[i].for_choice(j), priority=priority[i] if priority else 0)
                result.outputs.append(Completion(text="", token_ids=[], finish_reason=None, index=j))
                owners[rid] = (result, result.outputs[-1])
        pending = set(owners)
        try:
            while pending:
                for out in self.engine.step():
                    if out.req_id in pending:
                        if out.finished:
                            pending.discard(out.req_id)
                        _accumulate(*owners[out.req_id], out)
        except BaseException:  # leave nothing of this batch behind in the engine
            for rid in pending:
                self.engine.abort(rid)
            self.engine.step()  # hand out (and drop) the abort outputs
            raise
        return results


def _accumulate(result: GenerationOutput, c: Completion, out: RequestOutput) -> None:
    c.text += out.new_text
    c.token_ids.extend(out.new_token_ids)
    if out.logprobs:
        c.logprobs = (c.logprobs or []) + out.logprobs
    if out.finished:
        c.finish_reason = out.finish_reason.value if out.finish_reason else None
        c.stop_reason = out.stop_reason
        result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
        if out.first_token_time is not None:  # over the n completions: the first token, the last finish
            ttft = out.first_token_time - out.arrival_time
            result.ttft_s = ttft if result.ttft_s is None else min(result.ttft_s, ttft)
        if out.finished_time is not None:
            result.e2e_s = max(result.e2e_s or 0.0, out.finished_time - out.arrival_time)
        if out.finish_reason is FinishReason.ERROR:
            raise RuntimeError(f"request failed: {out.error}")
