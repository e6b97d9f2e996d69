"""Keep benchmarks/samplers.py runnable: its --quick mode, end to end, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess that imports torch and runs the script end to end (180-300 s timeout)
def test_quick_benchmark_runs_and_rewrites_only_its_sections(tmp_path):
    pytest.importorskip("diffusers")
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\nother numbers\n\n<!-- samplers:start -->\nstale\n<!-- samplers:end -->\n\n"
        "<!-- samplers-trained:start -->\nstale\n<!-- samplers-trained:end -->\n\n"
        "<!-- samplers-tuning:start -->\nnotes\n<!-- samplers-tuning:end -->\n\ntail\n"
    )
    env = {
        **os.environ,
        "DIFFUSE_BENCH_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run([sys.executable, "-m", "benchmarks.samplers", "--quick", "--markdown", str(results)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours dpmpp (defaults)" in proc.stdout and "diffusers DPM++ 2M lu" in proc.stdout
    assert "diffusers DDIM 50, leading, clip_sample" in proc.stdout and "training digits8-quick" in proc.stdout
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nother numbers\n") and text.rstrip().endswith("tail")
    assert "stale" not in text and "notes" in text
    for mark in ("samplers", "samplers-trained"):
        assert text.count(f"<!-- {mark}:start -->") == 1 and text.count(f"<!-- {mark}:end -->") == 1
    assert "| ours dpmpp (defaults) |" in text and "--quick" in text
    assert "| digits8-quick | ours dpmpp 20, clip=static (default) |" in text
