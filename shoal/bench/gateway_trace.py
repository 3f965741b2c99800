"""Gateway traces: queries with their text, for ``shoal sim --gateway CONFIG --workload gateway:PATH``
(the semantic cache and the router decide on the text, not only on lengths). One query a JSON line::

    {"arrival_s": 0.41, "query": "Which city is the capital of France?", "tenant": "a",
     "prompt_tokens": 39, "output_tokens": 120, "category": "factual", "small_ok": true}

``arrival_s``, ``query`` (non-empty), ``prompt_tokens`` and ``output_tokens`` (integers >= 1) are
required. ``tenant`` says whose cache (sent as ``user``); ``category`` is informational (the
simulator classifies the text itself); ``small_ok`` says whether the small pool's answer passes the
router's checks (without it the simulator draws it from a per-category pass rate).

``generate`` writes such traces (``shoal bench gateway-trace``): Poisson arrivals, a share of repeats
of earlier queries (verbatim or a paraphrase), so a cache has something to hit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shoal.bench.agent import TraceError, json_lines


@dataclass(frozen=True)
class GatewayQuery:
    arrival_s: float
    query: str
    prompt_tokens: int
    output_tokens: int
    tenant: str | None = None
    category: str | None = None
    small_ok: bool | None = None


_FIELDS = {"arrival_s", "query", "prompt_tokens", "output_tokens", "tenant", "category", "small_ok"}


def parse_query(obj, where: str) -> GatewayQuery:
    """One trace line's object; TraceError naming ``where`` and the field."""
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: a line must be a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise TraceError(f"{where}: unknown fields {', '.join(unknown)}")
    checks = [
        ("arrival_s", _is_num(obj.get("arrival_s")) and obj.get("arrival_s", -1) >= 0, "a number >= 0"),
        ("query", isinstance(obj.get("query"), str) and obj["query"].strip() != "", "a non-empty string"),
        ("prompt_tokens", _is_int(obj.get("prompt_tokens")) and obj["prompt_tokens"] >= 1, "an integer >= 1"),
        ("output_tokens", _is_int(obj.get("output_tokens")) and obj["output_tokens"] >= 1, "an integer >= 1"),
        ("tenant", obj.get("tenant") is None or isinstance(obj["tenant"], str), "a string"),
        ("category", obj.get("category") is None or isinstance(obj["category"], str), "a string"),
        ("small_ok", obj.get("small_ok") is None or isinstance(obj["small_ok"], bool), "true or false"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise TraceError(f"{where}: {name} must be {what}" + ("" if name in obj else " (missing)"))
    return GatewayQuery(float(obj["arrival_s"]), obj["query"], obj["prompt_tokens"], obj["output_tokens"],
                        obj.get("tenant"), obj.get("category"), obj.get("small_ok"))


def load(path: str | Path) -> list[GatewayQuery]:
    """Read a gateway trace, sorted by arrival (stable)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"gateway trace not found: {path}")
    queries = [parse_query(obj, where) for where, obj in json_lines(path)]
    if not queries:
        raise TraceError(f"{path}: no queries")
    return sorted(queries, key=lambda q: q.arrival_s)


def dump(queries: list[GatewayQuery], path: str | Path) -> None:
    """Write queries as a trace (what :func:`load` reads back); absent optional fields are left out."""
    with Path(path).open("w") as f:
        for q in queries:
            f.write(json.dumps({k: v for k, v in asdict(q).items() if v is not None}) + "\n")


@dataclass(frozen=True)
class QuerySource:
    """Texts to draw queries from: ``(category, text)`` pairs, and each text's paraphrases."""

    queries: list[tuple[str, str]]
    paraphrases: dict[str, list[str]]


def paraphrase_source(path: str | Path) -> QuerySource:
    """From ``benchmarks/gateway/paraphrases.jsonl`` (lines ``{"category", "query", "candidate",
    "match"}``): every text is a query; a matching pair are paraphrases of each other."""
    path = Path(path)
    texts: dict[str, str] = {}
    paraphrases: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not JSON ({exc.msg})") from None
        for key, kind in (("category", str), ("query", str), ("candidate", str), ("match", bool)):
            if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
                raise TraceError(f"{where}: {key} must be a {'boolean' if kind is bool else 'string'}")
        for text in (obj["query"], obj["candidate"]):
            texts.setdefault(text, obj["category"])
        if obj["match"]:
            paraphrases.setdefault(obj["query"], []).append(obj["candidate"])
            paraphrases.setdefault(obj["candidate"], []).append(obj["query"])
    if not texts:
        raise TraceError(f"{path}: no queries")
    return QuerySource([(c, t) for t, c in texts.items()], paraphrases)


def category_source(categories) -> QuerySource:
    """From the cache categories' examples (a :class:`CategoryConfig`); no paraphrases."""
    pairs = [(c.name, e) for c in categories.categories for e in c.examples]
    if not pairs:
        raise ValueError("the categories have no examples to draw queries from")
    return QuerySource(pairs, {})


def generate(source: QuerySource, num_queries: int, rate: float, repeat: float, paraphrase: float,
             count_tokens: Callable[[str], int], output_len: int, tenants: dict[str, float] | None = None,
             seed: int = 0) -> list[GatewayQuery]:
    """``num_queries`` queries arriving as a Poisson stream at ``rate``/s. Each after the first is,
    with probability ``repeat``, a repeat of an earlier query (chosen uniformly; a paraphrase of it
    with probability ``paraphrase`` when the source has one, else verbatim, with the earlier query's
    output length), else the next fresh text of the source (shuffled; reused from the start when
    exhausted). Tenants are drawn by ``tenants`` shares for every query, repeats included (a
    repeat by another tenant cannot hit). ``prompt_tokens``: ``count_tokens(text)`` (the chat
    template and the text); ``output_tokens``: lognormal with median ``output_len``, sigma 0.5."""
    if num_queries < 1 or not rate > 0 or not 0 <= repeat <= 1 or not 0 <= paraphrase <= 1 or output_len < 1:
        raise ValueError("num_queries, rate and output_len must be positive; repeat and paraphrase in [0, 1]")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=num_queries)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    order = rng.permutation(len(source.queries))
    names = list(tenants or {})
    shares = np.array([tenants[n] for n in names], dtype=np.float64) if tenants else None
    fresh = 0
    asked: list[tuple[str, str, int]] = []  # (category, original text, output tokens) of each query
    out = []
    for i in range(num_queries):
        if asked and rng.random() < repeat:
            category, original, output = asked[int(rng.integers(len(asked)))]
            others = source.paraphrases.get(original)
            text = others[int(rng.integers(len(others)))] if others and rng.random() < paraphrase else original
        else:
            category, original = source.queries[int(order[fresh % len(order)])]
            fresh += 1
            output = max(1, round(float(rng.lognormal(math.log(output_len), 0.5))))
            text = original
        asked.append((category, original, output))
        tenant = names[int(rng.choice(len(names), p=shares / shares.sum()))] if shares is not None else None
        out.append(GatewayQuery(float(arrivals[i]), text, count_tokens(text), output, tenant, category))
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
