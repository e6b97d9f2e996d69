"""bits/dim, Frechet distance and precision/recall against closed forms and analytic models; `diffuse eval` is tested in test_cli_eval.py."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from diffuse_cli.engine import data, evaluate
from diffuse_cli.engine.analytic import GaussianData
from diffuse_cli.engine.config import DiffusionConfig
from diffuse_cli.engine.diffusion import Diffusion
from diffuse_cli.engine.errors import Unsupported
from helpers import fake_pytorch_fid

# --- the bound on the analytic Gaussian model --------------------------------------------------------
GAUSS = GaussianData(mean=[0.3, -0.2], cov=[[0.1, 0.03], [0.03, 0.05]])


def bound_gap(T: int, variance: str, n: int = 8000) -> tuple[float, float]:
    """Mean and standard error over points of (continuous bound) - (exact -log p(x0)), in nats."""
    x0 = GAUSS.sample(n, torch.Generator().manual_seed(0))
    exact = -torch.distributions.MultivariateNormal(GAUSS.means[0], GAUSS.covs[0]).log_prob(x0)
    d = Diffusion(DiffusionConfig(schedule="cosine", timesteps=T))
    out = evaluate.nll_bound(GAUSS.model(d), d, x0, variance=variance, discrete=False,
                             generator=torch.Generator().manual_seed(1))  # fmt: skip
    gap = out["total"] - exact
    return float(gap.mean()), float(gap.std() / math.sqrt(n))


def test_bound_is_above_the_exact_likelihood_and_tightens_as_T_grows():
    """Gaussian data: the exact optimal model is known, and so is -log p(x0) (closed form).

    With sigma_t^2 = beta_t the bound (Ho et al. eq. 5) must be above the exact NLL and approach it
    as T grows (a finer discretisation of the same cosine process). Measured (n = 8000, nats):
    gaps 0.49, 0.18, 0.04, 0.015 (and -0.007 at T = 1000) at T = 10, 30, 100, 300; standard errors 0.01 - 0.016.
    """
    gaps = {T: bound_gap(T, "beta") for T in (10, 30, 100, 300)}
    for mean, se in gaps.values():
        assert mean > -3 * se
    assert gaps[10][0] > gaps[30][0] + 0.1 > gaps[100][0] + 0.1
    assert gaps[100][0] < 0.1 and gaps[300][0] < 0.05


def test_posterior_variance_is_a_looser_bound():
    """sigma_t^2 = beta~_t is still a bound, but beta~_t / beta_t ~ (t - 1) / t near t = 0 leaves a gap."""
    mean, se = bound_gap(100, "posterior", n=4000)
    assert mean > max(0.5, 3 * se) and mean > bound_gap(100, "beta", n=4000)[0]


def test_subsampled_terms_estimate_the_same_bound():
    x0 = GAUSS.sample(4000, torch.Generator().manual_seed(2))
    d = Diffusion(DiffusionConfig(schedule="cosine", timesteps=200))
    full = evaluate.nll_bound(GAUSS.model(d), d, x0, discrete=False, generator=torch.Generator().manual_seed(3))
    part = evaluate.nll_bound(
        GAUSS.model(d), d, x0, discrete=False, terms=20, generator=torch.Generator().manual_seed(4)
    )
    diff = part["total"].mean() - full["total"].mean()
    se = math.sqrt(part["total"].var() / 4000 + full["total"].var() / 4000)
    assert abs(float(diff)) < 4 * se
    assert part["total"].std() > full["total"].std()  # the price: noisier per image


def test_prior_term_is_the_closed_form_kl():
    d = Diffusion(DiffusionConfig(schedule="linear", timesteps=50))
    x0 = torch.tensor([[0.5, -1.0, 0.0]], dtype=torch.float64)
    out = evaluate.nll_bound(lambda x, t: torch.zeros_like(x), d, x0, discrete=False)
    abar = float(d.alphas_cumprod[-1])
    expect = sum(0.5 * (abar * v * v + (1 - abar) - 1 - math.log(1 - abar)) for v in (0.5, -1.0, 0.0))
    assert float(out["prior"][0]) == pytest.approx(expect, rel=1e-9)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    v1, v2 = (
        torch.rand(50, generator=g, dtype=torch.float64) + 0.1,
        torch.rand(50, generator=g, dtype=torch.float64) + 0.1,
    )
    N = torch.distributions.Normal
    expect = torch.distributions.kl_divergence(N(m1, v1.sqrt()), N(m2, v2.sqrt()))
    torch.testing.assert_close(evaluate._normal_kl(m1, v1, m2, v2), expect, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.98, 0.003), (-3.0, 0.2), (0.3, 5.0), (0.5, 1e-4)])
def test_discretised_decoder_is_a_distribution_over_the_256_values(mean, std):
    """Ho et al. eq. 13: the masses of all 256 bins sum to 1, and each is Phi(b) - Phi(a)."""
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    log_p = evaluate.discretized_gaussian_log_likelihood(
        x, torch.full_like(x, mean), torch.full_like(x, 2 * math.log(std))
    )
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    inner = slice(1, 255)
    cdf = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), std).cdf
    direct = cdf(x[inner] + 1 / 255) - cdf(x[inner] - 1 / 255)
    ok = direct > 1e-12  # where the direct difference still has digits left
    torch.testing.assert_close(log_p[inner][ok].exp(), direct[ok], rtol=1e-6, atol=1e-15)
    assert torch.isfinite(log_p).all()


def test_bits_per_dim_of_an_exact_denoiser_is_its_closed_form():
    """A model that returns the true x0 makes every term deterministic: the prior KL, a KL of variances
    only at each step (means agree), and the decoder's mass of the true bin under N(x0, beta_0). So the
    whole bound, and bits/dim, have a closed form. A model predicting 0 must do far worse."""
    images = data.load_dataset("builtin:digits").images[:16]
    T = 30
    d = Diffusion(DiffusionConfig(schedule="linear", timesteps=T, beta_start=1e-3, beta_end=0.3, prediction="x0"))
    x0 = data.to_model_range(images).double()
    truth = x0.float()

    def oracle(x_t, t):
        return truth.to(x_t.dtype)

    res = evaluate.bits_per_dim(oracle, d, images, batch_size=16, generator=torch.Generator().manual_seed(0))
    D = x0[0].numel()
    abar, betas, post = (getattr(d, k).tolist() for k in ("alphas_cumprod", "betas", "posterior_variance"))
    prior = 0.5 * (abar[-1] * x0**2 + (1 - abar[-1]) - 1 - math.log(1 - abar[-1])).flatten(1).sum(1)
    kl = D * sum(0.5 * (math.log(betas[t] / post[t]) + post[t] / betas[t] - 1) for t in range(1, T))
    cdf = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), math.sqrt(betas[0])).cdf
    h = torch.tensor(1 / 255, dtype=torch.float64)
    inner, edge = cdf(h) - cdf(-h), cdf(h)  # a bin around the mean; the outermost bins reach to infinity
    mass = torch.where(x0.abs() > 1 - 1e-3, edge, inner)
    decoder = -mass.log().flatten(1).sum(1)
    expect = (prior + kl + decoder) / (D * math.log(2))
    torch.testing.assert_close(res.per_image, expect, rtol=1e-9, atol=1e-12)
    assert res.ci95[0] < res.bits_per_dim < res.ci95[1] and res.images == 16 and res.terms == T - 1
    assert sum(res.parts.values()) == pytest.approx(res.bits_per_dim, rel=1e-9)
    useless = evaluate.bits_per_dim(
        lambda x, t: torch.zeros_like(x), d, images, generator=torch.Generator().manual_seed(0)
    )
    assert useless.bits_per_dim > res.bits_per_dim + 1


# --- Frechet distance, precision/recall ----------------------------------------------------------------
def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    # Commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    expect = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert evaluate.gaussian_frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(
        expect, rel=1e-10
    )
    # Non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 PSD M, and tr sqrt(S1 S2) = tr sqrt(M)
    s1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    m = s1 @ s2
    tr_sqrt = math.sqrt(float(torch.trace(m)) + 2 * math.sqrt(float(torch.det(m))))
    expect = float(torch.trace(s1) + torch.trace(s2)) - 2 * tr_sqrt
    zero = torch.zeros(2)
    assert evaluate.gaussian_frechet_distance(zero, s1, zero, s2) == pytest.approx(expect, rel=1e-10)


@pytest.fixture(scope="module")
def digit_halves():
    images = data.load_dataset("builtin:digits").images
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[perm[:800]], images[perm[800:1600]]


def test_randconv_features_are_fixed():
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    f1, f2 = evaluate.extract_features(x), evaluate.RandConvFeatures()(x)
    assert f1.shape == (5, 128) and f1.dtype == torch.float64
    torch.testing.assert_close(f1, f2.double(), rtol=1e-6, atol=1e-8)


def test_frechet_distance_is_zero_on_itself_and_grows_with_noise(digit_halves):
    """Measured with randconv features: 0 on itself, 0.007 between the halves, then 0.013 / 0.024 / 0.062 /
    0.19 / 0.51 for Gaussian pixel noise of std 5 / 10 / 20 / 40 / 80 (of 255)."""
    a, b = digit_halves
    fa = evaluate.extract_features(a)
    assert evaluate.frechet_distance(fa, fa) < 1e-9
    g = torch.Generator().manual_seed(1)
    values = [evaluate.frechet_distance(fa, evaluate.extract_features(b))]
    for std in (5, 10, 20, 40, 80):
        noisy = (b.double() + std * torch.randn(b.shape, generator=g, dtype=torch.float64)).clamp(0, 255).round()
        values.append(evaluate.frechet_distance(fa, evaluate.extract_features(noisy.to(torch.uint8))))
    assert all(x < y for x, y in zip(values, values[1:], strict=False)), values
    assert values[-1] > 20 * values[0]


def test_precision_recall_of_halves_and_of_broken_generators(digit_halves):
    """Two halves of the digits: ~0.89 each (k = 3, 128-d features, measured). A generator that drops 7 of
    the 10 digits keeps precision and loses recall; one that adds heavy noise loses precision."""
    a, b = digit_halves
    fa = evaluate.extract_features(a)
    p, r = evaluate.precision_recall(fa, evaluate.extract_features(b))
    assert p > 0.85 and r > 0.85
    labels = data.load_dataset("builtin:digits").labels
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    few = b[labels[perm[800:1600]] < 3]
    p, r = evaluate.precision_recall(fa, evaluate.extract_features(few))
    assert p > 0.85 and r < 0.65
    g = torch.Generator().manual_seed(2)
    noisy = (b.double() + 80 * torch.randn(b.shape, generator=g, dtype=torch.float64)).clamp(0, 255).round()
    p, _ = evaluate.precision_recall(fa, evaluate.extract_features(noisy.to(torch.uint8)))
    assert p < 0.1


def test_precision_recall_on_disjoint_point_clouds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g, dtype=torch.float64)
    assert evaluate.precision_recall(real, real + 100.0) == (0.0, 0.0)
    assert evaluate.precision_recall(real, real) == (1.0, 1.0)


# --- Inception (optional extra): the error paths ----------------------------------------------------------
def test_inception_without_pytorch_fid_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(Unsupported, match=r"pip install 'diffuse-cli\[fid\]'"):
        evaluate.extract_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "inception")


def test_inception_weights_that_cannot_be_fetched_say_so(monkeypatch):
    fake_pytorch_fid(monkeypatch)
    with pytest.raises(Unsupported) as err:
        evaluate.extract_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "inception")
    msg = str(err.value)
    assert "cannot fetch the Inception-v3 weights" in msg and "first use" in msg and "name resolution" in msg
    assert "\n" not in msg
