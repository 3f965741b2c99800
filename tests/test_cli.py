"""The ``shoal`` command: it runs on the built-in model, and bad input ends it with one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shoal.cli import app
from tests._cli_util import cli

runner = CliRunner()


@pytest.fixture(autouse=True)
def keep_thread_count():
    """``--num-threads`` sets torch's process-wide thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def shoal(*args: str):
    return runner.invoke(app, list(args))


def test_generate_answers_with_the_default_model():
    result = shoal("generate", "--prompt", "What is the capital of France? Answer in one word.",
                   "--max-tokens", "10", "--num-threads", "1")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    assert torch.get_num_threads() == 1


def test_bench_offline_prints_throughput_ttft_and_tpot():
    result = shoal("bench", "offline", "-n", "3", "-c", "2", "--input-len", "12", "--output-len", "4",
                   "--num-threads", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["num_requests"] == 3 and report["concurrency"] == 2
    assert report["output_token_throughput"] > 0
    assert 0 < report["ttft_ms"]["p50"] <= report["e2e_ms"]["p50"]
    assert report["tpot_ms"]["p50"] > 0


@pytest.mark.parametrize("args, message", [
    (("generate", "--prompt", "hi", "--model", "/no/such/model.gguf"), "no such file or directory"),
    (("generate", "--prompt", "hi", "--device", "cuda:7"), "cuda:7' requested but"),
    (("generate", "--prompt", "hi", "--device", "bogus"), "unknown device 'bogus'"),
    (("generate", "--prompt", "hi", "--num-threads", "0"), "num_threads must be None or an integer >= 1, got 0"),
    (("bench", "offline", "-c", "0"), "concurrency must be >= 1, got 0"),
    (("bench", "offline", "--output-len", "-1"), "output_len must be >= 1, got -1"),
    (("bench", "offline", "--max-num-batched-tokens", "0"), "must be positive"),
    (("serve", "--speculative-config", "{ngram"), "--speculative-config is not valid JSON"),
    (("serve", "--speculative-config", '{"method": "eagle"}'), "speculative_config.method must be one of ngram"),
])
def test_bad_input_is_one_line_not_a_traceback(args, message):
    result = shoal(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("\n") <= 2


@pytest.mark.parametrize("args, message", [
    (("serve", "--tool-call-parser", "mistral"), "'hermes', 'llama3_json'"),
    (("serve", "--tool-prompt", "never"), "'auto', 'template', 'system'"),
    (("serve", "--dispatch", "random"), "'predicted_latency', 'round_robin'"),
    (("sim", "--scheduling-policy", "lifo"), "'fcfs', 'priority', 'vtc'"),
    (("generate", "--prompt", "hi", "--dtype", "fp8"), "'auto', 'bfloat16', 'float16', 'float32'"),
])
def test_options_with_choices_refuse_others_before_loading(args, message):
    result = cli(*args)
    assert result.exit_code == 2 and "is not one of" in result.output and message in result.output, result.output


def test_option_choices_are_the_modules_own():
    """The choices typer checks are those the code behind each option accepts."""
    from typing import get_args

    from shoal import cli as c
    from shoal.bench.agent import PRESETS
    from shoal.control.policies import DISPATCH_POLICIES
    from shoal.engine.config import _DTYPES
    from shoal.engine.scheduler import ADMISSION_ORDERS, SCHEDULING_POLICIES
    from shoal.server.tools import FORMATS, PROMPTS

    assert get_args(c.Dispatch) == DISPATCH_POLICIES
    assert get_args(c.Admission) == ADMISSION_ORDERS and get_args(c.SchedulingPolicy) == SCHEDULING_POLICIES
    assert set(get_args(c.ToolCallParser)) == set(FORMATS) and get_args(c.ToolPrompt) == PROMPTS
    assert set(get_args(c.AgentPreset)) == set(PRESETS)
    assert set(get_args(c.Dtype)) - {"auto"} <= set(_DTYPES)
