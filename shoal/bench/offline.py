"""``shoal bench offline``: fixed-length requests straight through the engine, C at a time.

The transformers baseline runs ``generate`` on the same weights with the same batch size, so a
speed-up is a ratio measured in one run.
"""

from __future__ import annotations

import time

import torch

from shoal.bench.prompts import PromptMaker
from shoal.bench.report import stats
from shoal.engine.config import resolve_dtype
from shoal.engine.engine import Engine
from shoal.engine.sampling_params import SamplingParams
from shoal.progress import Progress


def make_prompts(tokenizer, vocab_size: int, n: int, input_len: int) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``input_len`` tokens, from real text when a tokenizer exists."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(1, vocab_size, (n, input_len), generator=g).tolist()
    maker = PromptMaker(tokenizer)
    return [maker.token_ids(input_len, i) for i in range(n)]


def check_offline_args(num_requests: int, concurrency: int, input_len: int, output_len: int) -> None:
    """Raise ValueError naming the first argument that is not a positive integer."""
    for name, value in (("num_requests", num_requests), ("concurrency", concurrency),
                        ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def run_offline_bench(engine: Engine, *, num_requests: int, concurrency: int, input_len: int,
                      output_len: int, progress: Progress | None = None) -> dict:
    """Run the benchmark on ``engine`` (its ``max_num_seqs`` at least ``concurrency``); returns a
    JSON-able dict of throughput and latency figures (ms). ``progress`` hears of each finished request."""
    check_offline_args(num_requests, concurrency, input_len, output_len)
    prompts = make_prompts(engine.tokenizer, engine.model_config.vocab_size, num_requests, input_len)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    # Warm up kernels once so the first request does not pay one-time costs.
    engine.add(prompts[0][:16], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    ttft, tpot, e2e = [], [], []
    out_tokens = 0
    queue = list(prompts)
    in_flight = 0
    start = time.perf_counter()
    done = 0
    while queue or in_flight:
        while queue and in_flight < concurrency:
            engine.add(queue.pop(0), params)
            in_flight += 1
        for out in engine.step():
            if not out.finished:
                continue
            in_flight -= 1
            done += 1
            if progress is not None:
                progress(done, num_requests)
            n = out.num_output_tokens
            out_tokens += n
            first = out.first_token_time - out.arrival_time
            total = out.finished_time - out.arrival_time
            ttft.append(first * 1e3)
            e2e.append(total * 1e3)
            if n > 1:
                tpot.append((total - first) / (n - 1) * 1e3)
    duration = time.perf_counter() - start
    return {
        "engine": "shoal",
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "num_requests": num_requests,
        "concurrency": concurrency,
        "input_len": input_len,
        "output_len": output_len,
        "duration_s": duration,
        "request_throughput": num_requests / duration,
        "output_token_throughput": out_tokens / duration,
        "ttft_ms": stats(ttft, 1.0),
        "tpot_ms": stats(tpot, 1.0),
        "e2e_ms": stats(e2e, 1.0),
        "num_preemptions": engine.scheduler.num_preemptions,
    }


def run_transformers_baseline(
    *, model: str | None, num_requests: int, concurrency: int, input_len: int, output_len: int, dtype: str = "auto",
    progress: Progress | None = None,
) -> dict:
    """transformers ``generate`` on the same weights: batches of ``concurrency``, EOS blocked, greedy.
    ``progress`` hears of each finished batch."""
    import transformers

    from shoal.model.loader import default_model_path, load_checkpoint, load_tokenizer

    path = model or default_model_path()
    torch_dtype = resolve_dtype(dtype, torch.device("cpu"))
    cfg, state = load_checkpoint(path, dtype=torch_dtype)
    if cfg.rope_freq_factors is not None:  # transformers takes RoPE scaling only as a rope_scaling dict
        raise ValueError("the transformers baseline cannot run a GGUF whose RoPE scaling is a rope_freqs tensor")
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_scaling=cfg.rope_scaling,
    )
    hf = transformers.LlamaForCausalLM(hf_config).to(torch_dtype).eval()
    hf.load_state_dict({f"model.{k}" if k != "lm_head.weight" else k: v for k, v in state.items()}, strict=False)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    tokenizer = load_tokenizer(path)
    prompts = make_prompts(tokenizer, cfg.vocab_size, num_requests, input_len)
    out_tokens = 0
    batches = [prompts[i : i + concurrency] for i in range(0, num_requests, concurrency)]
    with torch.inference_mode():
        hf.generate(torch.tensor(prompts[:1]), max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        for k, batch in enumerate(batches):
            ids = torch.tensor(batch)
            gen = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                do_sample=False, pad_token_id=0,
            )
            out_tokens += (gen.shape[1] - ids.shape[1]) * ids.shape[0]
            if progress is not None:
                progress(k + 1, len(batches))
    duration = time.perf_counter() - start
    return {
        "engine": "transformers",
        "dtype": str(torch_dtype).removeprefix("torch."),
        "duration_s": duration,
        "output_token_throughput": out_tokens / duration,
    }
