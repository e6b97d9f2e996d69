"""Samplers against the exact noise predictor of Gaussian data (no training needed).

For x0 ~ N(mu, Sigma), E[x0 | x_t] is linear in x_t and known in closed form
(diffuse_cli.engine.analytic), so a sampler's output distribution can be compared
with the truth, and the deterministic ones with the exact probability-flow ODE map.
"""

import pytest
import torch

from diffuse_cli.engine import samplers
from diffuse_cli.engine.analytic import GaussianData
from diffuse_cli.engine.diffusion import Diffusion, DiffusionConfig
from diffuse_cli.engine.errors import ConfigError

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
COV = torch.tensor([[0.30, 0.12], [0.12, 0.20]], dtype=torch.float64)
DATA = GaussianData(MU, COV)


def diffusion(kind="linear", prediction="eps", **kw):
    return Diffusion(DiffusionConfig(schedule=kind, prediction=prediction, **kw))


def x_T(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ode_error(d, x, xT):
    """Mean distance to where the exact probability-flow ODE takes x_T."""
    exact = DATA.ode_solution(xT, float(d.alphas_cumprod[-1]))
    return (x - exact).norm(dim=1).mean().item()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddim", 50), ("dpmpp", 20)])
def test_output_distribution_matches_truth(kind, name, steps):
    d = diffusion(kind)
    n = 20_000
    g = torch.Generator().manual_seed(1)
    x = samplers.sample(DATA.model(d), d, x_T(n, 2), sampler=name, steps=steps, generator=g)
    se = (COV.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - MU).abs() < 5 * se + 0.01), x.mean(0)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=0.02, rtol=0.06)


def test_ddim_eta0_is_deterministic_and_converges():
    d = diffusion("linear")
    xT = x_T(2000)
    a = samplers.ddim(DATA.model(d), d, xT, steps=20, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = samplers.ddim(DATA.model(d), d, xT, steps=20, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    errs = [ode_error(d, samplers.ddim(DATA.model(d), d, xT, steps=s), xT) for s in (10, 20, 50, 200)]
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    assert errs[3] < 0.01


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_is_higher_order_than_ddim(kind):
    d = diffusion(kind)
    xT = x_T(2000)
    ddim = [ode_error(d, samplers.ddim(DATA.model(d), d, xT, steps=s), xT) for s in (10, 20)]
    dpm = [ode_error(d, samplers.dpmpp(DATA.model(d), d, xT, steps=s), xT) for s in (10, 20)]
    assert dpm[0] < ddim[0] and dpm[1] < ddim[1], (dpm, ddim)
    assert dpm[1] / dpm[0] < ddim[1] / ddim[0], (dpm, ddim)  # errors fall faster with steps


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_same_seed_same_samples(name):
    d = diffusion("cosine")
    kw = {"steps": 50, "eta": 1.0} if name == "ddim" else {"steps": 100}
    run = lambda seed: samplers.sample(
        DATA.model(d),
        d,
        x_T(16),
        sampler=name,  # noqa: E731
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("name,steps", [("ddpm", 100), ("ddim", 20), ("dpmpp", 15)])
def test_eps_x0_v_models_agree(name, steps):
    outs = []
    for pred in ("eps", "x0", "v"):
        d = diffusion("linear", prediction=pred)
        outs.append(
            samplers.sample(
                DATA.model(d), d, x_T(64), sampler=name, steps=steps, generator=torch.Generator().manual_seed(0)
            )
        )
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine", "sigmoid"])
@pytest.mark.parametrize("spacing", samplers.SPACINGS)
@pytest.mark.parametrize("ztsnr", [False, True])
def test_grid_properties(kind, spacing, ztsnr):
    d = diffusion(kind, zero_terminal_snr=ztsnr)
    for steps in (1, 2, 10, 50, 1000):
        g = samplers.timestep_grid(d, steps, spacing)
        assert g.dtype == torch.int64 and len(g) == steps
        assert g[0].item() == 999
        assert torch.all(g[1:] < g[:-1])
        assert g[-1].item() >= 0
    assert samplers.timestep_grid(d, 1000, spacing).tolist() == list(range(999, -1, -1))


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddpm", 25), ("ddim", 7), ("dpmpp", 10), ("dpmpp", 3)])
def test_one_model_call_per_step(name, steps):
    d = diffusion("linear")
    model = DATA.model(d)
    calls = []

    def counting(x, t):
        calls.append(t)
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        return model(x, t)

    samplers.sample(counting, d, x_T(4), sampler=name, steps=steps, generator=torch.Generator().manual_seed(0))
    assert len(calls) == steps
    assert calls[0][0].item() == 999  # starts from pure noise


def test_full_ddpm_is_the_seeds_algorithm():
    """steps = T visits every t from T-1 down to 0 with DDPM eq. 11 and sigma_t^2 = beta_t (Algorithm 2)."""
    d = diffusion("linear")
    model = DATA.model(d)
    xT = x_T(8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ours = samplers.ddpm(model, d, xT, steps=1000, variance="beta", generator=g1)
    x = xT.clone()
    for t in range(999, -1, -1):
        tt = torch.full((8,), t, dtype=torch.int64)
        eps = model(x, tt)
        beta, alpha, abar = d.betas[t].item(), d.alphas[t].item(), d.alphas_cumprod[t].item()
        mean = (x - beta / (1 - abar) ** 0.5 * eps) / alpha**0.5
        z = torch.randn(x.shape, generator=g2, dtype=x.dtype) if t > 0 else torch.zeros_like(x)
        x = mean + beta**0.5 * z
    torch.testing.assert_close(ours, x, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp"])
def test_zero_terminal_snr_v_prediction_is_finite(name):
    d = diffusion("linear", prediction="v", zero_terminal_snr=True)
    x = samplers.sample(DATA.model(d), d, x_T(256), sampler=name, steps=20, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert (x.mean(0) - MU).abs().max() < 0.15


def test_callback_reports_every_step():
    d = diffusion("cosine")
    seen = []
    samplers.dpmpp(DATA.model(d), d, x_T(4), steps=8, callback=seen.append)
    assert len(seen) == 8
    assert {"x_t", "x0_pred", "t"} <= set(seen[0])


def test_clip_x0_bounds_predictions():
    far = GaussianData(torch.tensor([3.0, -3.0]), torch.eye(2) * 0.01)
    d = diffusion("linear")
    x = samplers.ddim(far.model(d), d, x_T(32), steps=20, clip_x0=True)
    assert x.abs().max() <= 1.0 + 1e-9


@pytest.mark.parametrize(
    "kw,msg", [({"steps": 0}, "steps"), ({"steps": 1001}, "steps"), ({"eta": 1.5}, "eta"), ({"eta": -0.1}, "eta")]
)
def test_invalid_options(kw, msg):
    d = diffusion("linear")
    with pytest.raises(ConfigError, match=msg):
        samplers.ddim(DATA.model(d), d, x_T(2), **{"steps": 10, **kw})


def test_matches_diffusers_ddim():
    diffusers = pytest.importorskip("diffusers")
    d = diffusion("linear")
    model = DATA.model(d)
    xT = x_T(16)
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    steps = 20
    sched.set_timesteps(steps)
    x = xT.clone()
    for t in sched.timesteps:
        eps = model(x, torch.full((16,), int(t), dtype=torch.int64))
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    grid = torch.tensor([int(t) for t in sched.timesteps])
    ours_grid = samplers.timestep_grid(d, steps, "uniform")
    assert torch.equal(grid, ours_grid)
    ours = samplers.ddim(model, d, xT, steps=steps, spacing="uniform")
    # diffusers' last step goes to alpha_bar_prev = 1 as ours (set_alpha_to_one=True)
    torch.testing.assert_close(ours, x.to(torch.float64), atol=1e-4, rtol=1e-4)
