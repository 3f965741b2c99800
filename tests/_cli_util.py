"""Run ``shoal`` commands in-process for the CLI tests."""

from __future__ import annotations


def cli(*args: str):
    """``shoal ARGS...`` through typer's test runner; returns its result (exit_code, output)."""
    from typer.testing import CliRunner

    from shoal.cli import app

    return CliRunner().invoke(app, list(args))
