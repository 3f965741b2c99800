"""The operator's surface: logs (ready line, access log, request ids, JSON), global flags after the
subcommand, ``--version`` / ``python -m shoal``, and a taken port refused before the model loads."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from shoal import logs
from shoal.cli import hoist_global_flags
from tests._cli_util import cli
from tests._server_util import MODEL_NAME, fast_engine, serve


def shoal(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, expected", [
    (["serve", "-v", "--port", "1"], ["-v", "serve", "--port", "1"]),
    (["sim", "--out", "x", "--log-level", "debug"], ["--log-level", "debug", "sim", "--out", "x"]),
    (["serve", "--log-format=json"], ["--log-format=json", "serve"]),
    (["generate", "--", "-v"], ["generate", "--", "-v"]),  # after -- nothing moves
    (["--log-level", "info", "serve"], ["--log-level", "info", "serve"]),
])
def test_global_flags_may_follow_the_subcommand(argv, expected):
    assert hoist_global_flags(argv) == expected


def test_version_and_python_m_shoal():
    from importlib.metadata import version

    r = shoal("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"shoal {version('shoal')}"
    r = shoal("serve", "--log-level", "loud")
    assert r.returncode == 2 and "--log-level" in r.stderr


def test_a_taken_port_is_refused_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t = time.monotonic()
        r = shoal("serve", "--port", str(port))
        assert r.returncode == 2, r.stderr
        assert time.monotonic() - t < 15
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"), r.stderr
    assert "engine ready" not in r.stderr and "Traceback" not in r.stderr


def test_json_log_lines_carry_the_extra_fields():
    record = logging.makeLogRecord({"name": "shoal.access", "levelname": "INFO", "msg": "GET %s", "args": ("/health",),
                                    "status": 200, "request_id": "abc"})
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "GET /health" and line["logger"] == "shoal.access" and line["level"] == "info"
    assert (line["status"], line["request_id"]) == (200, "abc")
    with pytest.raises(ValueError, match="--log-level"):
        logs.configure("loud")


@pytest.fixture(scope="module")
def logged_server():
    engine = fast_engine()
    server, _ = serve(engine, access_log=True)
    yield server
    server.stop()


def test_request_ids_are_echoed_made_up_or_refused(logged_server, caplog):
    url = logged_server.url
    with caplog.at_level(logging.INFO, logger="shoal.access"):
        r = httpx.post(f"{url}/v1/completions", headers={"X-Request-Id": "trace-42"},
                       json={"model": MODEL_NAME, "prompt": "a secret prompt", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        made = httpx.get(f"{url}/health").headers["x-request-id"]
        assert len(made) == 32 and int(made, 16) >= 0
        bad = httpx.post(f"{url}/v1/completions", headers={"X-Request-Id": "x" * 129},
                         json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
        assert bad.headers["x-request-id"] != "x" * 129
    lines = [rec for rec in caplog.records if rec.name == "shoal.access"]
    mine = [rec for rec in lines if rec.request_id == "trace-42"]
    assert len(mine) == 1 and mine[0].status == 200 and mine[0].path == "/v1/completions"
    assert any(rec.status == 400 for rec in lines)
    assert not any("secret" in rec.getMessage() for rec in lines), "no prompt in a log line"


def test_a_real_shoal_serve_logs_ready_and_each_request():
    """``shoal serve`` on the built-in model: the ready line names the URL and model; the access
    log has one line per request with its id; SIGTERM drains and exits 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shoal", "serve", "--port", str(port), "--kv-cache-gb", "0.05",
                             "--max-model-len", "512", "--served-model-name", "tiny-ops"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, err = time.monotonic() + 120, []
        os.set_blocking(proc.stderr.fileno(), False)
        while time.monotonic() < deadline and not any("Shoal ready" in line for line in err):
            assert proc.poll() is None, "".join(err) + proc.stderr.read()
            err += proc.stderr.readlines()
            time.sleep(0.2)
        ready = next(line for line in err if "Shoal ready" in line)
        assert f"http://127.0.0.1:{port}/v1" in ready and "'tiny-ops'" in ready and "--host 0.0.0.0" in ready
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"X-Request-Id": "ops-1"}, timeout=60,
                       json={"model": "tiny-ops", "prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-request-id"] == "ops-1"
        time.sleep(0.5)
        err += proc.stderr.readlines()
        access = [line for line in err if "shoal.access" in line]
        assert any("POST /v1/completions 200" in line and "id=ops-1" in line for line in access), err
        assert not any("Hello" in line for line in err), "no prompt in a log line"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out == "", "stdout stays empty: logs go to stderr"


def test_config_file_and_environment_reach_the_engine(tmp_path):
    """A value from ``--config`` or ``SHOAL_SERVE_*`` gets to EngineConfig (an invalid one is its
    error, before any model loads); the command line wins over both; unknown keys are refused."""
    port = str(free_port())
    conf = tmp_path / "shoal.yaml"
    conf.write_text(f"max-num-seqs: 0\nport: {port}\n")
    r = cli("serve", "--config", str(conf))
    assert r.exit_code == 2 and "max_num_seqs" in r.output, r.output
    r = cli("serve", "--port", port, env={"SHOAL_SERVE_DTYPE": "float64"})
    assert r.exit_code == 2 and "'float64' is not one of" in r.output, r.output
    conf.write_text(f"max_num_seqs: 4\nport: {port}\npreemption-mode: sometimes\n")
    r = cli("serve", "--config", str(conf))
    assert r.exit_code == 2 and "'sometimes' is not one of" in r.output, "a file's value is checked as the option's"
    conf.write_text(f"max_num_seqs: 4\nport: {port}\n")
    r = cli("serve", "--config", str(conf), "--max-num-seqs", "0")
    assert r.exit_code == 2 and "max_num_seqs" in r.output, "the command line overrides the file"
    r = cli("serve", "--config", str(conf), env={"SHOAL_SERVE_MAX_NUM_SEQS": "0"})
    assert r.exit_code == 2 and "max_num_seqs" in r.output, "the environment overrides the file"
    conf.write_text("max_seqs: 4\n")
    r = cli("serve", "--config", str(conf))
    assert r.exit_code == 2 and "unknown options max_seqs" in r.output
    conf.write_text("- 1\n")
    r = cli("serve", "--config", str(conf))
    assert r.exit_code == 2 and "expected a mapping" in r.output


def test_engine_knobs_from_file_environment_and_flags_reach_engine_config(tmp_path, monkeypatch):
    """The EngineConfig that ``serve`` builds carries each knob from where it was given."""
    import shoal.engine.engine

    built = []

    def capture(config, *args, **kwargs):
        built.append(config)
        raise ValueError("captured")

    monkeypatch.setattr(shoal.engine.engine, "Engine", capture)
    conf = tmp_path / "shoal.yaml"
    conf.write_text(f"port: {free_port()}\nblock-size: 32\nenable_prefix_caching: false\n"
                    "preemption_mode: swap\npriority_aging_s: 5\nswap_space: 0.5\nmax_num_seqs: 8\n")
    r = cli("serve", "--engine-thread", "--config", str(conf), "--max-num-seqs", "12",
            env={"SHOAL_SERVE_MAX_NUM_BATCHED_TOKENS": "256"})
    assert r.exit_code == 2 and "captured" in r.output, r.output
    (c,) = built
    assert (c.block_size, c.enable_prefix_caching, c.preemption_mode, c.priority_aging_s, c.swap_space_gb) == \
        (32, False, "swap", 5.0, 0.5)
    assert c.max_num_seqs == 12 and c.max_num_batched_tokens == 256
