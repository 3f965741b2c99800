"""Semantic cache quality: hit rate and false-hit rate with one uniform threshold against per-category
thresholds, on benchmarks/gateway/paraphrases.jsonl (make_paraphrases.py).

Every text is embedded with all-MiniLM-L6-v2 (shoal.gateway.embedder) and classified by the shipped
categories' examples (shoal/gateway/categories.yaml). The pairs are split, stratified by category and
label, into a tuning half and an evaluation half (fixed seed). On the tuning half each threshold is
chosen to maximise the hit rate subject to a false-hit rate <= 1% (ties: fewest false hits, then the
middle of the tied range): one threshold over all pairs (uniform), and one per category over the
pairs whose cached text falls in it (category-aware; ``default`` takes the uniform one). The
evaluation half then runs through SemanticCache itself: each pair's candidate is stored under a
tenant of its own and its query looked up. A hit on a paraphrase is a hit; a hit on a near-miss is a
false hit.

    python benchmarks/gateway/cache_eval.py            # writes benchmarks/gateway/cache_eval.json
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from shoal.gateway.embedder import Embedder
from shoal.gateway.semantic_cache import CategoryClassifier, CategoryConfig, SemanticCache, load_categories

HERE = Path(__file__).parent
SEED = 0
MAX_FALSE_HIT_RATE = 0.01


def split(rows: list[dict], seed: int = SEED) -> tuple[list[int], list[int]]:
    """Indices of the tuning and evaluation halves, each with half of every (category, label)."""
    groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r["category"], r["match"])].append(i)
    rng = random.Random(seed)
    tune, evaluate = [], []
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        tune += idx[: len(idx) // 2]
        evaluate += idx[len(idx) // 2:]
    return sorted(tune), sorted(evaluate)


def choose_threshold(sims: np.ndarray, match: np.ndarray) -> float:
    """The threshold with the most hits among those with false-hit rate <= MAX_FALSE_HIT_RATE."""
    values = np.unique(sims)
    candidates = np.append((values[:-1] + values[1:]) / 2, 1.0)
    allowed = MAX_FALSE_HIT_RATE * max(int((~match).sum()), 1)
    scored = [(int((sims[match] >= t).sum()), -int((sims[~match] >= t).sum()), float(t)) for t in candidates
              if (sims[~match] >= t).sum() <= allowed]
    best = max(s[:2] for s in scored)
    tied = [t for h, f, t in scored if (h, f) == best]
    return round((min(tied) + max(tied)) / 2, 4)


def rates(hit: np.ndarray, match: np.ndarray) -> dict:
    return {"hit_rate": round(float(hit[match].mean()), 4), "false_hit_rate": round(float(hit[~match].mean()), 4),
            "hits": int(hit[match].sum()), "false_hits": int(hit[~match].sum()),
            "paraphrases": int(match.sum()), "near_misses": int((~match).sum())}


def run_cache(config: CategoryConfig, idx: list[int], q: np.ndarray, c: np.ndarray, rows: list[dict],
              q_cat: list[str], c_cat: list[str]) -> np.ndarray:
    """Whether SemanticCache serves each pair's candidate for its query (one tenant per pair)."""
    cache = SemanticCache(q.shape[1], config.categories, config.default)
    hits = []
    for i in idx:
        cache.store(f"pair-{i}", "eval", rows[i]["candidate"], c[i], config.category(c_cat[i]), {"pair": i})
        hit = cache.lookup(f"pair-{i}", "eval", rows[i]["query"], q[i], config.category(q_cat[i]))
        hits.append(hit is not None and hit.value == {"pair": i})
    return np.array(hits)


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "paraphrases.jsonl").read_text().splitlines()]
    embedder = Embedder()
    shipped = load_categories()
    classifier = CategoryClassifier(shipped, embedder.embed)
    q = embedder.embed([r["query"] for r in rows])
    c = embedder.embed([r["candidate"] for r in rows])
    sims = (q * c).sum(axis=1)
    match = np.array([r["match"] for r in rows])
    q_cat = [classifier.classify(v).name for v in q]
    c_cat = [classifier.classify(v).name for v in c]
    tune, evaluate = split(rows)
    tune_a = np.array(tune)

    uniform = choose_threshold(sims[tune_a], match[tune_a])
    per_category = {}
    for cat in shipped.categories:
        sel = np.array([i for i in tune if c_cat[i] == cat.name])
        per_category[cat.name] = choose_threshold(sims[sel], match[sel]) if len(sel) else uniform
    schemes = {
        "uniform": replace(shipped, categories=tuple(replace(k, threshold=uniform) for k in shipped.categories),
                           default=replace(shipped.default, threshold=uniform)),
        "category_aware": replace(shipped, categories=tuple(replace(k, threshold=per_category[k.name])
                                                            for k in shipped.categories),
                                  default=replace(shipped.default, threshold=uniform)),
    }

    result: dict = {
        "command": "python benchmarks/gateway/cache_eval.py",
        "model": embedder.model_id,
        "pairs": len(rows), "paraphrases": int(match.sum()), "near_misses": int((~match).sum()),
        "categories": sorted({r["category"] for r in rows}),
        "split": {"seed": SEED, "tuning": len(tune), "evaluation": len(evaluate)},
        "rule": f"each threshold maximises the tuning half's hit rate subject to false-hit rate <= "
                f"{MAX_FALSE_HIT_RATE:.0%}; a hit needs similarity >= the thresholds of both the query's "
                f"and the cached text's category",
        "classifier_accuracy": {
            cat: round(float(np.mean([x == cat for r, xq, xc in zip(rows, q_cat, c_cat) if r["category"] == cat
                                      for x in (xq, xc)])), 3)
            for cat in sorted({r["category"] for r in rows})},
        "thresholds": {"uniform": uniform, "category_aware": per_category},
    }
    for half, idx in (("tuning", tune), ("evaluation", evaluate)):
        result[half] = {}
        for name, config in schemes.items():
            hit = run_cache(config, idx, q, c, rows, q_cat, c_cat)
            m = match[np.array(idx)]
            result[half][name] = rates(hit, m)
            result[half][name]["per_category"] = {
                cat: rates(hit[sel], m[sel]) for cat in result["categories"]
                if (sel := np.array([rows[i]["category"] == cat for i in idx])).any()}
    # The uniform threshold that reaches category-aware's evaluation hit rate, and its false hits then.
    ev = np.array(evaluate)
    target = result["evaluation"]["category_aware"]["hit_rate"]
    t_eq = max(t for t in np.unique(sims[ev]) if (sims[ev][match[ev]] >= t).mean() >= target)
    result["uniform_at_equal_hit_rate"] = {"threshold": round(float(t_eq), 4),
                                           **rates(sims[ev] >= t_eq, match[ev])}
    (HERE / "cache_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
