"""`diffuse noise` as a user runs it: strips, frames, GIFs, image modes, bad input."""

import pytest
import torch
from PIL import Image

from helpers import invoke as run


def test_noise_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am text")
    r = run("noise", p, "--out", tmp_path / "o.png")
    assert r.exit_code == 1
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_noise_unwritable_output(tmp_path, photo):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("noise", photo, "--out", blocker / "strip.png")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "strip.png" in r.output or "file" in r.output


def test_noise_strip_frames_gif(tmp_path, photo):
    out, frames, gif = tmp_path / "strip.png", tmp_path / "frames", tmp_path / "n.gif"
    r = run(
        "noise",
        photo,
        "--t",
        "0,500,999",
        "--size",
        "32",
        "--out",
        out,
        "--frames",
        frames,
        "--gif",
        gif,
        "--seed",
        "3",
    )
    assert r.exit_code == 0, r.output
    assert Image.open(out).size[0] > 3 * 32
    names = sorted(p.name for p in frames.iterdir())
    assert names == ["t0000.png", "t0500.png", "t0999.png"]
    g = Image.open(gif)
    assert g.n_frames == 4
    # frames are x_t = sqrt(abar) x0 + sqrt(1-abar) eps, clipped and mapped linearly to 0..255
    from diffuse_cli.engine.data import decode_image
    from diffuse_cli.engine.diffusion import Diffusion

    d = Diffusion()
    x0 = decode_image(photo, 32).double() / 127.5 - 1
    f0 = torch.tensor(list(Image.open(frames / "t0000.png").getdata()), dtype=torch.float64).T.reshape(3, 32, 32)
    assert (f0 / 127.5 - 1 - x0).abs().mean() < 0.02  # t = 0: almost clean
    f999 = torch.tensor(list(Image.open(frames / "t0999.png").getdata()), dtype=torch.float64).T.reshape(3, 32, 32)
    z = f999 / 127.5 - 1  # ~ N(0, 1) clipped to [-1, 1]: about 68% inside (-1, 1)
    inside = ((z > -0.99) & (z < 0.99)).double().mean().item()
    assert 0.6 < inside < 0.76
    assert d.sqrt_alphas_cumprod[999] < 0.01
    assert "PSNR" in r.stdout


def test_noise_same_seed_same_frames(tmp_path, photo):
    for name in ("a", "b"):
        run(
            "noise", photo, "--t", "100", "--size", "16", "--out", tmp_path / f"{name}.png", "--frames", tmp_path / name
        )
    assert (tmp_path / "a" / "t0100.png").read_bytes() == (tmp_path / "b" / "t0100.png").read_bytes()


def test_noise_iterative(tmp_path, photo):
    r = run("noise", photo, "--t", "10,200", "--size", "16", "--iterative", "--out", tmp_path / "i.png")
    assert r.exit_code == 0, r.output
    assert "iterative" in r.stdout


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_noise_image_modes(tmp_path, mode):
    im = Image.new("RGB", (40, 30), (200, 100, 50))
    if mode == "I;16":
        im = Image.new("I;16", (40, 30), 40000)
    else:
        im = im.convert(mode)
    p = tmp_path / f"m.{'tif' if mode == 'I;16' else 'png'}"
    im.save(p)
    r = run("noise", p, "--size", "16", "--t", "0", "--out", tmp_path / "o.png", "--frames", tmp_path / "f")
    assert r.exit_code == 0, r.output
