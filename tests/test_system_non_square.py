"""Non-square pictures end to end: a 24x40 folder trains, samples (guided), exports and imports at 24x40.

Oracles: shapes and sizes of everything written (PNGs, grids, checkpoints, diffusers configs), and diffusers'
own UNet2DModel computing the exported model's function at 24x40.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import data as D
from diffuse_cli.engine import models
from diffuse_cli.engine.data import folders
from diffuse_cli.engine.errors import ConfigError
from helpers import TINY_TRAIN
from helpers import invoke as run


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two classes of 40-wide, 24-high pictures (a bar that is horizontal in one class, vertical in the other)."""
    root = tmp_path_factory.mktemp("wide") / "pics"
    rng = np.random.default_rng(0)
    for cls in ("flat", "tall"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            a = rng.integers(0, 60, (24, 40, 3), dtype=np.uint8)
            if cls == "flat":
                a[10:14, :, :] = 250
            else:
                a[:, 18:22, :] = 250
            Image.fromarray(a, "RGB").save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def wide_run(wide, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    r = run("train", wide, "--out", out, *TINY_TRAIN, "--micro-batch", "3")
    assert r.exit_code == 0, r.output
    assert "3x24x40" in r.output and "own size" in r.output
    return out


def test_folder_size_and_aspect_are_kept(wide_run):
    ck = ckpt.load(wide_run / "model.safetensors")
    assert ck.model["image_size"] == [24, 40] and ck.dataset["image_size"] == [24, 40]
    assert ck.train["micro_batch"] == 3


def test_resume_keeps_the_shape(wide_run, wide, tmp_path):
    import shutil

    run_dir = tmp_path / "r"
    shutil.copytree(wide_run, run_dir)
    r = run("train", wide, "--out", run_dir, *TINY_TRAIN[:2], "--steps", "6", "--batch-size", "4", "--resume",
            "--sample-every", "0", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    ck = ckpt.load(run_dir / "model.safetensors")
    assert ck.step == 6 and ck.model["image_size"] == [24, 40] and ck.train["micro_batch"] is None  # not kept


def test_samples_and_grids_are_24x40(wide_run, tmp_path):
    r = run("sample", wide_run, "--num", "2", "--class", "tall", "--steps", "3", "--out", tmp_path / "s",
            "--grid", tmp_path / "g.png", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    pngs = sorted((tmp_path / "s").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(p).size == (40, 24) for p in pngs)  # PIL: (width, height)
    g = Image.open(tmp_path / "g.png")
    assert g.width > g.height


def test_export_and_import_keep_the_shape(wide_run, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    r = run("export", wide_run, tmp_path / "pipe")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())
    assert cfg["sample_size"] == [24, 40] and cfg["num_class_embeds"] == 3 and cfg["_diffuse_null_class"] == 2
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    ours, _, _ = models.load_for_sampling(wide_run)
    back, _, _ = models.load_for_sampling(tmp_path / "pipe")
    # a small folder trains with non-leaking augmentation by default; export drops its layer (zero at sampling)
    assert back.config == dataclasses.replace(ours.config, augment_dim=0)
    x, t, y = torch.randn(2, 3, 24, 40), torch.tensor([3, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, class_labels=y).sample, ours(x, t, y), rtol=1e-4, atol=2e-5)
    r = run("sample", tmp_path / "pipe", "--num", "1", "--steps", "2", "--out", tmp_path / "s2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert Image.open(next((tmp_path / "s2").glob("*.png"))).size == (40, 24)


def test_image_size_option_takes_h_x_w(wide, tmp_path):
    ds = D.load_dataset(wide, "16x32")
    assert ds.images.shape[-2:] == (16, 32) and ds.summary.size_note == ""
    ds = D.load_dataset(wide, "32x16")  # a tall box out of wide pictures: the centre, cropped
    assert ds.images.shape[-2:] == (32, 16)
    with pytest.raises(ConfigError, match="HxW"):
        D.load_dataset(wide, "24x")
    r = run("train", wide, "--out", tmp_path / "r", "--image-size", "24x42", *TINY_TRAIN)
    assert r.exit_code == 2 and "divisible by 4" in r.output  # a bad option value: usage error


def test_crop_box_keeps_the_centre():
    assert folders._crop_box((40, 24), (24, 40)) == (0, 0, 40, 24)  # already the shape: everything
    assert folders._crop_box((40, 24), (24, 24)) == (8, 0, 32, 24)  # square: the centred square, as before
    left, top, right, bottom = folders._crop_box((100, 100), (24, 48))
    assert (left, right) == (0, 100) and (top, bottom) == (25, 75)  # 2:1 out of a square
