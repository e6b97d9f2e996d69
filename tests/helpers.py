"""Shared test helpers: one CLI runner and one tiny training run (pytest puts this folder on sys.path)."""

from __future__ import annotations

from typer.testing import CliRunner

from diffuse_cli.cli import app

runner = CliRunner()

# A training run that finishes in about a second on one CPU thread: the tiny U-Net, a few steps.
TINY_TRAIN = ["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--save-every", "2", "--sample-every", "0",
              "--device", "cpu"]  # fmt: skip


def invoke(*args):
    """Run `diffuse ARGS...` in-process; every argument is turned into a string."""
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, code: int = 1) -> str:
    """The output of a command that failed with exit ``code``, cleanly: no traceback, no stray exception.
    Whitespace is folded, so a message wrapped on a narrow terminal still matches."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return " ".join(r.output.split())
