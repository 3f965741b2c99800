"""Priorities under 10x overload on the real server: ``shoal serve --max-num-seqs 8 --max-waiting 8``
gets 160 completions at once (10x its slots + queue), 12 of them urgent (``priority: -1``) spread
through the burst, the rest ``priority`` 0-2. Counts the answers (200 / 429) by priority: an urgent
request must never get a 429 while a lower one is queued (it takes that one's place instead).

    python benchmarks/priority/overload.py        # writes benchmarks/priority/overload.json
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent))
from server_process import Server  # noqa: E402

SLOTS, QUEUE, N, URGENT = 8, 8, 160, 12


async def burst(url: str) -> list[tuple[int, int]]:
    rng = random.Random(0)
    priorities = [rng.randint(0, 2) for _ in range(N)]
    for i in rng.sample(range(N), URGENT):
        priorities[i] = -1
    limits = httpx.Limits(max_connections=N)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int, priority: int) -> tuple[int, int]:
            await asyncio.sleep(i * 0.002)  # arrival order as listed
            r = await client.post("/v1/completions", json={
                "model": "default", "prompt": f"Request {i}: tell me a story.", "max_tokens": 32,
                "ignore_eos": True, "priority": priority})
            if r.status_code == 429:
                assert "retry-after" in r.headers
            return priority, r.status_code

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(priorities)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server("--max-num-seqs", str(SLOTS), "--max-waiting", str(QUEUE), "--max-model-len", "256", "--served-model-name", "default",
                     log_dir=Path(tmp), name="overload")
        try:
            srv.wait_ready()
            answers = asyncio.run(burst(srv.url))
        finally:
            srv.stop()
    by = Counter(answers)
    out = {
        "setup": {"max_num_seqs": SLOTS, "max_waiting": QUEUE, "requests": N, "urgent": URGENT},
        "answers": {f"priority {p}": {str(code): n for (q, code), n in sorted(by.items()) if q == p}
                    for p in sorted({p for p, _ in answers})},
        "urgent_429": by[(-1, 429)],
        "lower_429": sum(n for (p, code), n in by.items() if p >= 0 and code == 429),
    }
    Path(__file__).with_name("overload.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
