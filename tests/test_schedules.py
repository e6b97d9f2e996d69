"""Schedules against their defining formulas."""

import math

import pytest
import torch

from diffuse_cli.engine import schedules
from diffuse_cli.engine.config import DiffusionConfig
from diffuse_cli.engine.diffusion import Diffusion
from diffuse_cli.engine.errors import ConfigError

T = 1000
BS, BE = 1e-4, 0.02


@pytest.mark.parametrize("kind", ["linear", "quadratic", "sigmoid"])
def test_endpoints_and_monotone(kind):
    b = schedules.make_betas(kind, T, BS, BE)
    assert b.dtype == torch.float64 and b.shape == (T,)
    # sigmoid (diffusers' definition) stops sigmoid(-6) of the range short of each end
    slack = (BE - BS) / (1 + math.exp(6)) if kind == "sigmoid" else 0.0
    assert b[0].item() == pytest.approx(BS + slack, rel=1e-12)
    assert b[-1].item() == pytest.approx(BE - slack, rel=1e-12)
    assert torch.all(b[1:] > b[:-1])  # the seed: beta_1 < beta_2 < ... < beta_T < 1


def test_linear_formula():
    b = schedules.linear(T, BS, BE)
    t = torch.arange(T, dtype=torch.float64)
    torch.testing.assert_close(b, BS + (BE - BS) * t / (T - 1), rtol=1e-12, atol=0)


def test_quadratic_is_linear_in_sqrt_beta():
    s = schedules.quadratic(T, BS, BE).sqrt()
    d = s[1:] - s[:-1]
    torch.testing.assert_close(d, torch.full_like(d, (math.sqrt(BE) - math.sqrt(BS)) / (T - 1)), rtol=1e-9, atol=1e-15)


def test_sigmoid_shape():
    b = schedules.sigmoid(T, BS, BE)
    x = torch.linspace(-6, 6, T, dtype=torch.float64)
    expect = BS + (BE - BS) * torch.sigmoid(x)  # diffusers' beta_schedule="sigmoid"
    torch.testing.assert_close(b, expect, rtol=1e-12, atol=0)
    mid = b[T // 2].item()
    assert abs(mid - (BS + BE) / 2) < 0.01 * BE  # symmetric around the middle


def test_cosine_closed_form():
    d = Diffusion(DiffusionConfig(schedule="cosine", timesteps=T))
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 1, 10, 250, 500, 900, 990]:
        assert d.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert d.betas.max().item() == pytest.approx(0.999)  # the clip is active at the end
    assert torch.all(d.betas[1:] >= d.betas[:-1])


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
def test_zero_terminal_snr(kind):
    plain = Diffusion(DiffusionConfig(schedule=kind))
    d = Diffusion(DiffusionConfig(schedule=kind, zero_terminal_snr=True))
    assert d.alphas_cumprod[-1].item() == 0.0
    assert d.snr[-1].item() == 0.0
    # the first alpha_bar is kept (Lin et al., Algorithm 1)
    assert d.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    # sqrt(alpha_bar) is an affine map of the original
    a, b = plain.sqrt_alphas_cumprod, d.sqrt_alphas_cumprod
    scale = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, (a - a[-1]) * scale, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "args,msg",
    [
        (("linear", 0), "timesteps"),
        (("linear", -5), "timesteps"),
        (("linear", 10, 0.02, 0.01), "beta_start < beta_end"),
        (("linear", 10, 0.01, 0.01), "beta_start < beta_end"),
        (("linear", 10, 0.0, 0.01), "0 < beta_start"),
        (("quadratic", 10, 0.01, 1.5), "< 1"),
        (("nope", 10), "unknown schedule"),
        (("cosine", 0), "timesteps"),
    ],
)
def test_validation(args, msg):
    with pytest.raises(ConfigError, match=msg):
        schedules.make_betas(*args)


def test_single_step_schedule():
    b = schedules.make_betas("linear", 1)
    assert b.shape == (1,)
