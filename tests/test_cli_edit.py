"""`diffuse inpaint`, `diffuse sample --init/--strength` and `diffuse interpolate` end to end, and their bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import edit_files
from diffuse_cli.engine.data import decode_image
from helpers import TINY_TRAIN, one_line_error
from helpers import invoke as run

TINY = [*TINY_TRAIN, "-T", "50"]
FAST = ["--steps", "6", "--jump", "2", "--resample", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(4):
        Image.new("RGB", (12, 12), (60 * i, 200 - 40 * i, 90)).save(d / f"{i}.png")
    out = tmp_path_factory.mktemp("run") / "r"
    r = run("train", d, "--out", out, "--image-size", "8", *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def picture(tmp_path):
    """A 24x16 (non-square) picture, and a mask of the same size: its right half white (fill in)."""
    rng = np.random.default_rng(0)
    p = tmp_path / "pic.png"
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8), "RGB").save(p)
    m = np.zeros((16, 24), np.uint8)
    m[:, 12:] = 255
    mp = tmp_path / "mask.png"
    Image.fromarray(m, "L").save(mp)
    return p, mp


def test_inpaint_keeps_the_known_pixels_exactly(run_dir, picture, tmp_path):
    pic, mask = picture
    r = run("inpaint", run_dir, pic, "--mask", mask, "--out", tmp_path / "o", "--num", "3", "--batch-size", "2", *FAST)
    assert r.exit_code == 0, r.output
    assert "model calls per image" in r.output
    expected = decode_image(pic, 8, 3)  # the picture as the model sees it: centre crop 16x16, resized to 8x8
    keep = edit_files.load_mask(mask, pic, 8)[0, 0]  # (8, 8)
    assert 0 < keep.float().mean() < 1
    outs = [torch.from_numpy(np.array(Image.open(tmp_path / "o" / f"{i:04d}.png"))).permute(2, 0, 1) for i in range(3)]
    for o in outs:
        assert torch.equal(o[:, keep], expected[:, keep])
    assert not torch.equal(outs[0], outs[1])  # variants differ in the hole
    grid = Image.open(tmp_path / "o" / "grid.png")
    assert grid.width > grid.height  # one row: input | hole | mask | 3 results


def test_inpaint_batch_size_and_invert(run_dir, picture, tmp_path):
    pic, mask = picture
    a = run("inpaint", run_dir, pic, "--mask", mask, "--out", tmp_path / "a", "--num", "2", "--batch-size", "1", *FAST)
    b = run("inpaint", run_dir, pic, "--mask", mask, "--out", tmp_path / "b", "--num", "2", "--batch-size", "2", *FAST)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for i in range(2):
        ia = np.array(Image.open(tmp_path / "a" / f"{i:04d}.png")).astype(int)
        ib = np.array(Image.open(tmp_path / "b" / f"{i:04d}.png")).astype(int)
        assert np.abs(ia - ib).max() <= 1  # batch size never changes an image (float rounding at most)
    keep = edit_files.load_mask(mask, pic, 8)
    assert torch.equal(edit_files.load_mask(mask, pic, 8, invert=True), ~keep)


def test_mask_of_another_size_is_stretched_to_the_image(picture, tmp_path):
    pic, mask = picture
    small = tmp_path / "small.png"
    Image.open(mask).resize((6, 4), Image.NEAREST).save(small)  # same picture, a quarter of the size
    assert torch.equal(edit_files.load_mask(small, pic, 8), edit_files.load_mask(mask, pic, 8))


def test_inpaint_bad_input(run_dir, picture, tmp_path):
    pic, mask = picture
    black = tmp_path / "black.png"
    Image.new("L", (24, 16), 0).save(black)
    out = one_line_error(run("inpaint", run_dir, pic, "--mask", black, *FAST), 2)
    assert "marks no pixel to fill in" in out and "--invert-mask" in out
    out = one_line_error(run("inpaint", run_dir, pic, "--mask", tmp_path / "nope.png", *FAST))
    assert "no such file" in out
    out = one_line_error(run("inpaint", run_dir, pic, "--mask", mask, "--steps", "6", "--jump", "0"), 2)
    assert "--jump must be a whole number of at least 1" in out
    out = one_line_error(run("inpaint", run_dir, tmp_path / "none.png", "--mask", mask, *FAST))
    assert "no such file" in out
    out = one_line_error(run("inpaint", run_dir, pic, "--mask", mask, "--class", "3", *FAST), 2)
    assert "trained without classes" in out


def test_sample_init_strength(run_dir, picture, tmp_path):
    pic, _ = picture
    common = ["--num", "2", "--device", "cpu", "--sampler", "ddim", "--steps", "10"]
    r = run("sample", run_dir, "--init", pic, "--strength", "0", "--out", tmp_path / "s0", *common)
    assert r.exit_code == 0, r.output
    assert "strength 0" in r.output
    expected = decode_image(pic, 8, 3).permute(1, 2, 0).numpy()
    for i in range(2):  # S = 0 returns the picture itself
        assert np.array_equal(np.array(Image.open(tmp_path / "s0" / f"{i:04d}.png")), expected)
    r1 = run("sample", run_dir, "--init", pic, "--strength", "1", "--out", tmp_path / "s1", *common)
    plain = run("sample", run_dir, "--out", tmp_path / "plain", *common)
    assert r1.exit_code == 0 and plain.exit_code == 0
    for i in range(2):  # S = 1 ignores it: exactly what sampling from noise gives
        one = np.array(Image.open(tmp_path / "s1" / f"{i:04d}.png"))
        assert np.array_equal(one, np.array(Image.open(tmp_path / "plain" / f"{i:04d}.png")))
    out = one_line_error(run("sample", run_dir, "--strength", "0.5", *common), 2)
    assert "give --init" in out
    out = one_line_error(run("sample", run_dir, "--init", pic, "--strength", "1.5", *common), 2)
    assert "--strength must be between 0 and 1" in out


@pytest.mark.parametrize("method, suffix", [("ddim", "png"), ("noise", "gif")])
def test_interpolate(run_dir, picture, tmp_path, method, suffix):
    pic, _ = picture
    other = tmp_path / "other.png"
    Image.new("RGB", (10, 10), (250, 10, 10)).save(other)
    out = tmp_path / f"i.{suffix}"
    r = run("interpolate", run_dir, pic, other, "--frames", "4", "--out", out, "--method", method, "--steps", "5",
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    im = Image.open(out)
    if suffix == "gif":
        assert im.n_frames == 4
    else:
        assert im.width > 5 * im.height  # a strip of A, 4 frames, B
    out = one_line_error(run("interpolate", run_dir, pic, other, "--frames", "1", "--out", tmp_path / "x.png"), 2)
    assert "--frames must be between 2 and" in out
    out = one_line_error(run("interpolate", run_dir, pic, other, "--out", tmp_path / "x.jpg"), 2)
    assert ".png" in out and ".gif" in out
