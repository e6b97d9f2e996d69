"""The forward process on a real image (engine/forward_process.py), for `diffuse noise`.

Oracles: the closed form q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4),
whose noise a flat grey image shows directly; the panel numbers against the schedule; PSNR recomputed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import forward_process as fp
from diffuse_cli.engine.config import DiffusionConfig
from diffuse_cli.engine.diffusion import Diffusion
from diffuse_cli.engine.errors import ConfigError, DataError

D = Diffusion(DiffusionConfig(timesteps=1000))


@pytest.fixture
def grey(tmp_path):
    """A flat image at 127.5 in spirit: 128 of 255, x_0 = 0.0039 in the model range."""
    p = tmp_path / "grey.png"
    Image.new("L", (64, 64), 128).save(p)
    return p


@pytest.mark.parametrize("T, want", [(1000, [0, 50, 100, 250, 500, 750, 999]), (10, [0, 1, 2, 5, 7, 9]), (1, [0])])
def test_default_timesteps_spread_from_first_to_last(T, want):
    assert fp.default_timesteps(T) == want


def test_panel_numbers_are_the_schedules(photo):
    x0, panels = fp.noise_image(photo, D, [0, 10, 500, 999], 32)
    assert x0.dtype == torch.uint8 and x0.shape == (3, 32, 32)
    for p in panels:
        abar = float(D.alphas_cumprod[p.t])
        assert p.signal == pytest.approx(math.sqrt(abar)) and p.noise == pytest.approx(math.sqrt(1 - abar))
        assert p.signal**2 + p.noise**2 == pytest.approx(1.0)
        assert p.snr == pytest.approx(abar / (1 - abar), rel=1e-6)
        mse = (p.image.float() - x0.float()).pow(2).mean().item()
        assert p.psnr == pytest.approx(10 * math.log10(255**2 / mse))
    assert [p.t for p in panels] == [0, 10, 500, 999]
    assert panels[0].psnr > panels[1].psnr > panels[2].psnr > panels[3].psnr  # noise grows with t


def test_psnr_of_a_flat_image_is_the_noise_levels(grey):
    """Little noise, no clipping: PSNR = 20 log10(range / std) with the range 2 and std the noise scale
    (plus the variance of the 8-bit rounding)."""
    _, panels = fp.noise_image(grey, D, [0, 10, 40], 64)
    for p in panels:
        std = math.sqrt(p.noise**2 + (2 / 255) ** 2 / 12)
        assert p.psnr == pytest.approx(20 * math.log10(2 / std), abs=0.3), p.t


@pytest.mark.parametrize("iterative", [False, True])
@pytest.mark.parametrize("t", [30, 120])
def test_noise_on_a_flat_image_has_the_closed_form_std(grey, t, iterative):
    """x_t - sqrt(abar) x_0 ~ N(0, 1 - abar); 64 x 64 pixels give its std to about 1.1%; the 8-bit rounding
    adds (2/255)^2 / 12 of variance, and at these t clipping at -1 and 1 is beyond 3 standard deviations."""
    x0, (p,) = fp.noise_image(grey, D, [t], 64, seed=3, iterative=iterative)
    x0f, xt = x0.double() / 127.5 - 1, p.image.double() / 127.5 - 1
    abar = float(D.alphas_cumprod[t])
    resid = xt - math.sqrt(abar) * x0f
    want = math.sqrt(1 - abar + (2 / 255) ** 2 / 12)
    assert abs(resid.mean().item()) < 4 * want / 64  # four standard errors
    assert resid.std().item() == pytest.approx(want, rel=0.05)


def test_same_seed_same_panels_and_the_iterative_draw_differs(photo):
    a = fp.noise_image(photo, D, [100, 400], 16, seed=1)[1]
    b = fp.noise_image(photo, D, [100, 400], 16, seed=1)[1]
    c = fp.noise_image(photo, D, [100, 400], 16, seed=2)[1]
    it = fp.noise_image(photo, D, [100, 400], 16, seed=1, iterative=True)[1]
    assert all(torch.equal(p.image, q.image) for p, q in zip(a, b, strict=True))
    assert not any(torch.equal(p.image, q.image) for p, q in zip(a, c, strict=True))
    assert not any(torch.equal(p.image, q.image) for p, q in zip(a, it, strict=True))
    assert [p.signal for p in a] == [p.signal for p in it]  # the same distribution, another draw


def test_bad_input(photo, tmp_path):
    with pytest.raises(ConfigError, match=r"--t values must be in \[0, 999\] .*got 1000"):
        fp.noise_image(photo, D, [0, 1000], 16)
    with pytest.raises(ConfigError, match=r"got -1"):
        fp.noise_image(photo, D, [-1], 16)
    with pytest.raises(DataError, match="no such file"):
        fp.noise_image(tmp_path / "nope.png", D, None, 16)
    with pytest.raises(DataError, match="is a folder"):
        fp.noise_image(tmp_path, D, None, 16)
    with pytest.raises(ConfigError, match="seed"):
        fp.noise_image(photo, D, None, 16, seed=-1)


def test_show_writes_the_strip_frames_and_gif(photo, tmp_path):
    panels = fp.show(photo, DiffusionConfig(timesteps=100), [0, 50, 99], 16, 0, False, tmp_path / "strip.png",
                     frames_dir=tmp_path / "frames", gif=tmp_path / "n.gif")  # fmt: skip
    assert [p.t for p in panels] == [0, 50, 99]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["t0000.png", "t0050.png", "t0099.png"]
    with Image.open(tmp_path / "frames" / "t0050.png") as f:
        assert np.array_equal(np.asarray(f), panels[1].image.permute(1, 2, 0).numpy())
    with Image.open(tmp_path / "n.gif") as g:
        assert g.n_frames == 4  # x_0, then one per t
    with Image.open(tmp_path / "strip.png") as s:
        assert s.width == 4 * (96 + 6) + 6  # four panels of at least 96 px
