"""`diffuse sample` end to end on the session's tiny runs (conftest: `shared_run`, 1x8x8 unconditional, T = 50;
`class_run`, 3x8x8 with classes red and blue): every sampler, seeds, GIFs, classes, and its bad input."""

import pytest
from PIL import Image

from helpers import invoke as run
from helpers import one_line_error


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_sample_each_sampler(tmp_path, shared_run, sampler):
    out, grid = tmp_path / "imgs", tmp_path / "grid.png"
    r = run(
        "sample",
        shared_run,
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
        assert im.size == (8, 8) and im.mode == "L"  # builtin:digits: one channel
    assert Image.open(grid).size[0] >= 256


def test_sample_same_seed_same_pngs(tmp_path, shared_run):
    for name in ("a", "b", "c"):
        seed = "1" if name != "c" else "2"
        r = run(
            "sample",
            shared_run / "model.safetensors",
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


def test_sample_gif(tmp_path, shared_run):
    gif = tmp_path / "t.gif"
    r = run("sample", shared_run, "--num", "2", "--out", tmp_path / "o", "--sampler", "ddpm", "--gif", gif)
    assert r.exit_code == 0, r.output
    g = Image.open(gif)
    assert 10 <= g.n_frames <= 41


def test_sample_bad_input(tmp_path, shared_run):
    import torch
    from safetensors.torch import save_file

    pt = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pt)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes((shared_run / "model.safetensors").read_bytes()[:1000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    cases = [  # (arguments, message, exit code: 2 for a bad option value, 1 when the work cannot be done)
        (["sample", tmp_path / "nope.safetensors"], "no such checkpoint", 1),
        (["sample", trunc], "corrupt or truncated", 1),
        (["sample", pt], "unpickling", 1),
        (["sample", foreign], "not a diffuse checkpoint", 1),
        (["sample", shared_run, "--steps", "0"], "--steps must be between 1 and T = 50", 2),
        (["sample", shared_run, "--steps", "51"], "--steps must be between 1 and T = 50", 2),
        (["sample", shared_run, "--sampler", "ddim", "--eta", "1.5"], "--eta must be between 0 and 1", 2),
        (["sample", shared_run, "--eta", "0.5"], "--eta applies to --sampler ddim, not dpmpp", 2),
        (["sample", shared_run, "--num", "0"], "--num must be at least 1", 2),
        (["sample", shared_run, "--seed", "-1"], "--seed must be a whole number", 2),
        (["sample", shared_run, "--out", blocker / "x"], "blocker", 1),
    ]
    for args, msg, code in cases:
        out = one_line_error(run(*args), code)
        assert msg in out, (args, out)


def test_sample_refuses_to_mix_with_earlier_images(tmp_path, shared_run):
    out = tmp_path / "imgs"
    assert run("sample", shared_run, "--num", "3", "--out", out, "--steps", "2").exit_code == 0
    err = one_line_error(run("sample", shared_run, "--num", "2", "--out", out, "--steps", "2"), 1)
    assert "already holds 3 generated images" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png"]  # untouched
    (out / "notes.txt").write_text("mine")
    assert run("sample", shared_run, "--num", "2", "--out", out, "--steps", "2", "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "notes.txt"]  # no stale 0002.png


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
    for p in imgs.iterdir():
        with Image.open(p) as im:
            assert im.size == (8, 8) and im.mode == "RGB"  # a three-channel model writes RGB
    g = Image.open(grid)
    assert g.size[0] * 22 == g.size[1] * 32  # 3 columns, 2 rows of 8 px + 2 px padding: one row per class
    r = run(
        "sample", out, "--class", "blue", "--num", "2", "--guidance", "1", "--out", tmp_path / "one", "--steps", "5"
    )
    assert r.exit_code == 0, r.output


def test_sample_class_bad_input(class_run, shared_run):
    _, out = class_run
    cases = [
        (["sample", shared_run, "--class", "red"], "trained without classes"),
        (["sample", out, "--class", "green"], "unknown class 'green'; this model knows blue, red"),
        (["sample", out, "--class", "2"], "unknown class '2'"),
        (["sample", out, "--guidance", "2"], "give --class too"),
        (["sample", out, "--class", "red", "--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["sample", out, "--class", "red", "--guidance", "nan"], "--guidance must be a finite number >= 0"),
    ]
    for args, msg in cases:  # all bad option values: exit 2
        text = one_line_error(run(*args), 2)
        assert msg in text, (args, text)
