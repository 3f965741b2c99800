"""The Dockerfile, compose file and deploy/ configs name real paths and real ``shoal serve`` options
(no docker daemon here: the image is not built in the tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
import yaml

from shoal.cli import app
from shoal.config_file import option_defaults

ROOT = Path(__file__).resolve().parents[1]


def serve_options() -> dict[str, set[str]]:
    """``shoal serve``'s options: parameter name -> its flags."""
    serve = typer.main.get_command(app).commands["serve"]
    return {p.name: set(p.opts) | set(p.secondary_opts) for p in serve.params}


def env_option(var: str) -> str:
    """The ``serve`` parameter a ``SHOAL_SERVE_*`` variable sets (auto_envvar_prefix's rule)."""
    assert var.startswith("SHOAL_SERVE_"), var
    return var.removeprefix("SHOAL_SERVE_").lower()


def assert_serve_args(args: list[str]) -> None:
    flags = set().union(*serve_options().values())
    assert args[0] == "serve"
    for arg in args[1:]:
        if arg.startswith("-"):
            assert arg.split("=")[0] in flags, f"{arg} is not a shoal serve option"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_dockerfile_copies_real_paths_and_sets_real_options():
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY {path}: no such path"
    for var in re.findall(r"\b(SHOAL_SERVE_\w+)=", text):
        assert env_option(var) in serve_options(), var
    assert '"torch==2.13.0"' in text or "torch==2.13.0" in text, "the Dockerfile pins the same torch"
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)) == ["shoal"]
    assert_serve_args(cmd)
    extras = re.search(r'"\.\[(\w+)\]"', text).group(1)
    assert extras in _extras(), f"the image installs extra [{extras}], which pyproject.toml lacks"


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_compose_mounts_real_files_with_real_options(compose):
    services = compose["services"]
    assert set(services) >= {"shoal", "prometheus", "grafana"}
    for name, svc in services.items():
        if "build" in svc:
            assert (ROOT / svc["build"] / "Dockerfile").is_file()
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            assert (ROOT / host).exists(), f"{name} mounts {host}: no such path"
    shoal = services["shoal"]
    assert_serve_args(shoal["command"])
    for var in shoal.get("environment", {}):
        assert env_option(var) in serve_options(), var
    config = shoal["command"][shoal["command"].index("--config") + 1]
    host_file = next(v.split(":")[0] for v in shoal["volumes"] if v.split(":")[1] == config)
    values = option_defaults(ROOT / host_file, set(serve_options()))
    assert values, "the mounted config sets options"


def test_prometheus_scrapes_the_shoal_service_and_grafana_finds_the_dashboard(compose):
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    port = str(option_defaults(ROOT / "deploy/shoal.yaml", set(serve_options())).get("port", 8000))
    assert f"shoal:{port}" in targets and "8000:8000" in compose["services"]["shoal"]["ports"]
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/shoal.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert any(c.startswith(dash_dir + "/") and h.endswith(".json") for h, c in mounts.items())
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
