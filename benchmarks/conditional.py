"""Class-conditional digits: does ``diffuse sample --class 7`` draw a 7? Accuracy per guidance scale.

1. Train the model ``make demo`` trains (``builtin:digits``, the tiny preset the 8x8 digits get,
   ``DEMO_STEPS`` = 3000 steps, every other option at its default, so classes on and labels
   dropped with probability 0.1) through the engine's ``training.train``. The run folder is
   cached under ``benchmarks/.cache/`` so reruns skip training.
2. Sample ``--per-class`` images of every digit at each guidance scale w with the CLI's defaults
   (DPM-Solver++, 20 steps, clipped x0). Image i uses the same random stream at every w, so
   the columns differ only by guidance (Ho & Salimans 2022, Algorithm 2).
3. Label every sample with the small CNN of ``_digit_classifier.py``, trained on one half of
   the 1,797 digits (and checked on the other half), and count how often it says the digit
   that was asked for. Mean confidence and the per-pixel spread across samples of a digit
   (diversity: guidance narrows it) are reported too.

    python benchmarks/conditional.py                              # prints the table
    python benchmarks/conditional.py --markdown benchmarks/RESULTS.md
    python benchmarks/conditional.py --train-only                 # just fill the cache
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffuse_cli.engine import checkpoint as ckpt  # noqa: E402
from diffuse_cli.engine import data as data_mod  # noqa: E402
from diffuse_cli.engine import training  # noqa: E402
from diffuse_cli.engine.config import DEFAULT_GUIDANCE, DiffusionConfig, TrainConfig, UNetConfig  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
MARK_START, MARK_END = "<!-- conditional:start -->", "<!-- conditional:end -->"
DEMO_STEPS = 3000  # the Makefile's DEMO_STEPS
SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0)
TARGET = 0.90  # the bar: 90% of the samples labelled as the digit asked for


def trained_run(steps: int = DEMO_STEPS, log=print) -> Path:
    """The run folder of `diffuse train builtin:digits --steps STEPS` (defaults otherwise), cached."""
    out = CACHE / f"digits-classes-{steps}"
    model = out / "model.safetensors"
    if model.exists() and ckpt.load(model, tensors=False).step == steps:
        return out
    ds = data_mod.load_dataset("builtin:digits")
    model_cfg = UNetConfig.preset("auto", ds.image_size, ds.channels, num_classes=len(ds.classes))
    # Previews off: they draw from their own generators and do not change the weights.
    cfg = TrainConfig(steps=steps, hflip=ds.default_hflip, sample_every=0, save_every=max(500, steps // 6))
    t0 = time.perf_counter()

    def progress(e: dict) -> None:
        if e["event"] == "log" and e["step"] % 500 == 0:
            log(f"  train step {e['step']}/{steps}  loss {e['loss']:.4f}  {time.perf_counter() - t0:.0f}s")

    training.train(ds, out, model_cfg, DiffusionConfig(), cfg, device="cpu", overwrite=True, callback=progress)
    log(f"trained {steps} steps in {time.perf_counter() - t0:.0f}s -> {out}")
    return out


if __name__ == "__main__" and sys.argv[1:] == ["--train-only"]:
    torch.set_num_threads(1)
    trained_run()
    raise SystemExit(0)
