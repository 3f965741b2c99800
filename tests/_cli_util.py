"""Run ``shoal`` commands in-process for the CLI tests."""

from __future__ import annotations


def cli(*args: str, env: dict[str, str] | None = None):
    """``shoal ARGS...`` through typer's test runner, reading ``SHOAL_*`` variables as the installed
    command does (``env`` adds some); returns its result (exit_code, output). The terminal is wide, so
    that typer's error box does not wrap a message."""
    from typer.testing import CliRunner

    from shoal.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300", **(env or {})}, auto_envvar_prefix="SHOAL")
