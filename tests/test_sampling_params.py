import pytest

from shoal.engine.sampling_params import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.logprobs is None
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy


def test_list_defaults_not_shared():
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


def test_stop_str_normalised_to_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_max_tokens_is_still_the_first_positional_field():
    assert SamplingParams(32).max_tokens == 32 and SamplingParams(32).n == 1


def test_for_choice_gives_one_sequence_with_its_own_seed():
    p = SamplingParams(n=3, seed=10, temperature=0.5)
    assert [(c.n, c.seed, c.temperature) for c in map(p.for_choice, range(3))] == [(1, 10, 0.5), (1, 11, 0.5), (1, 12, 0.5)]
    assert SamplingParams(n=2).for_choice(1).seed is None


def test_none_means_no_stops_as_in_vllm():
    p = SamplingParams(stop=None, stop_token_ids=None)
    assert p.stop == [] and p.stop_token_ids == []


@pytest.mark.parametrize("name, value", [("stop", 5), ("stop_token_ids", 7), ("stop_token_ids", "2")])
def test_a_stop_that_is_not_a_list_names_the_field(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        SamplingParams(**{name: value})


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False), (2.0, False)]
)
def test_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 1.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("seed", 1.5),
        ("n", 0),
        ("n", 2.0),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop", ""),
        ("stop_token_ids", [-1]),
        ("logprobs", -1),
        ("logprobs", 21),
    ],
)
def test_invalid_values_raise_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"temperature": 0.0},
        {"top_p": 1e-9},
        {"top_k": -1},
        {"top_k": 1},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"repetition_penalty": 0.5},
        {"seed": 0},
        {"logprobs": 0},
        {"logprobs": 20},
        {"stop": ["\n"], "stop_token_ids": [0, 2]},
    ],
)
def test_boundary_values_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        assert getattr(p, k) == v
