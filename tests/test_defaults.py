"""Defaults that fit the data and the machine: image size from the folder, preset and batch by device,
--time budgets (with a fake clock), thread count, early previews."""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from diffuse_cli.engine import device as devices
from diffuse_cli.engine import training
from diffuse_cli.engine.config import UNetConfig, auto_preset, default_batch_size, parse_duration
from diffuse_cli.engine.data import MAX_AUTO_IMAGE_SIZE, infer_image_size, load_folder
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.unet import UNet, count_parameters
from helpers import TINY_TRAIN, invoke


def _folder(tmp_path, sizes):
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("L", (w, h), 128 + i % 50).save(root / f"{i:03d}.png")
    return root


@pytest.mark.parametrize(
    "sizes, want, note",
    [
        ([(16, 16)] * 5, 16, "own size"),
        ([(28, 28)] * 3 + [(64, 64)], 28, "own size"),  # the most common size wins
        ([(30, 40)] * 4, (44, 32), "40x30; 44x32 keeps their aspect ratio"),  # one aspect ratio: H x W, rounded
        ([(30, 40), (40, 30)] * 2, 32, "30 px rounded to 32"),  # mixed shapes: the shorter side, square
        ([(3, 3)] * 2, 8, "3 px rounded to 8"),  # tiny images: at least 8
        ([(1024, 768)] * 2, (MAX_AUTO_IMAGE_SIZE, 88), "capped"),  # huge images: a cap and how to change it
        ([(1024, 768), (1000, 1000)], MAX_AUTO_IMAGE_SIZE, "capped"),
        ([(16, 16), (20, 20), (20, 20), (16, 16)], 20, "own size"),  # a tie: the larger
    ],
)
def test_image_size_from_the_folder(tmp_path, sizes, want, note):
    root = _folder(tmp_path, sizes)
    size, why = infer_image_size(sorted(root.iterdir()))
    assert size == want and note in why
    if "capped" in why:
        assert "--image-size" in why
    ds = load_folder(root)  # no size given: the same choice, said in the summary
    assert ds.image_size == want and ds.summary.size_note == why and note in ds.summary.size_note


def test_given_size_wins_and_says_nothing(tmp_path):
    ds = load_folder(_folder(tmp_path, [(30, 30)] * 2), 12)
    assert ds.image_size == 12 and ds.summary.size_note == ""


def test_preset_and_batch_by_device():
    assert auto_preset(16, "cpu") == "cpu" and auto_preset(32, "cpu") == "cpu"
    assert auto_preset(32, "cuda") == "ddpm-cifar10" and auto_preset(16, "cuda") == "small"
    cpu16 = UNetConfig.preset("auto", 16, 1, "cpu")
    gpu32 = UNetConfig.preset("auto", 32, 3, "cuda")
    assert cpu16.attention_resolutions == (8,) and cpu16.num_res_blocks == 2
    assert count_parameters(UNet(cpu16)) < 2_000_000  # minutes on a CPU, not hours
    assert count_parameters(UNet(gpu32)) == 35_746_307  # DDPM's CIFAR-10 model on a GPU
    assert UNetConfig.preset("auto", 64, 3, "cpu").attention_resolutions == (16,)  # attention stays cheap
    assert default_batch_size("cpu") == 32 and default_batch_size("cuda") == 128


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("2h30m", 9000), ("45", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-3m", "0", "m5", "5m5"])
def test_parse_duration_refuses(text):
    with pytest.raises(ConfigError, match="--time"):
        parse_duration(text)


@pytest.fixture
def fake_clock(monkeypatch):
    """Every reading of the training loop's clock advances 1 s: a --time budget of N s lasts about N readings."""
    ticks = itertools.count()
    monkeypatch.setattr(training, "_clock", lambda: float(next(ticks)))


def test_time_budget_stops_saves_and_resumes(tmp_path, fake_clock):
    run = tmp_path / "run"
    r = invoke("train", "builtin:digits", "--out", run, *TINY_TRAIN, "--steps", "1000", "--time", "20s")
    assert r.exit_code == 0, r.output
    from diffuse_cli.engine import checkpoint as ckpt
    from diffuse_cli.engine import rundir

    done = rundir.newest_state(run).step
    assert 3 <= done < 20 and "--time budget is spent" in r.output  # stopped by the clock, not by --steps
    assert ckpt.load(run / "model.safetensors").step == done  # saved exactly as a normal finish
    r = invoke("train", "builtin:digits", "--out", run, "--resume", "--time", "20s")
    assert r.exit_code == 0, r.output
    assert done < rundir.newest_state(run).step < 1000


def test_time_without_steps_trains_until_the_budget(tmp_path, fake_clock):
    r = invoke(
        "train",
        "builtin:digits",
        "--out",
        tmp_path / "r",
        "--preset",
        "tiny",
        "-b",
        "4",
        "--time",
        "10s",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "training for 10 s" in r.output and "1000000000" not in r.output


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, threads in ((1.2, 1), (0.1, 2), (7.0, 1), (0.6, 1)):
        monkeypatch.setattr(devices, "busy_cores", lambda b=busy: b)
        assert devices.default_threads() == threads, busy  # a busy core: do not spin-wait on it


def test_busy_cores_sees_a_spinning_process():
    import subprocess
    import sys

    idle = devices.busy_cores(0.3)
    if idle > devices._usable_cores() - 1:
        pytest.skip(f"the machine is already busy ({idle:.1f} cores): one more spinning process cannot show")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = devices.busy_cores(0.5)
    finally:
        spin.kill()
    assert busy > idle + 0.5, (idle, busy)  # one more core's worth of work


def test_threads_option_is_used(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        r = invoke("train", "builtin:digits", "--out", tmp_path / "r", *TINY_TRAIN, "--threads", "2")
        assert r.exit_code == 0 and "2 CPU threads" in r.output, r.output
    finally:
        torch.set_num_threads(before)


def test_previews_come_early_then_regularly():
    due = [s for s in range(1, 5001) if training.preview_due(s, 1000)]
    assert due == [100, 200, 400, 800, 1000, 2000, 3000, 4000, 5000]
    assert not any(training.preview_due(s, 0) for s in range(1, 300))
    # and at the end of a run, unless it is shorter than the first preview (a 1-step run: noise, and most of its time)
    assert training.preview_due(137, 1000, done=True) and not training.preview_due(99, 1000, done=True)
