"""Samplers on a real trained network (issue #16), where the analytic tests cannot look.

An exact model's x0 never needs clipping; a trained network's eps error near pure noise is
amplified ~156x in x0 at t = T - 1, and how a sampler clips that decides whether samples are
digits or saturated noise. tests/data/digits16-tiny-eps.safetensors is a 0.7 MB U-Net trained
for 400 steps on the built-in digits at 16x16 by scripts/make_sampler_test_model.py. It is
weak, which is the point: with the pre-#16 clipping ("rederive", eps re-derived from the
clipped x0) about a third of its samples are speckled noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffuse_cli.engine import models
from diffuse_cli.engine import samplers as S
from diffuse_cli.engine.data import from_model_range

CHECKPOINT = Path(__file__).parent / "data" / "digits16-tiny-eps.safetensors"
SPECKLE = 60.0  # mean |horizontal neighbour difference| on 0..255; real 16x16 digits: 20-30


@pytest.fixture(scope="module")
def trained():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, diffusion, _ = models.load_for_sampling(CHECKPOINT)

    @torch.no_grad()
    def net(x, t):
        return model(x, t)

    yield net, diffusion
    torch.set_num_threads(before)


def noise16(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed))


def speckled(x: torch.Tensor) -> float:
    """Fraction of samples that are saturated pixel noise rather than strokes."""
    u8 = from_model_range(x).float()
    return float(((u8[..., 1:] - u8[..., :-1]).abs().flatten(1).mean(1) > SPECKLE).float().mean())


def test_ddim_matches_diffusers_step_by_step(trained):
    """Our DDIM with diffusers' settings (trailing grid = our "uniform", clip_sample = our default clipping)
    against diffusers' DDIMScheduler on the same network, x_T and grid.

    Each of our steps is compared with diffusers' step from the same state (tolerance 2e-5: diffusers
    keeps alpha_bar in float32, we use float64), then the whole trajectories (2e-4, the float32 network
    amplifying float32 rounding over 50 steps). The pre-#16 clipping was 0.3 off after the first step.
    """
    diffusers = pytest.importorskip("diffusers")
    net, d = trained
    x = noise16(8)
    sched = diffusers.DDIMScheduler(num_train_timesteps=d.num_timesteps, trained_betas=d.betas.numpy(),
                                    prediction_type="epsilon", timestep_spacing="trailing", clip_sample=True,
                                    set_alpha_to_one=True)  # fmt: skip
    sched.set_timesteps(50)
    grid = S.timestep_grid(d, 50, "uniform")
    assert sched.timesteps.tolist() == grid.tolist()
    states: list[torch.Tensor] = []
    ours = S.ddim(net, d, x, steps=50, spacing="uniform", callback=lambda c: states.append(c["x_t"]))
    states.append(ours)
    for i, t in enumerate(sched.timesteps):
        theirs = sched.step(net(states[i], torch.full((8,), int(t))), t, states[i]).prev_sample
        torch.testing.assert_close(states[i + 1], theirs, rtol=0, atol=2e-5, msg=f"step {i} (t = {int(t)})")
    y = x
    for t in sched.timesteps:
        y = sched.step(net(y, torch.full((8,), int(t))), t, y).prev_sample
    torch.testing.assert_close(ours, y, rtol=0, atol=2e-4)


def test_the_old_clipping_speckles_this_model(trained):
    """The model exhibits the failure, so the next test can fail (issue #16's 12-22%)."""
    net, d = trained
    assert speckled(S.dpmpp(net, d, noise16(32), clip_x0="rederive")) >= 0.1


@pytest.mark.parametrize("sampler", ["dpmpp", "ddim"])
def test_default_samplers_make_no_speckled_noise(trained, sampler):
    net, d = trained
    out = S.sample(net, d, noise16(32), sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    assert speckled(out) == 0.0


@pytest.mark.slow
def test_default_ddpm_makes_no_speckled_noise(trained):
    net, d = trained
    out = S.sample(net, d, noise16(32), sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert speckled(out) == 0.0


def test_clipping_keeps_the_network_eps_at_the_noisy_end(trained):
    """At t = T - 1 the clipped x0 is far from the raw one (eps errors amplified 1 / sqrt(abar)); the
    default keeps the network's eps, so the next DDIM state moves by sqrt(abar_s) times the clipping only."""
    net, d = trained
    x = noise16(8)
    states: list[torch.Tensor] = []
    S.ddim(net, d, x, steps=50, callback=lambda c: states.append(c["x_t"]))
    t, s = S.timestep_grid(d, 50, S.DEFAULT_SPACING["ddim"])[:2].tolist()
    abar_t, abar_s = float(d.alphas_cumprod[t]), float(d.alphas_cumprod[s])
    eps = net(x, torch.full((8,), t))
    x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    assert (x0.abs() > 1).float().mean() > 0.1  # clipping matters here
    expected = math.sqrt(abar_s) * x0.clamp(-1, 1) + math.sqrt(1 - abar_s) * eps
    torch.testing.assert_close(states[1], expected, rtol=0, atol=1e-5)
