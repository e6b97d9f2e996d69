"""Smoke test: benchmarks/train_cpu.py --quick runs end to end, so the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = "benchmarks.train_cpu"  # run as a module of the benchmarks package, from the repository root
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess that imports torch and runs the script end to end (180-300 s timeout)
def test_train_cpu_quick_replaces_its_markdown_section(tmp_path):
    pytest.importorskip("diffusers")
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# Benchmark results\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n\n"
        "<!-- train_cpu:start -->\nstale numbers\n<!-- train_cpu:end -->\n\ntrailer\n"
    )
    # One thread: the numbers do not matter here, and it stays quick on a busy machine.
    cmd = [sys.executable, "-m", SCRIPT, "--quick", "--threads", "1", "--markdown", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "ours (eager) / diffusers throughput" in proc.stdout
    text = md.read_text()
    assert text.count("<!-- train_cpu:start -->") == 1 and text.count("<!-- train_cpu:end -->") == 1
    assert "stale numbers" not in text
    assert "keep me" in text and text.rstrip().endswith("trailer")
    assert "| ours |" in text and "--quick" in text
