"""How much faster a semantic-cache hit answers a 128-token chat request than generating it.

Starts `shoal serve` (built-in SmolLM2 and all-MiniLM-L6-v2), then for each of N questions sends,
one at a time over one kept-alive connection: the question with `semantic_cache: true` (a miss: generated, 128 tokens, EOS
ignored), the same request again (an exact hit) and a paraphrase (a semantic hit). Prints and writes
the medians of whole-request time and the ratios (`cache_speed.json`). Run it on an idle machine:

    python benchmarks/gateway/cache_speed.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server_process import Server  # noqa: E402

PAIRS = [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How do I reverse a list in Python?", "What is the way to reverse a Python list?"),
    ("How many centimeters are in an inch?", "An inch is how many centimeters?"),
    ("How do I reset my password?", "What are the steps to reset my password?"),
    ("Who painted the Mona Lisa?", "Who was the painter of the Mona Lisa?"),
    ("What is the boiling point of water?", "At what temperature does water boil?"),
    ("How do I merge two dictionaries in Python?", "How can two Python dictionaries be merged?"),
    ("What is the speed of light?", "How fast does light travel?"),
]


def timed(client: httpx.Client, text: str) -> tuple[float, str, int]:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 128, "ignore_eos": True,
            "temperature": 0, "semantic_cache": True}
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t, r.headers.get("x-shoal-cache", ""), r.json()["usage"]["completion_tokens"]


def main() -> None:
    out = Path(__file__).with_name("cache_speed.json")
    with tempfile.TemporaryDirectory() as logs:
        server = Server(log_dir=Path(logs), name="shoal")
        try:
            server.wait_ready()
            client = httpx.Client(base_url=server.url, timeout=300)  # one connection: no set-up in the times
            timed(client, "Warm up the engine and the embedder.")
            miss, exact, semantic = [], [], []
            for question, paraphrase in PAIRS:
                t, state, tokens = timed(client, question)
                assert state == "miss" and tokens == 128, (state, tokens)
                miss.append(t)
                t, state, _ = timed(client, question)
                assert state == "hit", state
                exact.append(t)
                t, state, _ = timed(client, paraphrase)
                if state == "hit":
                    semantic.append(t)
                else:
                    print(f"paraphrase missed: {paraphrase!r}", file=sys.stderr)
        finally:
            server.stop()
    med = {k: statistics.median(v) * 1e3 for k, v in (("generated_ms", miss), ("exact_hit_ms", exact),
                                                     ("semantic_hit_ms", semantic))}
    result = {"requests": len(PAIRS), "output_tokens": 128, **{k: round(v, 2) for k, v in med.items()},
              "exact_hit_speedup": round(med["generated_ms"] / med["exact_hit_ms"], 1),
              "semantic_hit_speedup": round(med["generated_ms"] / med["semantic_hit_ms"], 1),
              "semantic_hits": len(semantic)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
