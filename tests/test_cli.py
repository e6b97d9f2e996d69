"""The `diffuse` app as a whole: help, version, usage errors, for every command (helpers.COMMANDS).
Each command's own behaviour lives in test_cli_<command>.py."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import COMMANDS
from helpers import invoke as run


def test_commands_are_the_documented_ones():
    """COMMANDS is read from the app, so a new command joins every test below; it must not be read as empty,
    and the README's command list (its first code block) names the same commands in the same order."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("```", 2)[1]
    documented = [line.split()[1] for line in block.splitlines() if line.startswith("diffuse ")]
    assert len(COMMANDS) >= 6 and COMMANDS == documented


def test_help_lists_commands_and_is_fast():
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "diffuse_cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    listed = re.findall(r"^[│|] (\w+) ", r.stdout, re.M)  # the first word of each row in the Commands box
    for cmd in COMMANDS:
        assert cmd in r.stdout
        assert cmd in listed, (cmd, r.stdout)
    assert "torch" not in r.stderr.split(), "diffuse --help must not import torch"
    assert not any(line.split("|")[-1].strip() == "torch" for line in r.stderr.splitlines())


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and "diffuse" in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_example(cmd):
    r = run(cmd, "-h")
    assert r.exit_code == 0
    assert "Examples" in r.stdout and f"diffuse {cmd}" in r.stdout
    if cmd == "eval":
        assert "NOT FID" in " ".join(r.stdout.split())


@pytest.mark.parametrize(
    "args,msg",
    [
        (["schedule", "--kind", "bogus"], "bogus"),
        (["schedule", "-T", "0"], "timesteps must be"),
        (["schedule", "--beta-start", "0.02", "--beta-end", "0.01"], "beta_start < beta_end"),
        (["noise", "does-not-exist.png"], "no such file"),
    ],
)
def test_bad_input_one_line(args, msg):
    r = run(*args)
    assert r.exit_code in (1, 2)
    assert msg in r.output
    assert "Traceback" not in r.output


def test_help_keeps_placeholders_and_shows_flags_plainly():
    noise_help = run("noise", "--help").output
    assert "<image>-noise.png" in noise_help
    train_help = run("train", "--help").output
    assert "runs/<data name>" in train_help
    assert "<bool>" not in noise_help and "<bool>" not in train_help  # --resume, not --resume <bool>
    assert "9223372036854775807" not in train_help
    assert "Exit codes" in run("--help").output


def test_usage_errors_are_one_line_with_exit_2(photo):
    for args in (["noise", photo, "--size", "0"], ["sample", "x", "--sampler", "foo"], ["schedule", "--nope"],
                 ["schedule", "--timesteps", "0"]):  # fmt: skip
        r = run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "Value error" not in lines[0] and "╭" not in r.stderr
