"""The ``shoal`` command: it runs on the built-in model, and bad input ends it with one clear line."""

from __future__ import annotations

import io
import json
import subprocess
import sys

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
    from shoal.control.policies import DISPATCH_POLICIES, MIGRATION_POLICIES
    from shoal.engine.config import _DTYPES
    from shoal.engine.scheduler import ADMISSION_ORDERS, SCHEDULING_POLICIES
    from shoal.server.tools import FORMATS, PROMPTS

    assert get_args(c.Dispatch) == DISPATCH_POLICIES and get_args(c.Migration) == MIGRATION_POLICIES
    assert get_args(c.Admission) == ADMISSION_ORDERS and get_args(c.SchedulingPolicy) == SCHEDULING_POLICIES
    assert set(get_args(c.ToolCallParser)) == set(FORMATS) and get_args(c.ToolPrompt) == PROMPTS
    assert set(get_args(c.AgentPreset)) == set(PRESETS)
    assert set(get_args(c.Dtype)) - {"auto"} <= set(_DTYPES)


# ---- what long commands print where --------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_on_a_terminal_only_and_on_stderr(monkeypatch, capsys):
    from shoal.progress import bar

    with bar("quiet work", 3) as progress:
        progress(1, 3)
        progress(3, 3)
    assert capsys.readouterr() == ("", "")  # a pipe or a CI log gets nothing
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with bar("loud work", 2) as progress:
        progress(2, 2)
        print("the result")
    assert "loud work" in terminal.getvalue() and "the result" not in terminal.getvalue()
    assert capsys.readouterr().out == "the result\n"


def test_sim_prints_only_json_and_a_one_line_verdict_when_overloaded(tmp_path):
    result = cli("sim", "-n", "60", "--rate", "50", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # the whole of stdout
    assert printed["verdict"]["status"] == "overloaded"
    lines = result.stderr.splitlines()
    assert lines[0] == printed["verdict"]["message"] and lines[0].startswith("Overloaded: ")
    assert "add --instances" in lines[0] and lines[1].startswith("wrote ") and "report.html" in lines[1]
    assert (tmp_path / "report.html").is_file()
    calm = cli("sim", "-n", "5", "--rate", "1", "--out", str(tmp_path))
    assert json.loads(calm.stdout)["verdict"]["status"] == "ok" and calm.stderr.startswith("wrote ")


def test_plan_prints_only_json():
    """A real ``shoal plan`` in its own process (the solver's C code writes to the real stdout)."""
    r = subprocess.run([sys.executable, "-m", "shoal", "plan", "-n", "40", "--gpu", "L4"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["counts"] and plan["meets_target"] is True and "warning" not in plan


def test_plan_warns_when_its_check_misses_and_names_a_mix_that_meets_it(monkeypatch):
    from shoal.sim import planner

    def plan(counts: dict[str, int], cost: float, attainment: float, headroom: float = 1.0) -> planner.Plan:
        check = {"goodput_rps": 1.0, "slo_attainment": attainment, "request_throughput": 1.0, "completed": 10,
                 "num_requests": 10, "ttft_ms": {"p90": 900.0}, "tpot_ms": {"p90": 90.0}}
        return planner.Plan(counts, cost, {}, {}, [(1, 2)], [1.0], {}, headroom, check, attainment >= 0.9)

    missed = plan({"L4": 1}, 0.7, 0.62)
    missed.suggestion = plan({"L4": 3}, 2.1, 0.93, headroom=0.61)
    monkeypatch.setattr(planner, "make_plan", lambda *args, **kwargs: missed)
    result = cli("plan", "-n", "10")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["meets_target"] is False and out["verified"]["slo_attainment"] == 0.62
    assert out["suggestion"]["counts"] == {"L4": 3} and out["suggestion"]["verified"]["slo_attainment"] == 0.93
    assert out["suggestion"]["headroom"] == 0.61
    assert result.stderr == f"Warning: {out['warning']}\n"
    assert "62% of requests, below the 90% asked; 3 x L4 ($2.10/h) meets it" in out["warning"]
    missed.suggestion = None
    out = json.loads(cli("plan", "-n", "10").stdout)
    assert out["suggestion"] is None and "no mix tried met it" in out["warning"]
