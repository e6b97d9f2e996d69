"""Train the tiny checkpoint that tests/test_samplers_trained.py samples: tests/data/digits16-tiny-eps.safetensors.

A real (briefly) trained network, so the tests see the errors that an exact analytic model
never makes (issue #16). It is `diffuse train builtin:digits --image-size 16` with a very
small U-Net, single-threaded, for a fixed number of steps:

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/make_sampler_test_model.py

On one CPU thread it takes about a minute; the file is about 0.4 MB. Retraining changes the
weights (and so the measured numbers the tests print), not what the tests check.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from diffuse_cli.engine.config import (
    DiffusionConfig,
    TrainConfig,
    UNetConfig,
)
from diffuse_cli.engine.data import load_builtin
from diffuse_cli.engine.training import train

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "tests" / "data" / "digits16-tiny-eps.safetensors"
MODEL = UNetConfig(image_size=16, in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), dropout=0.0)  # fmt: skip
TRAIN = TrainConfig(steps=400, batch_size=32, warmup=0, seed=0, sample_every=0, save_every=400, log_every=100)


def main() -> None:
    torch.set_num_threads(1)
    data = load_builtin("digits", image_size=16)
    with tempfile.TemporaryDirectory() as tmp:
        out = train(data, Path(tmp) / "run", MODEL, DiffusionConfig(), TRAIN, device="cpu",
                    callback=lambda e: print(f"step {e['step']} loss {e['loss']:.4f}") if e["event"] == "log" else None)  # fmt: skip
        OUT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out["model"], OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
