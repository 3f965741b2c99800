"""ray, scipy and matplotlib are extras: a plain ``shoal serve`` needs none of them, and a command
that needs one names the extra to install in one line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shoal.extras import EXTRAS, MissingExtra, require
from tests._cli_util import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_install_leaves_the_extras_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split("=")[0].split(">")[0].strip() for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert set(modules) <= set(extras[extra]), f"pyproject's [{extra}] lacks what shoal/extras.py names"
        assert not set(modules) & core
    assert "shoal[all]" in extras["test"], "the README's test command installs every extra"


def test_serving_one_engine_imports_no_extra():
    code = ("import sys, shoal.cli, shoal.server.api, shoal.server.async_engine, shoal.server.engine_process, "
            "shoal.engine.engine; print(sorted(m for m in ('ray', 'scipy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    with pytest.raises(MissingExtra, match=r"pip install 'shoal\[cluster\]'"):
        require("cluster", "a cluster")
    r = cli("serve", "--instances", "2", "--port", "1")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: shoal serve --instances") and "pip install 'shoal[cluster]'" in r.output


@pytest.mark.parametrize("args, module, extra", [
    (("sim", "-n", "2"), "matplotlib", "sim"),
    (("plan", "-n", "2"), "scipy", "sim"),
    (("profile",), "scipy", "sim"),
    (("bench", "serve", "--url", "http://127.0.0.1:1"), "matplotlib", "bench"),
])
def test_each_command_names_the_extra_it_lacks(monkeypatch, args, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    r = cli(*args)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert f"needs {module}: pip install 'shoal[{extra}]'" in r.output
