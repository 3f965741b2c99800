"""Structured outputs on SmolLM2-135M-Instruct, offline (``LLM``): schema validity over the
schemas of ``cases.py`` (greedy and temperature 1) and a BFCL-style tool-use evaluation, with and
without guided decoding. Writes ``result.json`` beside this file.

    python benchmarks/structured/run.py

Schema validity: the output parses and validates against its schema (``jsonschema``); a
truncated output counts as invalid. Tool use, per case, with ``tool_choice`` ``auto`` (every case) and ``required`` (the cases that
expect a call):
- ``valid``: every call the model made names an offered tool and its arguments validate;
- ``exact``: the model called exactly the expected function with exactly the expected arguments
  (strings compared case- and space-insensitively), or answered without a call when none was expected.
Without guided decoding the same prompt (tools described in the system message) is generated
freely and its calls parsed the same way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.structured.cases import SCHEMAS, TOOL_CASES, TOOLS  # noqa: E402
from shoal.engine.guided import StructuredOutputs  # noqa: E402
from shoal.engine.sampling_params import SamplingParams  # noqa: E402
from shoal.llm import LLM  # noqa: E402
from shoal.server.tools import ToolCall  # noqa: E402

MAX_TOKENS = 400
TOOL_MAX_TOKENS = 160  # a call fits; a plain answer is cut (it scores the same)


def schema_validity(llm: LLM) -> dict:
    result = {}
    for label, temperature in (("greedy", 0.0), ("temperature_1", 1.0)):
        convs = [[{"role": "user", "content": f"{p} Answer in JSON."}] for _, p, _ in SCHEMAS]
        params = [SamplingParams(temperature=temperature, seed=i, max_tokens=MAX_TOKENS,
                                 structured_outputs=StructuredOutputs(json=schema))
                  for i, (_, _, schema) in enumerate(SCHEMAS)]
        t0 = time.perf_counter()
        outs = llm.chat(convs, params)
        wall = time.perf_counter() - t0
        failures = []
        for (name, _, schema), out in zip(SCHEMAS, outs):
            try:
                jsonschema.validate(json.loads(out.text), schema)
            except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                failures.append({"schema": name, "finish_reason": out.outputs[0].finish_reason,
                                 "error": str(exc).splitlines()[0][:160], "text": out.text[:200]})
        result[label] = {"schemas": len(SCHEMAS), "valid": len(SCHEMAS) - len(failures),
                         "valid_rate": round(1 - len(failures) / len(SCHEMAS), 4), "wall_s": round(wall, 1),
                         "failures": failures}
    return result


def _norm(value):
    if isinstance(value, str):
        return " ".join(value.lower().split())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def score_calls(case: dict, calls: list[ToolCall]) -> tuple[bool, bool]:
    """(every call valid, the exact expected call or the expected absence of one)."""
    offered = {name: TOOLS[name]["function"]["parameters"] for name in case["tools"]}
    valid = True
    for call in calls:
        try:
            jsonschema.validate(json.loads(call.arguments), offered[call.name])
        except (KeyError, json.JSONDecodeError, jsonschema.ValidationError):
            valid = False
    expected = case["expected"]
    if expected is None:
        return valid, not calls
    exact = len(calls) == 1 and calls[0].name == expected["name"] and valid and \
        {k: _norm(v) for k, v in json.loads(calls[0].arguments).items()} == \
        {k: _norm(v) for k, v in expected["arguments"].items()}
    return valid, exact


def tool_eval(llm: LLM) -> dict:
    """Each mode: ``auto`` over every case (the model decides whether to call), ``required`` over
    the cases that expect a call (function choice and arguments alone); guided or free."""
    result = {}
    greedy = SamplingParams(temperature=0.0, max_tokens=TOOL_MAX_TOKENS)
    for choice in ("auto", "required"):
        cases = [c for c in TOOL_CASES if choice == "auto" or c["expected"] is not None]
        for mode in ("guided", "free"):
            t0 = time.perf_counter()
            if mode == "guided":
                outs = [llm.chat([{"role": "user", "content": c["prompt"]}], greedy,
                                 tools=[TOOLS[n] for n in c["tools"]], tool_choice=choice)[0].outputs[0]
                        for c in cases]
                calls = [o.tool_calls for o in outs]
            else:  # the same prompt, generated freely, parsed the same way
                convs = [llm.tool_calling.conversation([{"role": "user", "content": c["prompt"]}],
                                                       [TOOLS[n] for n in c["tools"]], choice) for c in cases]
                calls = [llm.tool_calling.parse(o.outputs[0].text)[1] for o in llm.chat(convs, greedy)]
            wall = time.perf_counter() - t0
            rows = []
            for case, made in zip(cases, calls):
                valid, exact = score_calls(case, made)
                rows.append({"id": case["id"], "calls": [(c.name, c.arguments) for c in made],
                             "valid": valid, "exact": exact})
            with_call = [(r, c) for r, c in zip(rows, cases) if c["expected"] is not None]
            result[f"{choice}_{mode}"] = {
                "cases": len(rows),
                "schema_valid_rate": round(sum(r["valid"] for r in rows) / len(rows), 4),
                "exact_call_accuracy": round(sum(r["exact"] for r in rows) / len(rows), 4),
                "called_when_expected": round(sum(bool(r["calls"]) for r, _ in with_call) / len(with_call), 4),
                "right_function": round(sum(bool(r["calls"]) and r["calls"][0][0] == c["expected"]["name"]
                                            for r, c in with_call) / len(with_call), 4),
                "wall_s": round(wall, 1),
                "rows": rows,
            }
    return result


def main() -> None:
    llm = LLM(dtype="bfloat16")
    result = {"model": "SmolLM2-135M-Instruct (bf16)", "max_tokens": MAX_TOKENS,
              "schema_validity": schema_validity(llm), "tool_use": tool_eval(llm)}
    out = Path(__file__).with_name("result.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: {m: {x: y for x, y in v.items() if x not in ("failures", "rows")} for m, v in r.items()}
               for k, r in result.items() if isinstance(r, dict)}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
