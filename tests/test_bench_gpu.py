"""Smoke test: benchmarks/gpu.py --tiny runs end to end on the CPU, so the GPU script cannot rot."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = "benchmarks.gpu"  # run as a module of the benchmarks package, from the repository root
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess that imports torch and runs the script end to end (180-300 s timeout)
def test_gpu_benchmark_tiny_on_cpu_replaces_its_markdown_section(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# Benchmark results\n\n<!-- train_cpu:start -->\nkeep me\n<!-- train_cpu:end -->\n\n"
        "<!-- gpu:start -->\nstale numbers\n<!-- gpu:end -->\n\ntrailer\n"
    )
    cmd = [sys.executable, "-m", SCRIPT, "--tiny", "--device", "cpu", "--markdown", str(md)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # numbers do not matter here; stay quick on a busy machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("| ours | fp32 |", "| ours | bf16 |", "| ours + compile | bf16 |"):
        assert row in out and "error" not in out.split(row, 1)[1].splitlines()[0].lower(), row
    assert "img/s" in out and "ours bf16 (eager)" in out
    assert "CUDA graphs need a CUDA device" in out  # skipped, and said so, rather than failing
    if importlib.util.find_spec("diffusers") is not None:
        assert "| diffusers UNet2DModel | bf16 |" in out and "/ diffusers best =" in out
    else:
        assert "diffusers is not installed" in out

    text = md.read_text()
    assert text.count("<!-- gpu:start -->") == 1 and text.count("<!-- gpu:end -->") == 1
    assert "stale numbers" not in text
    assert "keep me" in text and text.rstrip().endswith("trailer")
    assert "--tiny" in text and "torch " in text and "device: CPU" in text


def _load_gpu_module():
    import importlib

    return importlib.import_module(SCRIPT)


def test_gpu_benchmark_picks_cuda_without_device_flag(monkeypatch):
    import torch

    gpu = _load_gpu_module()
    assert gpu.bench_device(None) == torch.device("cpu") or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # a bare "cuda" (or nothing) must carry an index: torch.cuda.set_device rejects "cuda"
    assert gpu.bench_device(None) == torch.device("cuda", 0)
    assert gpu.bench_device("cuda") == torch.device("cuda", 0)
    assert gpu.bench_device("cuda:1") == torch.device("cuda", 1)


def test_benchmark_and_training_share_the_step(monkeypatch, tmp_path):
    """`diffuse train` and the benchmark's "ours" rows both run engine/step.py's TrainStep: every TrainStep built
    is recorded (a class attribute, whatever name a module imported it under), then each one builds its step."""
    import torch

    from diffuse_cli.engine import step, training
    from helpers import TINY_TRAIN, invoke

    gpu = _load_gpu_module()
    assert gpu.make_train_step is step.make_train_step
    assert training.make_train_step is step.make_train_step

    built = []
    post_init = step.TrainStep.__post_init__

    def recording(self):
        built.append(self)
        post_init(self)

    monkeypatch.setattr(step.TrainStep, "__post_init__", recording)
    r = invoke("train", "builtin:digits", "--out", tmp_path / "r", *TINY_TRAIN, "--steps", "1")
    assert r.exit_code == 0, r.output
    assert len(built) == 1 and built[0].images.shape[1:] == (1, 8, 8)  # the training run's step

    s = gpu.Setup(cfg=gpu.ddpm_cifar10(tiny=True), device=torch.device("cpu"), batch=2, sample_batch=2,
                  sample_steps=1, warmup=0, chunk=1, budget_s=0.0, max_steps=1, compile_backend="")  # fmt: skip
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    run_step = gpu.ours_step(s, images, None, False, True)
    assert len(built) == 2 and built[1].images.shape == images.shape  # the benchmark's step
    assert torch.isfinite(run_step()) and built[1].opt.state  # and it is what the benchmark times: it trained
