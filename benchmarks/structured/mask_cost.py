"""The cost of the grammar mask, served: ``shoal serve`` (default model and options) answers the
same chat prompt with 128 output tokens, free (``ignore_eos``) or under a JSON schema that cannot
end within 128 tokens (an array of at least 40 objects), at 1 and 32 concurrent requests. Rounds
alternate free / schema, three of each; the medians of output tok/s are compared. Also times a
first grammar compile (the tokenizer's conversion, once per process, then the schema itself).

    python benchmarks/structured/mask_cost.py          # writes mask_cost.json beside this file

Run it on an otherwise idle machine.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent))
from server_process import Server  # noqa: E402

MAX_TOKENS = 128
ROUNDS = 3
SCHEMA = {"type": "array", "minItems": 40, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "maxLength": 20}}}}
MESSAGES = [{"role": "user", "content": "List people with their name, age and city as JSON."}]


def body(guided: bool) -> dict:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}} \
        if guided else {"ignore_eos": True}
    return {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


async def round_(client: httpx.AsyncClient, guided: bool, concurrency: int, requests: int) -> float:
    """Output tok/s of ``requests`` requests, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with sem:
            r = await client.post("/v1/chat/completions", json=body(guided))
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one() for _ in range(requests)))
    assert all(t == MAX_TOKENS for t in tokens), tokens
    return sum(tokens) / (time.perf_counter() - t0)


async def measure(url: str) -> dict:
    result = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await round_(client, True, 1, 1)  # warm-up (and the schema's first compile)
        await round_(client, False, 1, 1)
        for concurrency, requests in ((1, 3), (32, 32)):
            rates = {"free": [], "schema": []}
            for _ in range(ROUNDS):
                for mode in ("free", "schema"):
                    rates[mode].append(await round_(client, mode == "schema", concurrency, requests))
            free, schema = statistics.median(rates["free"]), statistics.median(rates["schema"])
            result[f"concurrency_{concurrency}"] = {
                "free_tok_s": [round(x, 1) for x in rates["free"]], "schema_tok_s": [round(x, 1) for x in rates["schema"]],
                "median_free": round(free, 1), "median_schema": round(schema, 1), "ratio": round(schema / free, 3)}
    return result


def compile_times() -> dict:
    from shoal.engine.guided import GrammarCompiler, StructuredOutputs
    from shoal.model.loader import default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, 49152)
    t1 = time.perf_counter()
    compiler.matcher(StructuredOutputs(json=SCHEMA))
    t2 = time.perf_counter()
    compiler.matcher(StructuredOutputs(json=SCHEMA))
    t3 = time.perf_counter()
    return {"tokenizer_conversion_ms": round((t1 - t0) * 1e3, 1), "first_compile_ms": round((t2 - t1) * 1e3, 2),
            "cached_ms": round((t3 - t2) * 1e3, 3)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(log_dir=Path(tmp), name="mask_cost")
        try:
            server.wait_ready()
            result = asyncio.run(measure(server.url))
        finally:
            server.stop()
    result["compile"] = compile_times()
    out = Path(__file__).with_name("mask_cost.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
