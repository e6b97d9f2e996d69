"""`diffuse train` end to end on a small folder (its own run: what it prints and writes is the subject), resume,
classes, and its bad input. The session's shared runs are in conftest.py."""

import json

import pytest
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import models
from helpers import TINY_TRAIN, one_line_error
from helpers import invoke as run

TINY = [*TINY_TRAIN, "-T", "50"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(6):
        im = Image.new("RGB", (20 + i, 18), (40 * i, 255 - 30 * i, 100))
        im.save(d / f"img{i}.{'png' if i % 2 else 'JPG'}")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("run") / "r"
    r = run("train", folder, "--out", out, "--image-size", "8", *TINY)
    assert r.exit_code == 0, r.output
    assert "6 images used" in r.output
    assert "skipped 1 corrupt or truncated file" in r.output
    return out


def test_train_writes_checkpoint_with_config(run_dir):
    ck = ckpt.load(run_dir / "model.safetensors")
    assert ck.model["image_size"] == 8 and ck.model["in_channels"] == 3
    assert ck.diffusion["timesteps"] == 50 and ck.step == 4
    assert ck.dataset["used"] == 6
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 4


def test_resume_continues(tmp_path, folder):
    out = tmp_path / "r"
    assert run("train", folder, "--out", out, "--image-size", "8", *TINY).exit_code == 0
    r = run("train", folder, "--out", out, "--resume", "--steps", "6", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "resuming at step 4" in r.output
    assert ckpt.load(out / "model.safetensors").step == 6


def test_train_bad_input(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"nope")
    (junk / "b.jpg").write_bytes(b"")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    occupied = tmp_path / "occ"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    cases = [  # (arguments, message, exit code: 2 for a bad option value, 1 when the work cannot be done)
        (["train", tmp_path / "missing", "--out", tmp_path / "o1"], "no such", 1),
        (["train", empty, "--out", tmp_path / "o2"], "no images found", 1),
        (["train", junk, "--out", tmp_path / "o3"], "could be decoded", 1),
        (["train", folder, "--out", tmp_path / "o4", "--image-size", "10", "--preset", "small"], "divisible", 2),
        (["train", folder, "--out", blocker / "sub", *TINY], "blocker", 1),
        (["train", folder, "--out", occupied, *TINY], "not empty", 1),
        (["train", folder, "--out", tmp_path / "o5", "--steps", "0"], "--steps must be at least 1", 2),
        (["train", folder, "--out", tmp_path / "o6", "--lr", "-1"], "--lr must be a positive", 2),
        (["train", folder, "--out", tmp_path / "o7", "--device", "tpu"], "unknown device", 2),
        (["train", "builtin:nothing", "--out", tmp_path / "o8"], "digits", 1),
        (
            ["train", folder, "--out", tmp_path / "o9", "--channels", "2"],
            "--channels must be 1 (grayscale) or 3 (RGB)",
            2,
        ),
        (["train", folder, "--out", tmp_path / "o5", "--resume", "--overwrite"], "pass only one of them", 2),
    ]
    for args, msg, code in cases:
        out = one_line_error(run(*args), code)
        assert msg in out, (args, out)
    import torch

    if not torch.cuda.is_available():
        assert "CUDA is not available" in one_line_error(
            run("train", folder, "--out", tmp_path / "o10", "--device", "cuda"), 2
        )
    # nothing was created for refused runs
    assert not (tmp_path / "o5").exists() and not (tmp_path / "o6").exists()


def test_class_names_round_trip_through_checkpoint_config_and_resume(class_run, tmp_path):
    data, out = class_run
    ck = ckpt.load(out / "model.safetensors")
    assert ck.model["num_classes"] == 2 and ck.dataset["classes"] == ["blue", "red"]
    assert models.class_names(ck) == ["blue", "red"]
    assert models.class_names(models.load_for_sampling(out)[2]) == ["blue", "red"]
    assert json.loads((out / "config.json").read_text())["dataset"]["classes"] == ["blue", "red"]
    resumed = tmp_path / "r"
    import shutil

    shutil.copytree(out, resumed)
    r = run("train", data, "--out", resumed, "--resume", "--steps", "6", "--device", "cpu")
    assert r.exit_code == 0, r.output
    ck = ckpt.load(resumed / "model.safetensors")
    assert ck.step == 6 and ck.dataset["classes"] == ["blue", "red"] and ck.model["num_classes"] == 2


def test_classes_none_trains_unconditionally(class_run, tmp_path):
    data, _ = class_run
    r = run("train", data, "--out", tmp_path / "u", "--image-size", "8", "--classes", "none", *TINY)
    assert r.exit_code == 0, r.output
    ck = ckpt.load(tmp_path / "u" / "model.safetensors")
    assert ck.model["num_classes"] == 0 and "classes" not in ck.dataset and "classes," not in r.output


def test_train_with_augment_then_sample(tmp_path, folder):
    """--augment trains the conditioning (stored in the checkpoint); sampling needs nothing more; a bad p is one line."""
    out = tmp_path / "r"
    r = run("train", folder, "--out", out, "--image-size", "8", *TINY, "--augment", "0.5")
    assert r.exit_code == 0, r.output
    ck = ckpt.load(out / "model.safetensors")
    assert ck.model["augment_dim"] == 9 and ck.train["augment"] == 0.5 and "aug_emb.weight" in ck.tensors
    r = run("sample", out, "--num", "2", "--out", tmp_path / "imgs", "--steps", "3")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 2
    msg = one_line_error(run("train", folder, "--out", tmp_path / "bad", *TINY, "--augment", "1.5"), code=2)
    assert "--augment must be a probability in [0, 1]" in msg
