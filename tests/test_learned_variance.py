"""The learned reverse variance of Improved DDPM (Nichol & Dhariwal 2021): eq. 15, L_hybrid, importance sampling.

Oracles: the interpolation's end points are DDPM's two fixed variances (so a learned model with v = 0
or 1 must sample and score exactly as they do); the KL of two Gaussians in closed form; and, on
Gaussian data, the optimal reverse variance of Analytic-DPM (Bao et al. 2022, Theorem 1), which
fitting the variance with the hybrid loss must approach.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import evaluate, models
from diffuse_cli.engine import samplers as S
from diffuse_cli.engine.analytic import GaussianData
from diffuse_cli.engine.config import DiffusionConfig, TrainConfig, UNetConfig
from diffuse_cli.engine.diffusion import Diffusion, learned_log_variance
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.guidance import guided
from diffuse_cli.engine.importance import ImportanceSampler
from helpers import TINY_TRAIN, one_line_error
from helpers import invoke as run

F64 = torch.float64
GAUSS = GaussianData([0.4, -0.2, 0.1], [[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.1]])
# Data whose spread is comparable to the noise of the first steps: there the optimal reverse variance lies
# well between DDPM's two choices (for wide data beta_t is close to optimal, as Ho et al. noted).
NARROW = GaussianData([0.4, -0.2, 0.1], [[0.02, 0.004, 0.0], [0.004, 0.005, 0.0], [0.0, 0.0, 0.001]])


def learned(schedule: str = "cosine", timesteps: int = 1000, **kw) -> Diffusion:
    return Diffusion(DiffusionConfig(schedule=schedule, timesteps=timesteps, variance="learned", **kw))


def with_variance(model, r):
    """A learned-variance model: ``model``'s prediction and the variance output ``r(x_t, t)`` as 2C channels."""
    return lambda x_t, t: torch.cat([model(x_t, t), r(x_t, t)], dim=1)


def constant(value: float):
    return lambda x_t, t: torch.full_like(x_t, value)


# --- eq. 15 and its end points --------------------------------------------------------------------
def test_learned_range_interpolates_between_ddpms_two_variances():
    d = learned()
    t = torch.tensor([0, 1, 10, 500, 999])
    like = torch.zeros(5, 2, dtype=F64)
    for r, fixed in ((1.0, "beta"), (-1.0, "posterior")):
        got = d.p_log_variance(t, like, "learned", torch.full_like(like, r))
        torch.testing.assert_close(got, d.p_log_variance(t, like, fixed), rtol=0, atol=1e-12)
    mid = d.p_log_variance(t, like, "learned", torch.zeros_like(like))  # v = 1/2: the geometric mean
    expect = 0.5 * (d.betas.log() + d.posterior_log_variance_clipped)[t, None].expand_as(like)
    torch.testing.assert_close(mid, expect, rtol=0, atol=1e-12)
    assert float(learned_log_variance(torch.tensor(3.0), 0.0, 1.0)) == -1.0  # not clamped: v = 2 extrapolates


def test_a_fixed_model_has_no_learned_variance():
    d = Diffusion(DiffusionConfig(schedule="cosine"))
    with pytest.raises(ConfigError, match="learned variance"):
        d.reverse_variance("learned")
    with pytest.raises(ConfigError, match="unknown variance"):
        learned().reverse_variance("wide")
    assert (d.reverse_variance(), learned().reverse_variance()) == ("beta", "learned")


def test_config_round_trip_and_two_c_outputs():
    cfg = DiffusionConfig(variance="learned")
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    assert DiffusionConfig.from_dict({"schedule": "linear"}).variance == "fixed"  # checkpoints from before
    u = UNetConfig(
        image_size=8,
        in_channels=3,
        base_channels=32,
        channel_mults=(1, 2),
        attention_resolutions=(),
        learned_variance=True,
    )
    assert u.out_channels == 6 and UNetConfig.from_dict(u.to_dict()) == u
    with pytest.raises(ConfigError):
        DiffusionConfig(variance="small")
    with pytest.raises(ConfigError):
        TrainConfig(vlb_weight=-1.0)
    with pytest.raises(ConfigError):
        TrainConfig(timestep_sampling="sometimes")


# --- L_hybrid ---------------------------------------------------------------------------------------
def test_hybrid_loss_is_l_simple_plus_lambda_t_times_the_kl_in_bits():
    """With the exact x0 the posterior means agree, and L_t is the KL of two variances in closed form."""
    d = learned(timesteps=100)
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor([1, 5, 20, 50, 80, 99])
    oracle = lambda x_t, t_: eps  # noqa: E731 - predicts the very noise that was added
    for r in (-1.0, 0.3, 1.0):
        loss = d.training_losses(with_variance(oracle, constant(r)), x0, t=t, eps=eps, vlb_weight=0.001)
        log_sigma2 = learned_log_variance(
            torch.tensor(r, dtype=F64), d.log_betas[t], d.posterior_log_variance_clipped[t]
        )
        log_q = d.posterior_log_variance_clipped[t]
        kl = 0.5 * (log_sigma2 - log_q + torch.exp(log_q - log_sigma2) - 1.0)  # per element, nats
        torch.testing.assert_close(loss.double(), 0.001 * 100 * kl / math.log(2.0), rtol=1e-5, atol=1e-9)
    plain = d.training_losses(with_variance(oracle, constant(1.0)), x0, t=t, eps=eps, vlb_weight=0.0)
    assert plain.abs().max() == 0.0  # vlb_weight 0: L_simple only


def test_l_vlb_trains_only_the_variance():
    """Stop-gradient on the mean (Improved DDPM sec. 3.1): the prediction's gradient is L_simple's alone."""
    d = learned(timesteps=50)
    x0 = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    t = torch.arange(0, 50, 7)[:8]
    grads = []
    for lam in (0.0, 0.5):
        out = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
        d.training_losses(
            lambda x_t, t_, out=out: out, x0, t=t, eps=torch.zeros_like(x0), vlb_weight=lam
        ).sum().backward()
        grads.append(out.grad)
    torch.testing.assert_close(grads[0][:, :1], grads[1][:, :1], rtol=0, atol=0)
    assert grads[0][:, 1:].abs().max() == 0 and grads[1][:, 1:].abs().min() > 0
    assert torch.isfinite(grads[1]).all()  # the decoder's edge bins at t = 0 included


# --- the analytic oracle: Bao et al. 2022 -----------------------------------------------------------
def analytic_dpm_variance(d: Diffusion, data: GaussianData, t: int) -> float:
    """The optimal isotropic reverse variance of a DDPM step t -> t - 1 (Bao et al. 2022, Theorem 1, with
    lambda_t^2 = beta~_t), its score term in closed form for Gaussian data:
    E||grad log q_t(x_t)||^2 / d = tr(C^-1) / d for x_t ~ N(a mu, C), C = a^2 Sigma + (1 - a^2) I."""
    abar, abar_prev = float(d.alphas_cumprod[t]), float(d.alphas_cumprod_prev[t])
    lam2 = float(d.posterior_variance[t])
    cov = abar * data.covs[0] + (1.0 - abar) * torch.eye(data.dim, dtype=F64)
    score2 = float(torch.linalg.inv(cov).trace()) / data.dim
    coef = (math.sqrt(abar_prev) - math.sqrt(1.0 - abar_prev - lam2) * math.sqrt(abar / (1.0 - abar))) ** 2
    return lam2 + coef * (1.0 - abar) / abar * (1.0 - (1.0 - abar) * score2)


def test_fitted_learned_variance_approaches_the_analytic_dpm_optimum():
    """Fit one v per timestep by minimising the hybrid loss of :meth:`Diffusion.training_losses` with the exact
    mean (NARROW's posterior mean): the learned variance must land on Bao et al.'s optimum, which neither of
    DDPM's fixed choices is at the first steps."""
    d = learned(timesteps=100)
    ts = [1, 2, 3, 10, 30, 70]
    n = 4096
    g = torch.Generator().manual_seed(0)
    x0 = NARROW.sample(n * len(ts), g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    t = torch.tensor(ts).repeat_interleave(n)
    exact = NARROW.model(d)
    r = torch.zeros(len(ts), dtype=F64, requires_grad=True)  # the "variance head": one value per timestep
    index = {tv: i for i, tv in enumerate(ts)}
    rows = torch.tensor([index[tv] for tv in t.tolist()])
    model = with_variance(exact, lambda x_t, t_: r[rows, None].expand_as(x_t))
    opt = torch.optim.LBFGS([r], lr=1.0, max_iter=40, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = d.training_losses(model, x0, t=t, eps=eps, vlb_weight=1.0, discrete=False).mean()
        loss.backward()
        return loss

    opt.step(closure)
    for i, tv in enumerate(ts):
        fitted = math.exp(
            float(learned_log_variance(r[i].detach(), d.log_betas[tv], d.posterior_log_variance_clipped[tv]))
        )
        optimum = analytic_dpm_variance(d, NARROW, tv)
        assert fitted == pytest.approx(optimum, rel=0.02), (tv, fitted, optimum)
        if tv <= 3:  # DDPM's two choices are both off by more than 10% here (beta 26% above, beta~ 22-54% below)
            assert (
                abs(float(d.betas[tv]) / optimum - 1) > 0.1 and abs(float(d.posterior_variance[tv]) / optimum - 1) > 0.1
            )


def test_the_optimal_learned_variance_tightens_the_bound():
    """On Gaussian data, a model that outputs Bao et al.'s optimal variance has a lower NLL bound than either
    fixed variance with the same (exact) mean: bits/dim uses the learned variance, the decoder's included."""
    d = learned(timesteps=40)
    exact = NARROW.model(d)
    optimum = torch.tensor([analytic_dpm_variance(d, NARROW, t) for t in range(40)], dtype=F64)
    lo, hi = d.posterior_log_variance_clipped, d.log_betas
    r_table = 2 * (optimum.log() - lo) / (hi - lo) - 1  # the r whose eq. 15 variance is the optimum

    def r_opt(x_t, t):
        return r_table[t][:, None].expand_as(x_t).to(x_t.dtype)

    x0 = NARROW.sample(2000, torch.Generator().manual_seed(5))
    bounds = {}
    for variance in ("learned", "beta", "posterior"):
        out = evaluate.nll_bound(with_variance(exact, r_opt), d, x0, variance=variance, discrete=False,
                                 generator=torch.Generator().manual_seed(6))  # fmt: skip
        bounds[variance] = float(out["total"].mean())
    assert bounds["learned"] < bounds["beta"] - 0.01 and bounds["learned"] < bounds["posterior"] - 0.01, bounds


def test_bits_per_dim_with_the_end_points_is_the_fixed_bound():
    """A learned model with v = 1 (v = 0) scores exactly what the fixed bound with beta (beta~) gives: the KL
    terms and the decoder of ``diffuse eval`` read the learned variance."""
    d, plain = learned(timesteps=30), Diffusion(DiffusionConfig(schedule="cosine", timesteps=30))
    x0 = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0)).double() / 127.5 - 1
    for r, fixed in ((1.0, "beta"), (-1.0, "posterior")):
        ours = evaluate.nll_bound(
            with_variance(GAUSS_IMAGE, constant(r)), d, x0, generator=torch.Generator().manual_seed(1)
        )
        ref = evaluate.nll_bound(GAUSS_IMAGE, plain, x0, variance=fixed, generator=torch.Generator().manual_seed(1))
        for part in ("kl", "decoder", "total"):
            torch.testing.assert_close(ours[part], ref[part], rtol=1e-10, atol=1e-10)


def GAUSS_IMAGE(x_t, t):  # noqa: N802 - a fixed, smooth eps "network" for image-shaped tests
    return 0.3 * torch.tanh(x_t) + 0.001 * t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))


# --- sampling -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [25, 200])
def test_ddpm_with_learned_end_points_is_ddpm_with_fixed_variances(steps):
    """v = 1 samples as variance "beta", v = 0 as "posterior", on the full and on a respaced grid (the betas
    recomputed from alpha_bar on the subsequence, Improved DDPM sec. 4)."""
    d, plain = learned(timesteps=200), Diffusion(DiffusionConfig(schedule="cosine", timesteps=200))
    exact = GAUSS.model(plain)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for r, fixed in ((1.0, "beta"), (-1.0, "posterior")):
        ours = S.ddpm(with_variance(exact, constant(r)), d, x, steps=steps, generator=torch.Generator().manual_seed(1))
        ref = S.ddpm(exact, plain, x, steps=steps, variance=fixed, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # DDIM and DPM-Solver++ take the mean part only
    mixed = with_variance(exact, lambda x_t, t: torch.tanh(x_t))
    torch.testing.assert_close(S.dpmpp(mixed, d, x, steps=10), S.dpmpp(exact, plain, x, steps=10), rtol=0, atol=0)
    torch.testing.assert_close(S.ddim(mixed, d, x, steps=10), S.ddim(exact, plain, x, steps=10), rtol=0, atol=0)


def test_guidance_keeps_the_conditional_variance():
    def model(x_t, t, y):
        eps = torch.where((y == 2)[:, None], torch.ones_like(x_t), -torch.ones_like(x_t))
        return torch.cat([eps, 0.1 * y[:, None].to(x_t.dtype).expand_as(x_t)], dim=1)

    model.null_class = 2
    out = guided(model, torch.tensor([0, 1]), 3.0)(torch.zeros(2, 3), torch.tensor([5, 5]))
    torch.testing.assert_close(out[:, :3], torch.full((2, 3), 1.0 + 3.0 * (-1.0 - 1.0)))  # uncond + w (cond - uncond)
    torch.testing.assert_close(out[:, 3:], torch.tensor([[0.0] * 3, [0.1] * 3]))


# --- importance sampling (sec. 3.3) ------------------------------------------------------------------
def test_importance_sampler_is_uniform_until_every_t_has_its_history_then_follows_the_rms():
    s = ImportanceSampler(4, history=2)
    torch.testing.assert_close(s.probs(), torch.full((4,), 0.25, dtype=F64))
    s.update(torch.tensor([0, 0, 1, 1, 2, 2, 3]), torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0]))
    torch.testing.assert_close(s.probs(), torch.full((4,), 0.25, dtype=F64))  # t = 3 has one loss only
    s.update(torch.tensor([3, 0, 0]), torch.tensor([4.0, 3.0, 4.0]))  # t = 0's ring now holds 3 and 4
    rms = torch.tensor([math.sqrt(12.5), 2.0, 3.0, 4.0], dtype=F64)
    expect = rms / rms.sum() * (1 - 1e-3) + 1e-3 / 4
    torch.testing.assert_close(s.probs(), expect)
    t, w = s.draw(100_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.bincount(t, minlength=4).double() / 1e5, expect, rtol=0, atol=0.01)
    torch.testing.assert_close(w.double(), 1.0 / (4 * expect[t]), rtol=1e-6, atol=0)
    # sum_t p_t w_t f(t) = mean_t f(t): the weighted loss estimates the uniform average without bias
    f = torch.tensor([5.0, -1.0, 2.0, 7.0], dtype=F64)
    assert float((expect * (1.0 / (4 * expect)) * f).sum()) == pytest.approx(float(f.mean()))
    fresh = ImportanceSampler(4, history=2)
    fresh.load_state_tensors(s.state_tensors())
    torch.testing.assert_close(fresh.probs(), s.probs())


# --- diffusers: variance_type="learned_range", both directions, step by step ---------------------------
def test_learned_variance_goes_to_diffusers_and_back_step_by_step(tmp_path):
    """Export a learned-variance model (2C outputs, learned_range), load it in diffusers' DDPMPipeline and back
    in diffuse; our DDPM on the re-imported folder and DDPMScheduler on diffusers' U-Net agree at every step."""
    diffusers = pytest.importorskip("diffusers")
    from diffuse_cli.engine.unet import UNet

    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), dropout=0.0, learned_variance=True)  # fmt: skip
    torch.manual_seed(0)
    model = UNet(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    src = ckpt.save(tmp_path / "m.safetensors", model.state_dict(), kind="model", model=cfg.to_dict(),
                    diffusion=DiffusionConfig(timesteps=50, variance="learned").to_dict())  # fmt: skip
    models.export(src, tmp_path / "out")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.unet.config.out_channels == 2 and pipe.scheduler.config.variance_type == "learned_range"
    ours, diffusion, _ = models.load_for_sampling(tmp_path / "out")  # the diffusers folder, read back
    assert diffusion.learned_variance and ours.config.learned_variance

    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = S.timestep_grid(diffusion, 10, "logsnr")  # ends at t = 0, where neither adds noise
    frames = []
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x_T, 17).sample, model(x_T, torch.full((4,), 17)), rtol=1e-4, atol=1e-5)
        out = S.ddpm(ours, diffusion, x_T, steps=10, spacing="logsnr", clip_x0=False,
                     generator=torch.Generator().manual_seed(2), callback=lambda s: frames.append(s["x_t"]))  # fmt: skip
        sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        sched.set_timesteps(timesteps=grid.tolist())
        x, gen = x_T, torch.Generator().manual_seed(2)
        for i, t in enumerate(sched.timesteps):
            torch.testing.assert_close(x, frames[i], rtol=1e-4, atol=1e-4)
            x = sched.step(pipe.unet(x, t).sample, t, x, generator=gen).prev_sample
    torch.testing.assert_close(x, out, rtol=1e-4, atol=1e-4)
    assert (frames[-1] - frames[0]).abs().max() > 0.1  # the samples moved


# --- training ------------------------------------------------------------------------------------------
def test_training_a_learned_variance_stores_it_and_resumes_bit_exactly(tmp_path):
    """`train` with variance "learned" builds the 2C-output U-Net, stores the setting so loading needs no flags,
    and with importance-sampled t (T = 4, so p_t leaves the uniform warm-up within the run) a resumed run
    equals an uninterrupted one: the sampler's history travels in the training state."""
    from diffuse_cli.engine import training
    from diffuse_cli.engine.data import load_dataset

    digits = load_dataset("builtin:digits")
    model_cfg = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), dropout=0.0)  # fmt: skip
    diff_cfg = DiffusionConfig(schedule="cosine", timesteps=4, variance="learned")

    def run(out, steps, resume=False):
        cfg = TrainConfig(steps=steps, batch_size=8, save_every=4, sample_every=0, log_every=1, warmup=2,
                          timestep_sampling="importance")  # fmt: skip
        return training.train(digits, out, None if resume else model_cfg, None if resume else diff_cfg, cfg,
                              device="cpu", resume=resume)  # fmt: skip

    run(tmp_path / "full", 8)
    run(tmp_path / "half", 4)
    run(tmp_path / "half", 8, resume=True)
    a = ckpt.load(tmp_path / "full" / "checkpoints" / "state-00000008.safetensors")
    b = ckpt.load(tmp_path / "half" / "checkpoints" / "state-00000008.safetensors")
    assert int(a.tensors["importance.count"].min()) >= 10  # every t has its history: p_t is no longer uniform
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    model, diffusion, ck = models.load_for_sampling(tmp_path / "full")
    assert ck.diffusion["variance"] == "learned" and ck.model["learned_variance"] and diffusion.learned_variance
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 3])).shape == (2, 2, 8, 8)
    x = S.ddpm(model, diffusion, torch.randn(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


# --- the command line ------------------------------------------------------------------------------------
def test_cli_trains_samples_evaluates_and_exports_a_learned_variance_without_further_flags(tmp_path):
    out = tmp_path / "run"
    r = run("train", "builtin:digits", "--out", out, *TINY_TRAIN, "--timesteps", 50, "--variance", "learned",
            "--timestep-sampling", "importance", "--classes", "none")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run("sample", out, "--sampler", "ddpm", "--steps", 5, "--num", 2, "--out", tmp_path / "imgs", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 2
    r = run("eval", out, "builtin:digits", "-n", 8, "--no-fd", "--terms", 3, "--format", "json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["nll"]["variance"] == "learned"
    r = run("export", out, tmp_path / "exported")
    assert r.exit_code == 0, r.output
    sched = json.loads((tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["variance_type"] == "learned_range"
    assert json.loads((tmp_path / "exported" / "unet" / "config.json").read_text())["out_channels"] == 2


def test_cli_refuses_importance_sampling_without_a_learned_variance(tmp_path):
    r = run("train", "builtin:digits", "--out", tmp_path / "r", *TINY_TRAIN, "--timestep-sampling", "importance")
    assert "--variance learned" in one_line_error(r, 2)
    r = run("eval", tmp_path / "none", "builtin:digits", "--variance", "wide")
    assert "wide" in one_line_error(r, 2)
