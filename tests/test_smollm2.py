"""The real default model (SmolLM2-135M-Instruct, GGUF) against Hugging Face transformers on the
same file, and the offline ``LLM`` API on it.

Heavy objects are built once per module: an fp32 engine (it loads the GGUF and the tokenizer
itself), a second fp32 engine sharing its model (migration target), the transformers reference,
and one default ``LLM()``.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.engine.config import EngineConfig
from shoal.engine.engine import Engine
from shoal.engine.request import FinishReason
from shoal.model.loader import ModelLoadError, default_model_path
from tests._engine_util import add_bos_on_encode, run_all, tokens_of

SYSTEM = (
    "You are a careful assistant for a geography and science quiz. Answer in one or two short "
    "sentences, state facts plainly, never invent sources, and when a question is ambiguous say "
    "which reading you chose. Prefer metric units and give numbers with at most three significant "
    "digits. Do not use lists unless asked."
)
CHATS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
# The stop string never matches; it makes the detokenizer hold text back (tested across migration).
GREEDY_LP = SamplingParams(temperature=0.0, logprobs=5, max_tokens=12, ignore_eos=True, stop=["#END-OF-ANSWER#"])
BLOCK = 16
BUDGET = 32  # chunked prefill: every prompt here is longer


# ---- module fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path() -> str:
    try:
        return default_model_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


_LOADED: dict = {}  # what the fp32 engine's own loading produced, reused to build LLM() faster


@pytest.fixture(scope="module", autouse=True)
def _forget_loaded():
    yield
    _LOADED.clear()


@pytest.fixture(scope="module")
def engine(model_path) -> Engine:
    """fp32 engine on the default model, loaded by the engine itself; chunked prefill."""
    import shoal.engine.engine as engine_module

    def spy(fn, key):
        def wrapper(*args, **kw):
            _LOADED[key] = out = fn(*args, **kw)
            return out

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "load_checkpoint", spy(engine_module.load_checkpoint, "checkpoint"))
        mp.setattr(engine_module, "load_tokenizer", spy(engine_module.load_tokenizer, "tokenizer"))
        engine = Engine(
            EngineConfig(
                dtype="float32", device="cpu", block_size=BLOCK, num_blocks=96, num_swap_blocks=8,
                max_num_batched_tokens=BUDGET,
            )
        )
    return engine


@pytest.fixture(scope="module")
def tok(engine):
    assert engine.tokenizer is not None
    return engine.tokenizer


@pytest.fixture(scope="module")
def hf(model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def llm(model_path, engine) -> LLM:
    """The default ``LLM()``. Parsing the GGUF (weights, tokenizer) again would only repeat what
    the fp32 engine did with the same file, so those two calls return its results."""
    import shoal.engine.engine as engine_module

    with pytest.MonkeyPatch.context() as mp:
        if "checkpoint" in _LOADED:
            config, state = _LOADED.pop("checkpoint")
            mp.setattr(
                engine_module, "load_checkpoint",
                lambda path, dtype: (config, {k: v.to(dtype, copy=True) for k, v in state.items()}),
            )
        if "tokenizer" in _LOADED:
            tokenizer = _LOADED.pop("tokenizer")
            mp.setattr(engine_module, "load_tokenizer", lambda path: tokenizer)
        return LLM()


@pytest.fixture(scope="module")
def bf16_engine(llm, model_path) -> Engine:
    if llm.engine.dtype == torch.bfloat16:  # the default on CPUs with native bf16
        return llm.engine
    return Engine(EngineConfig(dtype="bfloat16", device="cpu", num_blocks=64, num_swap_blocks=0))


def chat_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    ps = [chat_ids(tok, c) for c in CHATS]
    assert all(len(p) > BUDGET for p in ps), "prompts must need chunked prefill"
    return ps


def hf_logprobs(hf, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Teacher-forced reference: row j is the distribution of generated token j."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(generated)]


def assert_matches_hf(hf, prompt: list[int], outs, atol: float = 1e-3) -> None:
    """Each step's sampled-token and top-5 logprobs equal transformers' (ids up to near-ties)."""
    generated = tokens_of(outs)
    logprobs = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(logprobs) == len(generated) == GREEDY_LP.max_tokens
    ref = hf_logprobs(hf, prompt, generated)
    for j, (token, (chosen, top)) in enumerate(zip(generated, logprobs)):
        row = ref[j]
        ref_vals, ref_ids = row.topk(5)
        assert chosen.token_id == token
        assert chosen.logprob == pytest.approx(row[token].item(), abs=atol), f"step {j}"
        assert row[token] >= ref_vals[0] - atol, f"step {j}: greedy token is not the reference argmax"
        assert len(top) == 5
        assert [a.logprob for a in top] == pytest.approx(ref_vals.tolist(), abs=atol), f"step {j}"
        for a, rid, rval in zip(top, ref_ids.tolist(), ref_vals.tolist()):
            # The same id, or a near-tie the reference ranks within atol of that value.
            assert a.token_id == rid or abs(row[a.token_id].item() - rval) < atol, f"step {j}: top-5 ids"


def text_of(outs) -> str:
    return "".join(o.new_text for o in outs)


@pytest.fixture(scope="module")
def reference_run(engine, prompts):
    """The three chat prompts on the fp32 engine: chunked prefill, and prompt 2 added once prompt 1
    is prefilled so that it hits the prefix cache on the shared system prompt."""
    outs: dict[str, list] = defaultdict(list)
    first = engine.add(prompts[0], GREEDY_LP)
    for _ in range(100):
        if outs[first]:
            break
        for o in engine.step():
            outs[o.req_id].append(o)
    ids = [first] + [engine.add(p, GREEDY_LP) for p in prompts[1:]]
    for rid, o in run_all(engine).items():
        outs[rid].extend(o)
    return [outs[r] for r in ids]


# ---- fp32 engine against transformers ---------------------------------------------------------


def test_prefill_and_decode_logprobs_match_transformers(hf, prompts, reference_run, tok):
    for p, outs in zip(prompts, reference_run):
        assert len([o for o in outs if o.finished]) == 1 and outs[-1].finish_reason is FinishReason.LENGTH
        assert_matches_hf(hf, p, outs)
        # The streamed text is the detokenized tokens.
        assert text_of(outs) == tok.decode(tokens_of(outs), skip_special_tokens=True)
    # The second prompt reused the system prompt's KV blocks from the first.
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
    assert shared >= 3 * BLOCK
    assert reference_run[1][-1].num_cached_tokens >= shared // BLOCK * BLOCK


def test_first_answer_is_sensible(reference_run):
    assert "Paris" in text_of(reference_run[0])


def test_export_import_mid_decode_continues_identically(engine, hf, prompts, reference_run, tok):
    dst = Engine(
        EngineConfig(dtype="float32", device="cpu", block_size=BLOCK, num_blocks=64, num_swap_blocks=0),
        model=engine.model,
        tokenizer=engine.tokenizer,
    )
    params = GREEDY_LP
    ids = [engine.add(p, params) for p in prompts]
    got: dict[str, list] = defaultdict(list)
    # Step until every request has decoded a few tokens, then move two of them.
    for _ in range(200):
        if all(len(tokens_of(got[r])) >= 3 for r in ids):
            break
        for o in engine.step():
            got[o.req_id].append(o)
    moved = [ids[0], ids[2]]
    before = {r: len(tokens_of(got[r])) for r in moved}
    assert all(3 <= n < params.max_tokens for n in before.values())
    for rid in moved:
        state = engine.export(rid)
        assert state.kv is not None and state.num_computed_tokens > len(prompts[ids.index(rid)])
        dst.import_(state)
        assert rid not in engine.requests
    engine.block_manager.check()
    for e in (engine, dst):
        for rid, outs in run_all(e).items():
            got[rid].extend(outs)
    for rid, p, ref in zip(ids, prompts, reference_run):
        outs = got[rid]
        assert len([o for o in outs if o.finished]) == 1
        assert tokens_of(outs) == tokens_of(ref)
        # The text streamed from both engines concatenates to the unmigrated run's text.
        assert text_of(outs) == text_of(ref), rid
        assert outs[-1].finish_reason is FinishReason.LENGTH
    for rid in moved:
        assert len(tokens_of(got[rid])) > before[rid], "the import engine produced tokens"
        assert_matches_hf(hf, prompts[ids.index(rid)], got[rid])
    for e in (engine, dst):
        e.block_manager.check()
        assert e.block_manager.num_used == 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_request_resumes_identically(engine, hf, prompts, reference_run, mode):
    """Room for two of the prompts: a third with a better priority preempts the later one mid
    decode (by ``mode``); every answer still equals the unpreempted run's and transformers'."""
    need = [-(-(len(p) + GREEDY_LP.max_tokens) // BLOCK) for p in prompts]
    small = Engine(
        EngineConfig(dtype="float32", device="cpu", block_size=BLOCK, num_blocks=need[0] + need[1] + 1,
                     num_swap_blocks=64, max_num_batched_tokens=BUDGET, preemption_mode=mode,
                     enable_prefix_caching=False),
        model=engine.model, tokenizer=engine.tokenizer,
    )
    got: dict[str, list] = defaultdict(list)
    ids = [small.add(p, GREEDY_LP, priority=1) for p in prompts[:2]]
    for _ in range(200):
        if all(len(tokens_of(got[r])) >= 3 for r in ids):
            break
        for o in small.step():
            got[o.req_id].append(o)
    ids.append(small.add(prompts[2], GREEDY_LP, priority=0))
    preempted = []
    while small.has_unfinished():
        for o in small.step():
            got[o.req_id].append(o)
        preempted += small.last_plan.preempted
    assert preempted and all(m.value == mode for _, m in preempted)
    assert {r for r, _ in preempted} == {ids[1]}  # the later of the two lower-priority requests
    for rid, p, ref in zip(ids, prompts, reference_run):
        assert tokens_of(got[rid]) == tokens_of(ref), rid
        assert len([o for o in got[rid] if o.finished]) == 1
    assert_matches_hf(hf, prompts[1], got[ids[1]])
    small.block_manager.check()
    assert small.block_manager.num_used == 0


# ---- bf16 -------------------------------------------------------------------------------------


def test_speculative_decoding_keeps_greedy_output_and_text_exact(engine, tok):
    """A copy task, where prompt lookup drafts well: fp32 greedy tokens and streamed text are the
    same with and without drafts, batched with a plain request, and drafts are accepted."""
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    copy = chat_ids(tok, [{"role": "user", "content": f"Repeat this code exactly:\n{code}"}])
    other = chat_ids(tok, [{"role": "user", "content": "Name a colour."}])
    runs = []
    for cfg in (None, {"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}):
        accepted = engine.num_accepted_tokens
        ids = [engine.add(p, SamplingParams(max_tokens=40, temperature=0, speculative_config=cfg))
               for p in (copy, other)]
        outs = run_all(engine)
        runs.append([(tokens_of(outs[i]), "".join(o.new_text for o in outs[i])) for i in ids])
    assert runs[0] == runs[1]
    assert engine.num_accepted_tokens - accepted >= 10


def test_bf16_greedy_answers_paris(bf16_engine, tok):
    # "Answer in one word": without it the first token is a near tie in fp32 ("The" vs "L", 0.08
    # apart), below bf16's logit resolution, and the greedy answer depends on the kernels' rounding
    assert bf16_engine.dtype == torch.bfloat16
    rid = bf16_engine.add(
        chat_ids(tok, [{"role": "user", "content": "What is the capital of France? Answer in one word."}]),
        SamplingParams(temperature=0.0, max_tokens=24),
    )
    outs = run_all(bf16_engine)[rid]
    assert "Paris" in text_of(outs)


def test_bf16_top1_agrees_with_fp32_reference(bf16_engine, hf, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=0)
    ids = [bf16_engine.add(p, params) for p in prompts]
    outs = run_all(bf16_engine)
    agree = total = 0
    diffs = []
    for rid, p in zip(ids, prompts):
        gen = tokens_of(outs[rid])
        ref = hf_logprobs(hf, p, gen)  # fp32, teacher-forced on the bf16 engine's own tokens
        agree += sum(int(ref[j].argmax()) == t for j, t in enumerate(gen))
        total += len(gen)
        lps = [lp for o in outs[rid] for lp in (o.logprobs or [])]
        diffs += [abs(chosen.logprob - ref[j, t].item()) for j, (t, (chosen, _)) in enumerate(zip(gen, lps))]
    assert total == 30
    assert agree / total >= 0.85, f"bf16 top-1 agreed with fp32 on {agree}/{total} steps"
    assert sum(diffs) / len(diffs) < 0.15, "bf16 logprobs far from fp32"


# ---- the offline API --------------------------------------------------------------------------


def test_llm_chat_and_generate_return_text(llm):
    (out,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=10))
    assert isinstance(out.text, str) and "Paris" in out.text
    c = out.outputs[0]
    assert c.token_ids and c.finish_reason in ("stop", "length")
    assert out.prompt and out.prompt_token_ids and out.e2e_s is not None and out.e2e_s >= 0

    prompts = ["The capital of France is", "One, two, three,"]
    res = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6))
    assert [r.prompt for r in res] == prompts
    assert all(isinstance(r.text, str) and r.text.strip() for r in res)
    assert all(len(r.outputs[0].token_ids) == 6 and r.outputs[0].finish_reason == "length" for r in res)
    # Greedy output does not depend on the batch: the second prompt alone gives the same text.
    (alone,) = llm.generate(prompts[1], SamplingParams(temperature=0.0, max_tokens=6))
    assert alone.text == res[1].text


def test_stop_string_cuts_text_exactly(llm):
    msgs = [{"role": "user", "content": "What is water made of? Explain briefly."}]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    full, stopped, kept = llm.chat(
        [msgs] * 3,
        [greedy, dataclasses.replace(greedy, stop=["."]),
         dataclasses.replace(greedy, stop=["."], include_stop_str_in_output=True)],
    )
    assert "." in full.text, full.text
    cut = full.text.index(".")
    assert len(full.text) > cut + 1, "the answer goes on after its first sentence"
    assert stopped.text == full.text[:cut]
    assert "." not in stopped.text
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == "."
    assert len(stopped.outputs[0].token_ids) < len(full.outputs[0].token_ids)
    assert kept.text == full.text[: cut + 1]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    # Batches of at most 4 rows: bf16 CPU steps of few rows run on exact int4 weights, larger
    # ones on the bf16 kernel, whose rounding differs (enough to flip a greedy token).
    p = "Once upon a time, in a small village,"
    seeded = SamplingParams(temperature=0.8, seed=42, max_tokens=12, ignore_eos=True)
    (a,) = llm.generate(p, seeded)
    (b,) = llm.generate(p, seeded)
    other = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    batch = llm.generate(["The weather today is", p, "My favourite food is"], [other, seeded, other])
    assert a.text and a.outputs[0].token_ids == b.outputs[0].token_ids == batch[1].outputs[0].token_ids
    assert a.text == b.text == batch[1].text
    reseeded = llm.generate([p, p], [dataclasses.replace(seeded, seed=7), dataclasses.replace(seeded, seed=1234)])
    assert any(r.text != a.text for r in reseeded), "the seed has no effect"


def test_streamed_text_has_no_replacement_characters(llm):
    engine, tok = llm.engine, llm.tokenizer
    rid = engine.add(
        chat_ids(tok, [{"role": "user", "content": "Write a short greeting in Japanese."}]),
        SamplingParams(temperature=0.0, max_tokens=40),
    )
    outs = run_all(engine)[rid]
    tokens = tokens_of(outs)
    split = sum("\ufffd" in tok.decode([t]) for t in tokens)
    assert split > 0, "the answer should have characters split across tokens, or this tests nothing"
    for o in outs[:-1]:
        assert "\ufffd" not in o.new_text
    text = text_of(outs)
    assert text == tok.decode(tokens, skip_special_tokens=True)
    assert any(ord(ch) > 0x3000 for ch in text)
    assert "\ufffd" not in text.rstrip("\ufffd"), "only a character cut off by max_tokens may be incomplete"


def test_text_prompts_get_the_tokenizers_special_tokens(llm, monkeypatch):
    """Text prompts are encoded with the tokenizer's special tokens (Llama's BOS), as vLLM and HF do;
    token-id prompts are taken as given."""
    add_bos_on_encode(monkeypatch, llm.tokenizer, bos=0)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    (out,) = llm.generate("The capital of France is", params)
    assert out.prompt_token_ids[0] == 0
    assert out.prompt_token_ids[1:] == llm.tokenizer.encode("The capital of France is", add_special_tokens=False)
    (out,) = llm.generate([[5, 6, 7]], params)
    assert out.prompt_token_ids == [5, 6, 7]


def test_llm_n_completions_per_prompt(llm):
    """``n`` completions of each prompt, completion i seeded ``seed + i`` (as the server's choices);
    the engine itself takes one sequence per request."""
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6)
    story, color = llm.generate(["Tell me a story.", "Name a color."], params)
    for out in (story, color):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 6 or c.finish_reason == "stop" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in story.outputs}) > 1
    (single,) = llm.generate("Tell me a story.", SamplingParams(temperature=1.0, seed=8, max_tokens=6))
    assert single.outputs[0].token_ids == story.outputs[1].token_ids
    with pytest.raises(ValueError, match="n=2"):
        llm.engine.add([1, 2, 3], SamplingParams(n=2))
    assert not llm.engine.has_unfinished()


def test_llm_bad_input_raises_and_llm_keeps_serving(llm):
    with pytest.raises(ValueError, match="(?i)empty"):
        llm.generate("")
    with pytest.raises(ValueError):
        llm.generate(["The capital of France is", ""])  # validated before anything is queued
    with pytest.raises(ValueError):
        llm.generate(["a", "b"], [SamplingParams()])  # one params per prompt
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("Hi", SamplingParams(max_tokens=0))
    assert llm.engine.requests == {} and not llm.engine.has_unfinished()
    (out,) = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=4))
    assert out.text.strip() and len(out.outputs[0].token_ids) == 4


def test_llm_failed_request_leaves_nothing_behind(llm, monkeypatch):
    engine = llm.engine
    # One request at a time, so the second prompt is not part of the step that fails.
    monkeypatch.setattr(engine.scheduler, "config", dataclasses.replace(engine.scheduler.config, max_num_seqs=1))
    real, calls = engine.runner.execute, []

    def execute(plan):
        calls.append(plan)
        if len(calls) == 2:
            raise RuntimeError("simulated device error")
        return real(plan)

    monkeypatch.setattr(engine.runner, "execute", execute)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(RuntimeError, match="simulated device error"):
        llm.generate(["The capital of France is", "One, two, three,"], params)
    try:
        assert engine.requests == {}, f"left behind: {sorted(engine.requests)}"
    finally:
        for rid in list(engine.requests):
            engine.abort(rid)
        run_all(engine)
