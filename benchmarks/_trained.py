"""Small diffusion models trained by the engine itself, cached, for benchmarks on real networks.

A trained network makes the errors an exact analytic model never makes (an eps error at the
pure-noise end is amplified 1 / sqrt(alpha_bar) ~ 156x in x0 on the linear schedule), so
sampler defaults are also judged on these. Every model is trained through
``diffuse_cli.engine.training.train`` (what ``diffuse train`` runs) for a fixed number of steps,
single-threaded, and cached under :func:`cache_dir`, so only the first run pays for training.

    from benchmarks._trained import SPECS, trained_model
    model, diffusion, ck = trained_model(SPECS["digits16-eps"])
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffuse_cli.engine import models
from diffuse_cli.engine.config import (
    DiffusionConfig,
    TrainConfig,
    UNetConfig,
)
from diffuse_cli.engine.data import load_builtin
from diffuse_cli.engine.training import train


def cache_dir() -> Path:
    """``$DIFFUSE_BENCH_CACHE`` or ``~/.cache/diffuse-bench``: trained models and classifiers live here."""
    root = os.environ.get("DIFFUSE_BENCH_CACHE") or Path.home() / ".cache" / "diffuse-bench"
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: the built-in digits at ``image_size``, trained for ``steps`` steps."""

    name: str
    image_size: int = 16
    steps: int = 900
    prediction: str = "eps"
    schedule: str = "linear"
    # issue #16's model: `diffuse train` with --base-channels 32 --channel-mults 1,2,2 --num-res-blocks 2
    # --attention-res 8 --batch-size 32 --warmup 0 (the "tiny" preset's dropout 0)
    unet: dict = field(
        default_factory=lambda: dict(
            base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,), dropout=0.0
        )
    )
    batch_size: int = 32
    warmup: int = 0
    seed: int = 0
    half: str = "all"  # "train": only the even-indexed digits (the odd ones stay held out, as in _digits_quality)
    variance: str = "fixed"  # "learned": Improved DDPM's learned variance and L_hybrid (issue #22)

    def key(self) -> str:
        fields = asdict(self)
        for name, default in (("half", "all"), ("variance", "fixed")):
            if fields[name] == default:
                del fields[name]  # keeps the cache keys of the models trained before this field existed
        blob = json.dumps(fields, sort_keys=True, default=list).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:10]}"


SPECS = {
    s.name: s
    for s in (
        ModelSpec("digits16-eps"),  # the model of issue #16
        ModelSpec("digits16-v", prediction="v"),
        ModelSpec("digits16-x0", prediction="x0"),
        # issue #21 (inpainting): trained on the even half only, so the odd half are real held-out images
        ModelSpec("digits16-eps-half", steps=2000, half="train"),
        ModelSpec("digits16-eps-learned", variance="learned"),  # issue #22: digits16-eps with a learned variance
        ModelSpec("digits8-eps", image_size=8, steps=4000),
        ModelSpec("digits8-eps-learned", image_size=8, steps=4000, variance="learned"),
    )
}


def trained_model(spec: ModelSpec, log=print):
    """(model, diffusion, checkpoint) for ``spec``, training it first unless it is cached."""
    path = cache_dir() / f"{spec.key()}.safetensors"
    if not path.exists():
        data = load_builtin("digits", image_size=spec.image_size)
        if spec.half == "train":
            data = replace(data, images=data.images[::2].contiguous(), labels=data.labels[::2].contiguous())
        mcfg = UNetConfig(image_size=spec.image_size, in_channels=1, **spec.unet)
        dcfg = DiffusionConfig(schedule=spec.schedule, prediction=spec.prediction, variance=spec.variance)
        tcfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, warmup=spec.warmup, seed=spec.seed,
                           sample_every=0, save_every=spec.steps, log_every=100)  # fmt: skip
        log(f"training {spec.name} ({spec.steps} steps, cached as {path})")
        with tempfile.TemporaryDirectory() as tmp:

            def progress(e):
                if e.get("event") == "log":
                    log(f"  step {e['step']} loss {e['loss']:.4f} ({e['elapsed']:.0f} s)")

            out = train(data, Path(tmp) / "run", mcfg, dcfg, tcfg, device="cpu", callback=progress)
            shutil.copyfile(out["model"], path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
    model, diffusion, ck = models.load_for_sampling(path, "cpu")
    return model, diffusion, ck


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or list(SPECS):
        trained_model(SPECS[name])
