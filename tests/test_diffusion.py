"""The Gaussian process against its closed forms."""

import math

import pytest
import torch

from diffuse_cli.engine.config import DiffusionConfig
from diffuse_cli.engine.diffusion import Diffusion

N = 200_000


@pytest.fixture(scope="module")
def lin():
    return Diffusion(DiffusionConfig(schedule="linear"))


def test_timestep_convention_edges(lin):
    # t = 0 already has one step of noise: alpha_bar_0 = 1 - beta_0
    assert lin.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-12)
    assert lin.alphas_cumprod_prev[0].item() == 1.0
    # t = T-1 is x_T: alpha_bar = prod of all alphas
    assert lin.alphas_cumprod[-1].item() == pytest.approx(torch.prod(1 - lin.betas).item(), rel=1e-9)
    assert lin.num_timesteps == 1000
    with pytest.raises(IndexError):
        lin.q_sample(torch.zeros(1, 1), torch.tensor([1000]))


@pytest.mark.parametrize("t", [0, 10, 499, 999])
def test_q_sample_statistics(lin, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((N, 1), 0.7, dtype=torch.float64)
    tt = torch.full((N,), t, dtype=torch.int64)
    x = lin.q_sample(x0, tt, generator=g)
    ab = lin.alphas_cumprod[t].item()
    mean, var = ab**0.5 * 0.7, 1 - ab
    se = (var / N) ** 0.5
    assert abs(x.mean().item() - mean) < 5 * se
    assert x.var().item() == pytest.approx(var, rel=0.02)


def test_q_sample_formula_exact(lin):
    x0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 200, 600, 999])
    ab = lin.alphas_cumprod[t][:, None]
    torch.testing.assert_close(lin.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 30, 300])
def test_iterative_matches_closed_form(kind, t):
    d = Diffusion(DiffusionConfig(schedule=kind))
    n = 40_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 1), -0.5, dtype=torch.float64)
    x = d.q_sample_iterative(x0, t, generator=g)
    ab = d.alphas_cumprod[t].item()
    se = ((1 - ab) / n) ** 0.5
    assert abs(x.mean().item() - ab**0.5 * -0.5) < 5 * se + 1e-12
    assert x.var().item() == pytest.approx(1 - ab, rel=0.05, abs=1e-6)


def test_posterior_matches_bayes(lin):
    # q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): product of Gaussians, computed directly.
    x0 = torch.tensor([[0.3], [-1.0], [0.9]], dtype=torch.float64)
    x_t = torch.tensor([[0.1], [0.5], [-2.0]], dtype=torch.float64)
    t = torch.tensor([1, 100, 999])
    mean, var, logvar = lin.q_posterior_mean_variance(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        beta, abar_prev = lin.betas[ti].item(), lin.alphas_cumprod[ti - 1].item()
        a = 1 - beta
        prec = a / beta + 1 / (1 - abar_prev)
        v = 1 / prec
        m = v * (a**0.5 * x_t[i, 0].item() / beta + abar_prev**0.5 * x0[i, 0].item() / (1 - abar_prev))
        assert mean[i, 0].item() == pytest.approx(m, rel=1e-9)
        assert var[i, 0].item() == pytest.approx(v, rel=1e-9)
        assert logvar[i, 0].item() == pytest.approx(math.log(v), rel=1e-9)


def test_posterior_at_t0_is_x0(lin):
    x0, x_t = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    mean, var, _ = lin.q_posterior_mean_variance(x0, x_t, torch.zeros(4, dtype=torch.int64))
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
def test_round_trips(kind):
    d = Diffusion(DiffusionConfig(schedule=kind))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = d.q_sample(x0, t, eps)
    a = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a * eps - s * x0  # Salimans & Ho 2022, written out independently of the engine
    for kind_, pred in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(d.target(x0, eps, t, kind_), pred)
        rx0, reps = d.split_prediction(pred, x_t, t, kind_)
        torch.testing.assert_close(rx0, x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(reps, eps, rtol=1e-6, atol=1e-6)


def test_loss_is_mse_and_zero_for_oracle(lin):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 1, 4, 4, generator=g)
    eps = torch.randn(16, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    oracle = lambda x_t, tt: eps  # noqa: E731
    assert lin.training_losses(oracle, x0, t, eps).abs().max().item() == 0.0
    zero = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    torch.testing.assert_close(lin.training_losses(zero, x0, t, eps), eps.pow(2).flatten(1).mean(1))


def test_loss_draws_uniform_t(lin):
    seen = []

    def model(x_t, t):
        seen.append(t)
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(0)
    lin.training_losses(model, torch.zeros(50_000, 1), generator=g)
    t = seen[0]
    assert t.min().item() == 0 and t.max().item() == 999
    assert abs(t.double().mean().item() - 499.5) < 5


def test_min_snr_weights(lin):
    t = torch.tensor([0, 500, 999])
    w = lin.loss_weight(t, "min-snr", gamma=5.0, prediction="eps")
    snr = lin.snr[t]
    torch.testing.assert_close(w.double(), (snr.clamp(max=5) / snr), rtol=1e-6, atol=0)
    assert w[0].item() < 1e-2 and w[-1].item() == pytest.approx(1.0)
