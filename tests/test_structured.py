"""Guided decoding, structured outputs and tool calling on the real SmolLM2: through the engine
(batched with free requests, preempted, migrated) and through the OpenAI API with the official
client (``parse()``, ``tools`` auto / required / named, streamed tool-call deltas, a tool-result
round trip), plus the fields that used to be silently dropped."""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.guided import StructuredOutputs
from shoal.engine.request import FinishReason
from shoal.engine.sampling_params import SamplingParams
from tests._server_util import MODEL_NAME, load_engine, serve

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
EXTRACT = [{"role": "user", "content": "Extract the person's name and age as JSON: Alice is 31 years old."}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                    "properties": {"city": {"type": "string", "maxLength": 40},
                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "send_email", "description": "Send an email",
     "parameters": {"type": "object", "additionalProperties": False, "required": ["to", "body"],
                    "properties": {"to": {"type": "string", "maxLength": 40},
                                   "body": {"type": "string", "maxLength": 60}}}}},
]
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine():
    return load_engine()


@pytest.fixture(scope="module")
def srv(engine):
    server, async_engine = serve(engine)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    http = httpx.Client(base_url=server.url, timeout=120)
    yield client, http
    http.close()
    client.close()
    server.stop()


def prompt(engine, messages=EXTRACT) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, str]:
    for rid, (ids, params) in requests.items():
        engine.add(ids, params, req_id=rid)
    text: dict[str, str] = defaultdict(str)
    while engine.has_unfinished():
        for out in engine.step():
            text[out.req_id] += out.new_text
    return dict(text)


def guided(temperature: float = 0.0, seed: int | None = None, **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=80,
                          structured_outputs=StructuredOutputs(**constraint))


# ---- the engine ----------------------------------------------------------------------------------


def test_every_kind_of_constraint_holds_greedy_and_sampled(engine):
    ids = prompt(engine)
    grammar = 'start: "The answer is " NUM "."\nNUM: /[0-9]{1,3}/'
    for t, seed in ((0.0, None), (1.0, 3)):
        out = run(engine, {
            "schema": (ids, guided(t, seed, json=PERSON)),
            "object": (ids, guided(t, seed, json_object=True)),
            "regex": (ids, guided(t, seed, regex=r"[0-9]{3}-[0-9]{4}")),
            "choice": (ids, guided(t, seed, choice=["yes", "no", "maybe"])),
            "grammar": (ids, guided(t, seed, grammar=grammar)),
        })
        jsonschema.validate(json.loads(out["schema"]), PERSON)
        assert isinstance(json.loads(out["object"]), dict)
        assert len(out["regex"]) == 8 and out["regex"][3] == "-" and out["regex"].replace("-", "").isdigit()
        assert out["choice"] in ("yes", "no", "maybe")
        assert out["grammar"].startswith("The answer is ") and out["grammar"].endswith(".")
    assert json.loads(run(engine, {"a": (ids, guided(json=PERSON))})["a"])["name"] == "Alice"


def test_guided_requests_leave_free_ones_in_the_batch_unchanged(engine):
    free = SamplingParams(temperature=0.0, max_tokens=24)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=24)
    ids, other = prompt(engine), prompt(engine, WEATHER)
    alone = run(engine, {"free": (other, free), "seeded": (other, seeded)})
    mixed = run(engine, {"free": (other, free), "g1": (ids, guided(json=PERSON)), "seeded": (other, seeded),
                         "g2": (ids, guided(1.0, 5, json=PERSON))})
    assert mixed["free"] == alone["free"] and mixed["seeded"] == alone["seeded"]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_a_preempted_guided_request_keeps_a_valid_output(engine, mode):
    """Room for two requests: a third with a better priority preempts a guided one mid-output."""
    ids = prompt(engine)
    need = -(-(len(ids) + 24) // 16)  # blocks of one request a few tokens into its answer
    small = Engine(EngineConfig(dtype="bfloat16", device="cpu", block_size=16, num_blocks=2 * need + 1,
                                num_swap_blocks=64, preemption_mode=mode, enable_prefix_caching=False),
                   model=engine.model, tokenizer=engine.tokenizer)
    schema = {**PERSON, "properties": {**PERSON["properties"], "name": {"type": "string", "maxLength": 60}}}
    params = guided(1.0, 11, json=schema)
    text: dict[str, str] = defaultdict(str)
    for rid in ("a", "b"):
        small.add(ids, params, req_id=rid, priority=1)
    for _ in range(6):
        for out in small.step():
            text[out.req_id] += out.new_text
    small.add(ids, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True), req_id="urgent", priority=0)
    preempted = []
    while small.has_unfinished():
        for out in small.step():
            text[out.req_id] += out.new_text
        preempted += small.last_plan.preempted
    assert preempted and all(m.value == mode for _, m in preempted)
    for rid in ("a", "b"):
        jsonschema.validate(json.loads(text[rid]), schema)  # the grammar state survived the preemption
    small.block_manager.check()


def test_a_migrated_guided_request_continues_its_grammar(engine):
    dst = Engine(EngineConfig(dtype="bfloat16", device="cpu", num_blocks=64, num_swap_blocks=0),
                 model=engine.model, tokenizer=engine.tokenizer)
    ids = prompt(engine)
    params = guided(1.0, 2, json=PERSON)
    reference = run(engine, {"ref": (ids, params)})["ref"]
    engine.add(ids, params, req_id="m")
    text = ""
    while len(text) < 8:
        text += "".join(o.new_text for o in engine.step())
    dst.import_(engine.export("m"))
    text += run(dst, {})["m"]
    assert text == reference
    jsonschema.validate(json.loads(text), PERSON)


def test_a_grammar_that_does_not_compile_is_refused_and_changes_nothing(engine):
    before = len(engine.requests)
    with pytest.raises(ValueError, match="does not compile"):
        engine.add(prompt(engine), guided(regex="[a-"))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    assert len(engine.requests) == before


def test_logit_bias_steers_the_sampler(engine):
    ids = prompt(engine, WEATHER)
    comma = engine.tokenizer.encode(",", add_special_tokens=False)[0]
    out = run(engine, {"b": (ids, SamplingParams(temperature=0.0, max_tokens=4, logit_bias={comma: 100}))})
    assert out["b"] == ",,,,"
    free = run(engine, {"f": (ids, SamplingParams(temperature=0.0, max_tokens=1))})["f"]
    first = engine.tokenizer.encode(free, add_special_tokens=False)[0]
    banned = run(engine, {"x": (ids, SamplingParams(temperature=0.0, max_tokens=1, logit_bias={first: -100}))})["x"]
    assert banned != free
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add(ids, SamplingParams(logit_bias={engine.vocab_size: 1.0}))


# ---- the OpenAI API ------------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int


def test_parse_with_a_pydantic_model(srv):
    client, _ = srv
    r = client.chat.completions.parse(model=MODEL_NAME, messages=EXTRACT, response_format=Person, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Person) and r.choices[0].message.parsed.name == "Alice"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_response_format_json_schema_and_json_object(srv, temperature):
    client, _ = srv
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=MODEL_NAME, messages=EXTRACT, response_format=fmt,
                                       temperature=temperature, seed=1, max_tokens=80)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.chat.completions.create(model=MODEL_NAME, messages=EXTRACT, response_format={"type": "json_object"},
                                       temperature=temperature, seed=1, max_tokens=80)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_structured_outputs_and_guided_fields(srv):
    client, http = srv
    for extra in ({"structured_outputs": {"choice": ["yes", "no"]}}, {"guided_choice": ["yes", "no"]}):
        r = client.chat.completions.create(model=MODEL_NAME, messages=WEATHER, extra_body=extra, max_tokens=10)
        assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model=MODEL_NAME, prompt="Call me at ", max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    assert len(r.choices[0].text) == 8
    r = client.chat.completions.create(model=MODEL_NAME, messages=EXTRACT, max_tokens=80,
                                       extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    for grammar in ('start: "sunny" | "rainy"', 'root ::= weather\nweather ::= "sunny" | "rainy"'):  # Lark, GBNF
        r = client.chat.completions.create(model=MODEL_NAME, messages=WEATHER, max_tokens=10,
                                           extra_body={"guided_grammar": grammar})
        assert r.choices[0].message.content in ("sunny", "rainy")


def test_bad_constraints_are_400s_naming_the_problem(srv):
    _, http = srv
    base = {"messages": WEATHER, "max_tokens": 5}
    cases = [
        ({"guided_regex": "[a-"}, "guided_regex", "regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format", "strin"),
        ({"guided_regex": "a+", "guided_choice": ["x"]}, None, "one output constraint"),
        ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"}, "response_format", "tool"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ]
    for extra, param, words in cases:
        r = http.post("/v1/chat/completions", json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text
    assert http.post("/v1/chat/completions", json=base).status_code == 200  # nothing was lost


@pytest.mark.parametrize("choice", ["required", "auto", {"type": "function", "function": {"name": "send_email"}}])
def test_tool_calls_name_a_real_tool_with_valid_arguments(srv, choice):
    client, _ = srv
    r = client.chat.completions.create(model=MODEL_NAME, messages=WEATHER, tools=TOOLS, tool_choice=choice,
                                       temperature=0, max_tokens=120)
    c = r.choices[0]
    if choice == "auto" and not c.message.tool_calls:  # a plain answer is allowed
        assert c.message.content and c.finish_reason in ("stop", "length")
        return
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in c.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    if isinstance(choice, dict):
        assert {call.function.name for call in c.message.tool_calls} == {"send_email"}
    else:
        assert c.message.tool_calls[0].function.name == "get_weather"


def test_streamed_tool_call_deltas_reassemble_to_the_same_calls(srv):
    client, _ = srv
    kwargs = dict(model=MODEL_NAME, messages=WEATHER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = d.id or call["id"]
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_a_tool_result_round_trip_reaches_the_prompt(srv):
    client, http = srv
    first = client.chat.completions.create(model=MODEL_NAME, messages=WEATHER, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=120).choices[0].message
    history = [*WEATHER, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "18 C, light rain"}]
    tokens = http.post("/tokenize", json={"messages": history}).json()["tokens"]
    rendered = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather"' in rendered
    assert "<tool_response>\n18 C, light rain\n</tool_response>" in rendered
    r = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_and_no_tools_render_no_tools(srv):
    _, http = srv
    for body in ({"messages": WEATHER}, {"messages": WEATHER, "tools": TOOLS, "tool_choice": "none"}):
        r = http.post("/v1/chat/completions", json={**body, "max_tokens": 3})
        assert r.status_code == 200 and "tool_calls" not in r.json()["choices"][0]["message"]


def test_fields_shoal_does_not_honour_are_refused(srv):
    _, http = srv
    chat = {"messages": WEATHER, "max_tokens": 3}
    r = http.post("/v1/completions", json={"prompt": "hi", "suffix": " end", "max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = http.post("/v1/chat/completions", json={**chat, "prediction": {"type": "content", "content": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction"
    r = http.post("/v1/chat/completions", json={**chat, "logit_bias": {"not-a-token": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    r = http.post("/v1/chat/completions", json={**chat, "logit_bias": {"999999": 1}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    ok = http.post("/v1/chat/completions", json={**chat, "user": "u1", "metadata": {"k": "v"}, "store": False,
                                                  "service_tier": "auto"})
    assert ok.status_code == 200


def test_continuous_usage_stats_on_every_chunk(srv):
    client, _ = srv
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=WEATHER, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_choices = [c for c in chunks[1:] if c.choices]
    assert with_choices and all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens == 5


def test_get_one_model(srv):
    client, http = srv
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    r = http.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_llm_generate_and_chat_take_structured_outputs_and_tools():
    from shoal.llm import LLM

    llm = LLM(dtype="bfloat16", max_model_len=1024, kv_cache_gb=0.1)
    out = llm.generate("Is the sky blue? Answer:", guided(choice=["yes", "no"]))
    assert out[0].text in ("yes", "no")
    out = llm.chat(WEATHER, SamplingParams(temperature=0.0, max_tokens=120), tools=TOOLS, tool_choice="required")
    call = out[0].outputs[0].tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "Paris"
    with pytest.raises(ValueError, match="cannot be combined"):
        llm.chat(WEATHER, guided(choice=["a"]), tools=TOOLS, tool_choice="required")


def test_langchain_bind_tools_and_with_structured_output(srv):
    langchain_openai = pytest.importorskip("langchain_openai")
    client, _ = srv
    chat = langchain_openai.ChatOpenAI(base_url=str(client.base_url), api_key="x", model=MODEL_NAME,
                                       temperature=0, max_tokens=120, max_retries=0)
    msg = chat.bind_tools(TOOLS, tool_choice="required").invoke("What's the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"]["city"] == "Paris"
    for method in ("json_schema", "function_calling"):
        person = chat.with_structured_output(Person, method=method).invoke(EXTRACT[0]["content"])
        assert isinstance(person, Person) and person.name == "Alice", method


# ---- tool-call formats ---------------------------------------------------------------------------


class _Template:
    def __init__(self, chat_template: str) -> None:
        self.chat_template = chat_template


def _follows(engine, spec: StructuredOutputs, text: str) -> bool:
    matcher = engine.grammar_compiler.matcher(spec)
    return all(matcher.consume_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)) \
        and matcher.is_accepting()


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_each_tool_format_round_trips_through_its_grammar_parser_and_stream(engine, parser):
    from shoal.server.tools import ToolCalling

    calling = ToolCalling(_Template(""), parser)
    written = calling.format.separator.join(
        calling.format.write(n, a) for n, a in (("get_weather", {"city": "Paris"}), ("send_email", {"to": "a", "body": "b"})))
    grammar = calling.grammar(TOOLS, "required", parallel=True)
    assert _follows(engine, grammar, written)
    assert not _follows(engine, grammar, calling.format.write("get_weather", {"town": "Paris"}))  # not its schema
    assert not _follows(engine, calling.grammar(TOOLS, "required", parallel=False), written)  # one call only
    assert _follows(engine, calling.grammar(TOOLS, "auto", parallel=True), "It is sunny.")
    content, calls = calling.parse(written)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("send_email", {"to": "a", "body": "b"})]
    stream, got = calling.stream(), []
    for i in range(0, len(written), 3):  # three characters at a time
        text, new = stream.feed(written[i:i + 3])
        assert text == ""
        got += new
    assert [c.name for c in got] == ["get_weather", "send_email"]
    assert calling.parse("Just text.") == ("Just text.", [])


def test_the_tool_prompt_follows_the_template_unless_overridden():
    from shoal.server.tools import ToolCalling

    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    knows = ToolCalling(_Template("{% for tool in tools %}...{% endfor %}"))
    assert knows.template_renders and knows.template_tools(TOOLS, "auto") == TOOLS
    conv = knows.conversation(history, TOOLS, "auto")
    assert conv[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and conv[1]["tool_call_id"] == "c1"
    plain = ToolCalling(_Template("{% for tool in tools %}...{% endfor %}"), prompt="system")
    conv = plain.conversation(history, TOOLS, "auto")
    assert conv[0]["role"] == "system" and "get_weather" in conv[0]["content"]
    assert conv[1]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert plain.template_tools(TOOLS, "auto") is None
    assert ToolCalling(_Template("<|python_tag|>")).format.name == "llama3_json"
    with pytest.raises(ValueError, match="parser"):
        ToolCalling(_Template(""), "mistral")
