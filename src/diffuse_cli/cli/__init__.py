"""The `diffuse` command line: Typer's "one file per command" layout.

`app.py` holds the app, the consoles, error -> exit code and the shared options; each command module
(schedule, noise, train, sample, export, eval, report) parses its options, makes one engine call and renders the
result. No engine decisions are made here.
"""

from . import commands  # noqa: F401 - registers every command with the app
from .app import app, main

__all__ = ["app", "main"]
