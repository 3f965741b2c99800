"""Speculative decoding by prompt lookup at 1 concurrent: tok/s with and without drafts on
repetitive work (editing code, correcting a text, extracting JSON, an agent quoting a tool
result), SmolLM2-135M, greedy, the same run. Each prompt runs in both modes in alternating order,
``ROUNDS`` times; the figure is the median over rounds of the whole workload's tokens / seconds.
Also reports whether the greedy outputs are identical, and the share of drafts accepted.

    python benchmarks/speculative/run.py            # bf16 where the CPU has it, and fp32
    python benchmarks/speculative/run.py --dtype float32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from shoal import LLM, SamplingParams

ROUNDS = 3
MAX_TOKENS = 160
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax
'''
TEXT = ("The comittee met on tuesday to discus the new budjet. After a long debate, the members agreed "
        "to increase the funding for the libary and to reduce spending on office suplies. The next "
        "meeting will be held in two weeks, when the final numbers are availible.")
TOOL = ('{"results": [{"id": 101, "title": "Blue mug", "price": 8.5, "stock": 12}, '
        '{"id": 102, "title": "Red mug", "price": 9.0, "stock": 0}, '
        '{"id": 103, "title": "Green plate", "price": 12.25, "stock": 4}]}')
TASKS = [
    f"Rename the variable subtotal to net_total in this function and print the whole function:\n\n{CODE}",
    f"Correct the spelling mistakes in this paragraph and write out the corrected paragraph in full:\n\n{TEXT}",
    f"The search tool returned:\n{TOOL}\nReturn the same JSON, keeping only the items that are in stock.",
    f"Add a docstring to this function and print the whole function:\n\n{CODE}",
]


def run(dtype: str) -> dict:
    llm = LLM(dtype=dtype)
    tok = llm.engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
               for t in TASKS]
    modes = {"plain": None, "ngram": SPEC}
    llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0))  # warm up
    rates: dict[str, list[float]] = {m: [] for m in modes}
    outputs: dict[str, list[list[int]]] = {}
    drafted = accepted = 0
    for r in range(ROUNDS):
        order = list(modes) if r % 2 == 0 else list(modes)[::-1]
        for mode in order:
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, speculative_config=modes[mode])
            tokens, seconds, outs = 0, 0.0, []
            d0, a0 = llm.engine.num_draft_tokens, llm.engine.num_accepted_tokens
            for p in prompts:
                t0 = time.perf_counter()
                out = llm.generate([p], params)[0].outputs[0]
                seconds += time.perf_counter() - t0
                tokens += len(out.token_ids)
                outs.append(out.token_ids)
            rates[mode].append(tokens / seconds)
            outputs.setdefault(mode, outs)
            if mode == "ngram":
                drafted += llm.engine.num_draft_tokens - d0
                accepted += llm.engine.num_accepted_tokens - a0
    median = {m: statistics.median(v) for m, v in rates.items()}
    return {
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
        "tok_per_s": {m: round(v, 1) for m, v in median.items()},
        "rounds": {m: [round(x, 1) for x in v] for m, v in rates.items()},
        "speedup": round(median["ngram"] / median["plain"], 2),
        "identical_outputs": outputs["plain"] == outputs["ngram"],
        "identical_prompts": sum(a == b for a, b in zip(outputs["plain"], outputs["ngram"])),
        "draft_acceptance": round(accepted / max(1, drafted), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", action="append", help="auto, bfloat16, float32 (repeatable; default: auto and float32)")
    args = ap.parse_args()
    results = [run(d) for d in (args.dtype or ["auto", "float32"])]
    report = {"speculative_config": SPEC, "max_tokens": MAX_TOKENS, "prompts": len(TASKS), "rounds": ROUNDS,
              "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    (Path(__file__).parent / "result.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
