"""`diffuse train` and `diffuse sample` end to end, and their bad input."""

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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_sample_each_sampler(tmp_path, run_dir, sampler):
    out, grid = tmp_path / "imgs", tmp_path / "grid.png"
    r = run(
        "sample",
        run_dir,
        "--num",
        "5",
        "--sampler",
        sampler,
        "--out",
        out,
        "--grid",
        grid,
        "--batch-size",
        "2",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:04d}.png" for i in range(5)]
    for p in out.iterdir():
        im = Image.open(p)
        im.load()
        assert im.size == (8, 8) and im.mode == "RGB"
    assert Image.open(grid).size[0] >= 256


def test_sample_same_seed_same_pngs(tmp_path, run_dir):
    for name in ("a", "b", "c"):
        seed = "1" if name != "c" else "2"
        r = run(
            "sample",
            run_dir / "model.safetensors",
            "--num",
            "3",
            "--out",
            tmp_path / name,
            "--seed",
            seed,
            "--sampler",
            "ddim",
            "--eta",
            "1",
            "--steps",
            "10",
        )
        assert r.exit_code == 0, r.output
    a = [(tmp_path / "a" / f"{i:04d}.png").read_bytes() for i in range(3)]
    b = [(tmp_path / "b" / f"{i:04d}.png").read_bytes() for i in range(3)]
    c = [(tmp_path / "c" / f"{i:04d}.png").read_bytes() for i in range(3)]
    assert a == b and a != c


def test_sample_gif(tmp_path, run_dir):
    gif = tmp_path / "t.gif"
    r = run("sample", run_dir, "--num", "2", "--out", tmp_path / "o", "--sampler", "ddpm", "--gif", gif)
    assert r.exit_code == 0, r.output
    g = Image.open(gif)
    assert 10 <= g.n_frames <= 41


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


def test_sample_bad_input(tmp_path, run_dir):
    import torch
    from safetensors.torch import save_file

    pt = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pt)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes((run_dir / "model.safetensors").read_bytes()[:1000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cases = [  # (arguments, message, exit code: 2 for a bad option value, 1 when the work cannot be done)
        (["sample", tmp_path / "nope.safetensors"], "no such checkpoint", 1),
        (["sample", trunc], "corrupt or truncated", 1),
        (["sample", pt], "unpickling", 1),
        (["sample", foreign], "not a diffuse checkpoint", 1),
        (["sample", run_dir, "--steps", "0"], "--steps must be between 1 and T = 50", 2),
        (["sample", run_dir, "--steps", "51"], "--steps must be between 1 and T = 50", 2),
        (["sample", run_dir, "--sampler", "ddim", "--eta", "1.5"], "--eta must be between 0 and 1", 2),
        (["sample", run_dir, "--eta", "0.5"], "--eta applies to --sampler ddim, not dpmpp", 2),
        (["sample", run_dir, "--num", "0"], "--num must be at least 1", 2),
        (["sample", run_dir, "--seed", "-1"], "--seed must be a whole number", 2),
        (["sample", run_dir, "--out", blocker / "x"], "blocker", 1),
    ]
    for args, msg, code in cases:
        out = one_line_error(run(*args), code)
        assert msg in out, (args, out)


def test_sample_refuses_to_mix_with_earlier_images(tmp_path, run_dir):
    out = tmp_path / "imgs"
    assert run("sample", run_dir, "--num", "3", "--out", out, "--steps", "2").exit_code == 0
    err = one_line_error(run("sample", run_dir, "--num", "2", "--out", out, "--steps", "2"), 1)
    assert "already holds 3 generated images" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png"]  # untouched
    (out / "notes.txt").write_text("mine")
    assert run("sample", run_dir, "--num", "2", "--out", out, "--steps", "2", "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "notes.txt"]  # no stale 0002.png


# --- classes and guidance -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("classes")
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(3):
            (d / name / ("nested" if i == 2 else "")).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), tuple(min(255, c + 10 * i) for c in colour)).save(
                d / name / ("nested" if i == 2 else "") / f"{i}.png"
            )
    out = tmp_path_factory.mktemp("crun") / "r"
    r = run("train", d, "--out", out, "--image-size", "8", *TINY)
    assert r.exit_code == 0, r.output
    assert "2 classes, images per class: blue 3, red 3" in r.output
    assert "fewer than 10 images" in r.output and "blue (3), red (3)" in r.output
    return d, out


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


def test_sample_classes_one_row_each(class_run, tmp_path):
    _, out = class_run
    imgs, grid = tmp_path / "imgs", tmp_path / "grid.png"
    r = run(
        "sample",
        out,
        "--class",
        "red",
        "--class",
        "0",
        "--num",
        "3",
        "--out",
        imgs,
        "--grid",
        grid,
        "--steps",
        "5",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "red, blue: 3 image(s) each, guidance w = " in r.output
    assert sorted(p.name for p in imgs.iterdir()) == [
        f"{i:04d}-{c}.png" for i, c in enumerate(["red"] * 3 + ["blue"] * 3)
    ]
    g = Image.open(grid)
    assert g.size[0] * 22 == g.size[1] * 32  # 3 columns, 2 rows of 8 px + 2 px padding: one row per class
    r = run(
        "sample", out, "--class", "blue", "--num", "2", "--guidance", "1", "--out", tmp_path / "one", "--steps", "5"
    )
    assert r.exit_code == 0, r.output


def test_sample_class_bad_input(class_run, run_dir):
    _, out = class_run
    cases = [
        (["sample", run_dir, "--class", "red"], "trained without classes"),
        (["sample", out, "--class", "green"], "unknown class 'green'; this model knows blue, red"),
        (["sample", out, "--class", "2"], "unknown class '2'"),
        (["sample", out, "--guidance", "2"], "give --class too"),
        (["sample", out, "--class", "red", "--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["sample", out, "--class", "red", "--guidance", "nan"], "--guidance must be a finite number >= 0"),
    ]
    for args, msg in cases:  # all bad option values: exit 2
        text = one_line_error(run(*args), 2)
        assert msg in text, (args, text)


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
