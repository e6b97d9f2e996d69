"""Shared test helpers (pytest puts this folder on sys.path): one CLI runner, the list of commands, the tiny
training options, and the system tests' tools. The session's shared trained runs are fixtures in conftest.py."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from diffuse_cli.cli import app

runner = CliRunner()

# Every command of the app, in the order `diffuse --help` lists them: tests that promise something of
# "every command" take this list, so a new command is covered without editing them.
COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]

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


# --- the system tests' tools: real processes, stderr, temporaries -------------------------------------------
# builtin:digits at 8x8 on the tiny U-Net (1M parameters): a training step takes milliseconds on one CPU thread.
TINY_DIGITS = ["--preset", "tiny", "--batch-size", "8", "--device", "cpu", "-T", "50", "--kind", "cosine"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ENV.pop("DIFFUSE_DEBUG", None)


def no_crash(r) -> None:
    """Exit 0, 1 or 2, never an exception escaping the app, never a traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{r.exception!r}\n{r.output}"
    assert r.exit_code in (0, 1, 2), r.output
    assert "Traceback" not in r.output


def one_line_stderr(r, pattern: str = "", code: int = 1) -> str:
    """The command failed with exit ``code`` and exactly one line on stderr, ``error: ...``, that matches
    ``pattern`` (a regular expression); returns that line."""
    no_crash(r)
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def temporaries(root: Path) -> list[Path]:
    """The temporary files (fileio.TMP_PREFIX) left anywhere under ``root``."""
    from diffuse_cli.engine import fileio

    return list(Path(root).rglob(f"{fileio.TMP_PREFIX}*"))


def diffuse(*args, **kw) -> subprocess.Popen:
    """`diffuse ARGS` as a separate process, through the real entry point (`main`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "diffuse_cli", *map(str, args)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 120.0, poll: float = 0.0005) -> bool:
    """Poll until ``predicate()`` holds; False if ``proc`` ended or time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


def state_steps(run: Path) -> list[int]:
    """The steps of the run's training states, oldest first."""
    from diffuse_cli.engine import checkpoint as ckpt

    return [int(p.name[len("state-") : -len(".safetensors")]) for p in ckpt.list_states(run)]


def flip_byte(path: Path, index: int) -> None:
    b = bytearray(path.read_bytes())
    b[index] ^= 0xFF
    path.write_bytes(bytes(b))


def header_length(path: Path) -> int:
    """The length of a safetensors file's JSON header."""
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def resume_to_6(run) -> object:
    """`diffuse train --resume` of the tiny run (conftest's `shared_run`) to step 6, saving every 2 steps."""
    return invoke(
        "train",
        "builtin:digits",
        *TINY_DIGITS,
        "--steps",
        6,
        "--save-every",
        2,
        "--sample-every",
        0,
        "--out",
        run,
        "--resume",
    )


def fake_pytorch_fid(monkeypatch) -> None:
    """A stand-in pytorch_fid whose weights download fails, as it does without a network."""
    import types
    import urllib.error

    class InceptionV3:
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    package, module = types.ModuleType("pytorch_fid"), types.ModuleType("pytorch_fid.inception")
    module.InceptionV3 = InceptionV3
    package.inception = module
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
