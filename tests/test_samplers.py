"""Samplers against exact oracles: Gaussian data has a closed-form denoiser and ODE flow.

GAUSS is a 3-D Gaussian with a non-trivial mean and covariance; its exact model is what a
perfectly trained network would output, so every deviation below is the sampler's own.
"""

from __future__ import annotations

import functools
import inspect
import math
import types

import pytest
import torch

from diffuse_cli.engine import samplers as S
from diffuse_cli.engine.analytic import GaussianData, GaussianMixture
from diffuse_cli.engine.config import DiffusionConfig
from diffuse_cli.engine.diffusion import Diffusion
from diffuse_cli.engine.errors import ConfigError

T = 1000
SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid")
GAUSS = GaussianData([0.5, -0.3, 0.2], [[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.1]])
F64 = torch.float64
# These analytic data are not images in [-1, 1], so the solver tests switch off x0 clipping (on by
# default); test_clip_x0 and tests/test_samplers_trained.py test clipping.
U = types.SimpleNamespace(
    **{f.__name__: functools.partial(f, clip_x0=False) for f in (S.sample, S.ddpm, S.ddim, S.dpmpp)}
)


@functools.cache
def make_diffusion(
    schedule: str = "linear", prediction: str = "eps", zero_terminal_snr: bool = False, timesteps: int = T
) -> Diffusion:
    return Diffusion(DiffusionConfig(schedule=schedule, prediction=prediction, zero_terminal_snr=zero_terminal_snr,
                                     timesteps=timesteps))  # fmt: skip


def x_T(n: int, seed: int = 0, dim: int = 3) -> torch.Tensor:
    return S.noise_like((n, dim), torch.Generator().manual_seed(seed), dtype=F64)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum(1).mean().sqrt())


def ode_error(sampler, d: Diffusion, steps: int, n: int = 500, **opts) -> float:
    """RMS distance to the exact probability-flow ODE solution from the same x_T."""
    x = x_T(n)
    out = U.sample(GAUSS.model(d), d, x, sampler=sampler, steps=steps, **opts)
    return rms(out, GAUSS.ode_solution(x, float(d.alphas_cumprod[-1])))


# --- the timestep grid ----------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 50, 333, 999, 1000])
def test_grid_properties(schedule, zero_terminal_snr, spacing, steps):
    grid = S.timestep_grid(make_diffusion(schedule, zero_terminal_snr=zero_terminal_snr), steps, spacing)
    assert grid.dtype == torch.int64 and grid.shape == (steps,)
    assert grid[0] == T - 1
    assert (grid[1:] < grid[:-1]).all(), "strictly decreasing"
    assert grid[-1] >= 0
    if steps >= 2:
        # uniform ("trailing") ends at T/steps - 1; the log-SNR and Karras grids end at t = 0
        assert grid[-1] <= (T / steps if spacing == "uniform" else 0)
    if steps == T:
        assert grid.tolist() == list(range(T - 1, -1, -1))


@pytest.mark.parametrize("timesteps", [1, 2, 3])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_tiny_T(timesteps, zero_terminal_snr, sampler, spacing):
    if zero_terminal_snr and timesteps < 2:  # not a valid schedule: refused, not sampled
        with pytest.raises(ConfigError, match="zero terminal SNR needs at least 2 timesteps"):
            make_diffusion("linear", zero_terminal_snr=zero_terminal_snr, timesteps=timesteps)
        return
    d = make_diffusion("linear", zero_terminal_snr=zero_terminal_snr, timesteps=timesteps)
    for steps in range(1, timesteps + 1):
        grid = S.timestep_grid(d, steps, spacing).tolist()
        assert grid[0] == timesteps - 1
        assert len(grid) == steps and grid == sorted(set(grid), reverse=True) and grid[-1] >= 0
        out = U.sample(GAUSS.model(d), d, x_T(4), sampler=sampler, steps=steps, spacing=spacing,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("steps", [7, 10, 50, 999])
def test_uniform_grid_is_trailing(steps):
    # Lin et al. (2024), Table 2, "trailing": round(arange(T, 0, -T/steps)) - 1
    expected = [round(T - i * T / steps) - 1 for i in range(steps)]
    assert S.timestep_grid(make_diffusion(), steps, "uniform").tolist() == expected


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_logsnr_grid_is_uniform_in_log_snr_where_snr_is_high(schedule):
    d = make_diffusion(schedule)
    grid = S.timestep_grid(d, 20, "logsnr")
    log_snr = d.log_snr[grid]
    gaps = (log_snr[1:] - log_snr[:-1])[log_snr[:-1] > 2.0][:-3]  # high SNR, away from integer rounding at t ~ 0
    assert len(gaps) >= 4
    assert float(gaps.max() / gaps.min()) < 1.35


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_logsnr_grid_does_not_waste_steps_on_pure_noise(schedule, zero_terminal_snr):
    # cosine's last log-SNR is ~ -18 and zero terminal SNR's is -inf; a plain log-SNR ramp from
    # there would put several of 10 points where x0_pred is still the data mean
    d = make_diffusion(schedule, zero_terminal_snr=zero_terminal_snr)
    grid = S.timestep_grid(d, 10, "logsnr")
    assert int((d.log_snr[grid[1:]] < -3.0).sum()) <= 1


# --- validation -------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
@pytest.mark.parametrize("steps", [0, -1, T + 1, 2.5, "10", True])
def test_invalid_steps(sampler, steps):
    with pytest.raises(ConfigError, match=r"--steps must be between 1 and T = 1000"):
        U.sample(GAUSS.model(make_diffusion()), make_diffusion(), x_T(4), sampler=sampler, steps=steps)


def test_steps_message_is_exact():
    with pytest.raises(ConfigError) as err:
        S.timestep_grid(make_diffusion(), 0)
    assert str(err.value) == "--steps must be between 1 and T = 1000 (got 0)"


@pytest.mark.parametrize("eta", [-0.1, 1.01, math.nan])
def test_invalid_eta(eta):
    with pytest.raises(ConfigError, match="--eta must be between 0 and 1"):
        U.ddim(GAUSS.model(make_diffusion()), make_diffusion(), x_T(4), steps=5, eta=eta)


@pytest.mark.parametrize("call", [
    lambda m, d, x: U.sample(m, d, x, sampler="euler"),
    lambda m, d, x: U.sample(m, d, x, sampler="ddpm", eta=0.5),  # an option ddpm does not take
    lambda m, d, x: U.dpmpp(m, d, x, steps=5, order=4),
    lambda m, d, x: U.ddpm(m, d, x, steps=5, variance="learned"),
    lambda m, d, x: U.ddim(m, d, x, steps=5, spacing="leading"),
])  # fmt: skip
def test_invalid_options(call):
    with pytest.raises(ConfigError):
        call(GAUSS.model(make_diffusion()), make_diffusion(), x_T(4))


def test_defaults():
    d = make_diffusion()
    assert S.DEFAULT_SAMPLER in S.SAMPLERS
    assert S.default_steps("ddpm", T) == T and S.default_steps("ddim", T) == 50 and S.default_steps("dpmpp", T) == 20
    assert S.default_steps("ddim", 30) == 30  # capped at T
    assert S.timestep_grid(d, 20, S.DEFAULT_SPACING["dpmpp"]).shape == (20,)


# --- one model call per step; the callback --------------------------------------------
@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_model_calls_equal_steps(sampler, steps, spacing):
    d = make_diffusion("cosine")
    model, calls, seen = GAUSS.model(d), [], []

    def counting(x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        calls.append(int(t[0]))
        return model(x, t)

    out = U.sample(counting, d, x_T(8), sampler=sampler, steps=steps, spacing=spacing,
                   generator=torch.Generator().manual_seed(0), callback=seen.append)  # fmt: skip
    assert len(calls) == steps
    assert calls == S.timestep_grid(d, steps, spacing).tolist()
    assert [c["i"] for c in seen] == list(range(steps)) and [c["t"] for c in seen] == calls
    assert all(c["x_t"].shape == (8, 3) and c["x0_pred"].shape == (8, 3) and c["steps"] == steps for c in seen)
    assert torch.isfinite(out).all()


# --- the output distribution ------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 50), ("dpmpp", 20)])
def test_moments_match_the_data(schedule, sampler, steps):
    # n = 20000: the standard error of a mean is ~0.004, of a covariance entry ~0.003
    d = make_diffusion(schedule)
    out = U.sample(GAUSS.model(d), d, x_T(20_000, seed=1), sampler=sampler, steps=steps,
                   generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert (out.mean(0) - GAUSS.mean()).abs().max() < 0.02
    # DDIM is first order: at 50 steps its covariance comes out 0.026-0.028 low here
    assert (torch.cov(out.T) - GAUSS.cov()).abs().max() < (0.04 if sampler == "ddim" else 0.02)


def test_moments_test_can_fail():
    # the same check catches a sampler that stops one step short (output still noisy)
    d = make_diffusion()
    x = x_T(20_000, seed=1)
    out = U.ddim(GAUSS.model(d), d, x, steps=50)
    short = U.ddim(GAUSS.model(d), d, x, steps=50, callback=None)
    grid = S.timestep_grid(d, 50, "logsnr")
    noisy = []
    U.ddim(GAUSS.model(d), d, x, steps=50, callback=lambda c: noisy.append(c["x_t"]))
    assert torch.equal(out, short)
    assert (torch.cov(noisy[-3].T) - GAUSS.cov()).abs().max() > 0.02, f"t={int(grid[-3])} should be visibly noisy"


# --- determinism and convergence -------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_is_deterministic_and_converges(schedule):
    d = make_diffusion(schedule)
    x = x_T(500)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    a = U.ddim(GAUSS.model(d), d, x, steps=20, generator=gen)
    b = U.ddim(GAUSS.model(d), d, x, steps=20)
    assert torch.equal(a, b) and torch.equal(gen.get_state(), state), "eta = 0 draws nothing"
    errors = [ode_error("ddim", d, steps) for steps in (10, 20, 50, 100)]
    assert all(errors[i] > errors[i + 1] for i in range(len(errors) - 1)), errors
    assert errors[0] / errors[-1] > 5, errors  # first order: ~10x for 10x the steps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_error_falls_faster_than_ddims(schedule, order):
    d = make_diffusion(schedule)
    ddim_10, ddim_20 = ode_error("ddim", d, 10), ode_error("ddim", d, 20)
    dpm_10, dpm_20 = ode_error("dpmpp", d, 10, order=order), ode_error("dpmpp", d, 20, order=order)
    assert 1.6 < ddim_10 / ddim_20 < 2.5  # first order: error halves
    assert dpm_10 / dpm_20 > 4  # at least second order
    assert dpm_10 < ddim_10 / 5 and dpm_20 < ddim_20 / 20


def test_dpmpp_3m_is_third_order():
    # the slope of log-error against log-steps, between 10 and 20 steps (before the t = 0 floor)
    d = make_diffusion("cosine")
    e10, e20 = ode_error("dpmpp", d, 10, order=3), ode_error("dpmpp", d, 20, order=3)
    assert math.log2(e10 / e20) > 2.8


@pytest.mark.parametrize("sampler, opts", [("ddpm", {"steps": 20}), ("ddim", {"steps": 20, "eta": 1.0}),
                                           ("ddpm", {"steps": 20, "variance": "posterior"})])  # fmt: skip
def test_same_seed_same_output(sampler, opts):
    d = make_diffusion()
    model, x = GAUSS.model(d), x_T(64)

    def run(seed):
        return U.sample(model, d, x, sampler=sampler, generator=torch.Generator().manual_seed(seed), **opts)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_dpmpp_draws_nothing():
    d = make_diffusion()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    a = U.dpmpp(GAUSS.model(d), d, x_T(16), steps=10, generator=gen)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(a, U.dpmpp(GAUSS.model(d), d, x_T(16), steps=10))


def test_noise_like_is_seeded():
    a = S.noise_like((3, 4), torch.Generator().manual_seed(5))
    b = S.noise_like((3, 4), torch.Generator().manual_seed(5), device="cpu", dtype=F64)
    assert a.dtype == torch.float32 and b.dtype == F64 and torch.allclose(a.double(), b, atol=1e-6)


# --- what the network predicts does not matter ------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, opts", [("ddpm", {"steps": 50}), ("ddim", {"steps": 20, "eta": 0.5}),
                                           ("dpmpp", {"steps": 15})])  # fmt: skip
def test_eps_x0_v_models_agree(schedule, sampler, opts):
    outs = []
    for kind in ("eps", "x0", "v"):
        d = make_diffusion(schedule, prediction=kind)
        outs.append(U.sample(GAUSS.model(d), d, x_T(64), sampler=sampler,
                             generator=torch.Generator().manual_seed(3), **opts))  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-7)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=1e-7)


# --- zero terminal SNR ------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["v", "x0", "eps"])
@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_zero_terminal_snr_stays_finite(prediction, sampler, spacing):
    d = make_diffusion("linear", prediction=prediction, zero_terminal_snr=True)
    assert float(d.alphas_cumprod[-1]) == 0.0
    out = U.sample(GAUSS.model(d), d, x_T(256), sampler=sampler, steps=20, spacing=spacing,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_zero_terminal_snr_samples_the_data(prediction):
    d = make_diffusion("cosine", prediction=prediction, zero_terminal_snr=True)
    out = U.dpmpp(GAUSS.model(d), d, x_T(20_000, seed=1), steps=20)
    assert (out.mean(0) - GAUSS.mean()).abs().max() < 0.02
    assert (torch.cov(out.T) - GAUSS.cov()).abs().max() < 0.02


# --- clipping -----------------------------------------------------------------------------
FAR = GaussianData([3.0, -2.0], [[0.5, 0.0], [0.0, 0.5]])  # far outside [-1, 1]: x0 always needs clipping


@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
@pytest.mark.parametrize("clip", [True, "static", "dynamic", "rederive"])
def test_clip_x0(sampler, clip):
    d = make_diffusion()
    kw = {"steps": 20, "generator": torch.Generator().manual_seed(0)}
    free = U.sample(FAR.model(d), d, x_T(256, dim=2), sampler=sampler, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    clipped = S.sample(FAR.model(d), d, x_T(256, dim=2), sampler=sampler, clip_x0=clip, **kw)
    assert free.abs().max() > 2 and clipped.abs().max() <= 1.0


def test_clipping_is_on_by_default():
    """`diffuse sample` clips by default (--clip); the Python API must do the same (issue #16)."""
    for fn in S.SAMPLERS.values():
        assert inspect.signature(fn).parameters["clip_x0"].default is True
    assert S.DEFAULT_CLIP in S.CLIPS and S.DEFAULT_CLIP != "none"
    d = make_diffusion()
    x = x_T(64, dim=2)
    torch.testing.assert_close(S.dpmpp(FAR.model(d), d, x), S.dpmpp(FAR.model(d), d, x, clip_x0=S.DEFAULT_CLIP))


@pytest.mark.parametrize("clip", ["maybe", 1, "Static"])
def test_invalid_clip(clip):
    with pytest.raises(ConfigError, match="clipping"):
        S.ddim(GAUSS.model(make_diffusion()), make_diffusion(), x_T(4), steps=5, clip_x0=clip)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_static_clip_keeps_the_networks_eps(prediction):
    """One DDIM step (Song et al. eq. 12) with "static": sqrt(abar_s) clip(x0) + sqrt(1 - abar_s) eps_net."""
    d = make_diffusion(prediction=prediction)
    model, x = FAR.model(d), x_T(64, dim=2)
    seen = []
    S.ddim(model, d, x, steps=2, spacing="uniform", clip_x0="static", callback=lambda c: seen.append(c["x_t"]))
    t, s = S.timestep_grid(d, 2, "uniform").tolist()
    abar_t, abar_s = float(d.alphas_cumprod[t]), float(d.alphas_cumprod[s])
    x0, eps = d.split_prediction(model(x, torch.full((64,), t)), x, torch.full((64,), t))
    expected = math.sqrt(abar_s) * x0.clamp(-1, 1) + math.sqrt(1 - abar_s) * eps
    torch.testing.assert_close(seen[1], expected, rtol=0, atol=1e-10)
    rederived = (x - math.sqrt(abar_t) * x0.clamp(-1, 1)) / math.sqrt(1 - abar_t)  # the pre-#16 path
    assert (expected - (math.sqrt(abar_s) * x0.clamp(-1, 1) + math.sqrt(1 - abar_s) * rederived)).abs().max() > 0.01


@pytest.mark.parametrize("clip", ["none", "static", "dynamic", "rederive"])
@pytest.mark.parametrize("steps", [3, 10])
def test_clip_modes_agree_between_samplers(clip, steps):
    """Each mode means the same in every sampler: DPM-Solver++ order 1 is DDIM (Lu et al. 2022, sec. 4),
    and DDPM with beta~ is DDIM with eta = 1 (Song et al. 2021, eq. 16), clipped or not."""
    d = make_diffusion()
    model, x = FAR.model(d), x_T(128, dim=2)
    ddim = S.ddim(model, d, x, steps=steps, clip_x0=clip)
    torch.testing.assert_close(S.dpmpp(model, d, x, steps=steps, order=1, clip_x0=clip), ddim, rtol=0, atol=1e-10)
    ddim1 = S.ddim(model, d, x, steps=steps, eta=1.0, clip_x0=clip, generator=torch.Generator().manual_seed(3))
    ddpm = S.ddpm(
        model, d, x, steps=steps, variance="posterior", clip_x0=clip, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ddpm, ddim1, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pixels", [2, 401])
def test_dynamic_thresholding_is_imagens(pixels):
    """With one step a sampler returns its x0 at T - 1; "dynamic" must be Saharia et al. (2022) sec. 2.3,
    with the percentile interpolated linearly as numpy / torch.quantile (and diffusers) do."""
    d = make_diffusion(prediction="x0")
    x0 = 2.0 * torch.randn((16, pixels), generator=torch.Generator().manual_seed(6), dtype=F64)
    x0[:4] *= 0.2  # some samples need no thresholding
    model, x = (lambda x, t: x0), x_T(16, dim=pixels)
    s = torch.quantile(x0.abs(), 0.995, dim=1, keepdim=True).clamp(min=1.0)
    expected = torch.maximum(torch.minimum(x0, s), -s) / s
    torch.testing.assert_close(S.ddim(model, d, x, steps=1, clip_x0="dynamic"), expected, rtol=0, atol=1e-12)
    assert (s > 1).any() and (s == 1).any()  # both cases occur


# --- the seed's algorithm, step by step -------------------------------------------------
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_with_all_steps_is_ho_et_al_algorithm_2(variance):
    d = make_diffusion("linear", timesteps=8)
    model = GAUSS.model(d)
    x0 = x_T(32, seed=4)
    ours = U.ddpm(model, d, x0, variance=variance, generator=torch.Generator().manual_seed(9))
    gen, x = torch.Generator().manual_seed(9), x0
    for t in range(7, -1, -1):
        tt = torch.full((32,), t, dtype=torch.int64)
        beta, alpha, abar = float(d.betas[t]), float(d.alphas[t]), float(d.alphas_cumprod[t])
        mean = (x - beta / math.sqrt(1 - abar) * model(x, tt)) / math.sqrt(alpha)  # DDPM eq. 11
        sigma2 = beta if variance == "beta" else float(d.posterior_variance[t])
        x = mean + math.sqrt(sigma2) * torch.randn(x.shape, generator=gen, dtype=F64) if t > 0 else mean
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


# --- cross-checks against diffusers --------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_matches_diffusers_trailing(schedule, steps):
    diffusers = pytest.importorskip("diffusers")
    d = make_diffusion(schedule)
    model, x = GAUSS.model(d), x_T(256)
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=d.betas.numpy(), prediction_type="epsilon",
                                    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)  # fmt: skip
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == S.timestep_grid(d, steps, "uniform").tolist()
    y = x.clone()
    for t in sched.timesteps:
        y = sched.step(model(y, torch.full((256,), int(t))), t, y).prev_sample
    ours = U.ddim(model, d, x, steps=steps, spacing="uniform")
    torch.testing.assert_close(ours, y, rtol=0, atol=2e-5)  # diffusers keeps alpha_bar in float32


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers_on_the_same_grid(steps):
    diffusers = pytest.importorskip("diffusers")
    d = make_diffusion("linear")
    model, x = GAUSS.model(d), x_T(256)
    grid = S.timestep_grid(d, steps, "logsnr")
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=d.betas.numpy(),
                                                  solver_order=2, prediction_type="epsilon",
                                                  final_sigmas_type="zero", lower_order_final=False)  # fmt: skip
    sched.set_timesteps(timesteps=grid.tolist())
    y = x.clone()
    for t in sched.timesteps:
        y = sched.step(model(y, torch.full((256,), int(t))), t, y).prev_sample
    ours = U.dpmpp(model, d, x, steps=steps, order=2, spacing="logsnr")
    torch.testing.assert_close(ours, y, rtol=0, atol=1e-5)  # float32 sigmas in diffusers


# --- the analytic models themselves ------------------------------------------------------
def test_analytic_gaussian_oracles():
    d = make_diffusion("linear")
    abar = float(d.alphas_cumprod[300])
    x0 = GAUSS.sample(50_000, torch.Generator().manual_seed(0))
    assert (x0.mean(0) - GAUSS.mean()).abs().max() < 0.01 and (torch.cov(x0.T) - GAUSS.cov()).abs().max() < 0.01
    # posterior mean by Gaussian conditioning, written independently
    sigma, mu = GAUSS.cov(), GAUSS.mean()
    c = abar * sigma + (1 - abar) * torch.eye(3, dtype=F64)
    x = GAUSS.sample_noisy(100, abar, torch.Generator().manual_seed(1))
    expected = mu + (math.sqrt(abar) * sigma @ torch.linalg.solve(c, (x - math.sqrt(abar) * mu).T)).T
    torch.testing.assert_close(GAUSS.posterior_mean(x, abar), expected)
    # the ODE map pushes q(x_t) onto the data
    mapped = GAUSS.ode_solution(GAUSS.sample_noisy(50_000, abar, torch.Generator().manual_seed(2)), abar)
    assert (torch.cov(mapped.T) - sigma).abs().max() < 0.01


def test_analytic_mixture_reduces_to_gaussian_and_predictions_are_consistent():
    d = make_diffusion("cosine")
    twin = GaussianMixture([0.3, 0.7], GAUSS.means.expand(2, 3), covs=GAUSS.covs.expand(2, 3, 3))
    x, t = x_T(64), torch.full((64,), 400, dtype=torch.int64)
    torch.testing.assert_close(twin.model(d, "x0")(x, t), GAUSS.model(d, "x0")(x, t))
    x0 = GAUSS.model(d, "x0")(x, t)
    eps = GAUSS.model(d, "eps")(x, t)
    v = GAUSS.model(d, "v")(x, t)
    torch.testing.assert_close(d.split_prediction(eps, x, t, "eps")[0], x0)
    torch.testing.assert_close(d.split_prediction(v, x, t, "v")[0], x0)
