"""Keep benchmarks/samplers.py runnable: its --quick mode, end to end, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_rewrites_only_its_section(tmp_path):
    pytest.importorskip("diffusers")
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\nother numbers\n\n<!-- samplers:start -->\nstale\n<!-- samplers:end -->\n\ntail\n"
    )
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samplers.py"), "--quick", "--markdown", str(results)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours dpmpp (defaults)" in proc.stdout and "diffusers DPM++ 2M lu" in proc.stdout
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nother numbers\n") and text.rstrip().endswith("tail")
    assert (
        "stale" not in text and text.count("<!-- samplers:start -->") == 1 and text.count("<!-- samplers:end -->") == 1
    )
    assert "| ours dpmpp (defaults) |" in text and "--quick" in text
