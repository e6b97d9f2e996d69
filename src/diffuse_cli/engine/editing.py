"""Editing with a trained DDPM and no retraining: inpainting, image-to-image, interpolation.

Plain functions over any model callable ``model(x_t, t)``, like :mod:`samplers` (same timestep
convention: ``t`` in ``[0, T)``, images (B, C, H, W) in [-1, 1]; every random draw comes from the
injected generator(s), one per image allowed):

- :func:`repaint`: inpainting by RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using
  Denoising Diffusion Probabilistic Models", Algorithm 1 and sec. 4.2). At each reverse step the
  pixels to keep are drawn from the forward process q(x_t | x_0) of the known image (Ho et al.
  2020, eq. 4) and the others from the model's reverse step (Ho et al. 2020, Algorithm 2); going
  back up ``jump_length`` steps with q(x_t | x_{t-1}) (eq. 2) and down again, ``resamplings``
  times in all, lets the generated part agree with the known part. The last step lands on clean
  data, where the known pixels are the input's exactly.
- :func:`sdedit`: image-to-image by SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis
  and Editing with Stochastic Differential Equations", Algorithm 1): noise the image to
  t0 = S T with q(x_t0 | x_0) and run any sampler from there (``samplers.sample(..., start=)``).
- :func:`interpolate`: between two images as in Ho et al. 2020, sec. 4.3 and fig. 8 (noise both
  to t with q, mix linearly, denoise), or deterministically by DDIM inversion (Song et al. 2021,
  sec. 4.3 / eq. 12 run backwards) of both to x_T and spherical interpolation of the two x_T.

Watching x0 emerge (Ho et al. 2020, fig. 6) needs nothing here: every sampler reports the
predicted x0 beside x_t through its callback (``generate.Trajectory`` records them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import samplers
from .config import (
    DEFAULT_INTERPOLATION_STRENGTH,
    DEFAULT_JUMP_LENGTH,
    DEFAULT_REPAINT_STEPS,
    DEFAULT_RESAMPLINGS,
    DEFAULT_STRENGTH,
    FIXED_VARIANCES,
    INTERPOLATIONS,
)
from .diffusion import Diffusion
from .errors import ConfigError
from .schedules import MAX_TIMESTEPS

__all__ = [
    "DEFAULT_INTERPOLATION_STRENGTH", "DEFAULT_JUMP_LENGTH", "DEFAULT_REPAINT_STEPS", "DEFAULT_RESAMPLINGS",
    "DEFAULT_STRENGTH", "INTERPOLATIONS", "check_frames", "check_strength", "ddim_invert", "interpolate",
    "jump_schedule", "repaint", "repaint_calls", "sdedit", "sdedit_start", "slerp",
]  # fmt: skip

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


# --- shared checks ------------------------------------------------------------------------
def check_strength(strength) -> float:
    """``strength`` as a float in [0, 1], or ConfigError."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ConfigError(f"--strength must be between 0 and 1 (0 returns the image, 1 ignores it; got {strength!r})")
    return float(strength)


MAX_RESAMPLINGS = 1000  # RePaint used r = 10 or 20; beyond this a run would never end (the schedule is a list)
MAX_FRAMES = 1000  # an interpolation strip or GIF longer than this is no longer a picture


def _positive(name: str, value, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1 (got {value!r})")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {most} (got {value})")
    return value


def _noise(shape, generator: Generators, like: torch.Tensor) -> torch.Tensor:
    return samplers.noise_like(shape, generator, like.device, like.dtype)


# --- SDEdit -------------------------------------------------------------------------------
def sdedit_start(diffusion: Diffusion, strength: float, steps: int) -> tuple[int, int] | None:
    """(t0, steps) for an edit of strength S: t0 = round(S T) - 1 and round(S steps) steps (at least 1).

    ``steps`` is what the sampler would take from pure noise; an edit runs the share S of them, as
    the image already supplies the rest. None for S = 0: nothing to denoise.
    """
    strength = check_strength(strength)
    if strength == 0.0:
        return None
    T = diffusion.num_timesteps
    t0 = min(T - 1, max(0, round(strength * T) - 1))
    return t0, min(t0 + 1, max(1, round(strength * steps)))


@torch.no_grad()
def sdedit(
    model: Model,
    diffusion: Diffusion,
    x0: torch.Tensor,
    strength: float,
    *,
    sampler: str = samplers.DEFAULT_SAMPLER,
    steps: int | None = None,
    noise: torch.Tensor | None = None,
    generator: Generators = None,
    callback=None,
    **options,
) -> torch.Tensor:
    """SDEdit (Meng et al. 2022, Algorithm 1): x_t0 ~ q(x_t0 | x0) with t0 = S T, then ``sampler`` down to t = 0.

    S = 0 returns ``x0`` unchanged; S = 1 starts from ``noise`` alone (the image is ignored) and
    is exactly ``samplers.sample`` from that noise. ``noise`` (default: drawn from ``generator``)
    is the eps of q(x_t0 | x0) = sqrt(abar) x0 + sqrt(1 - abar) eps (Ho et al. 2020, eq. 4);
    ``generator`` then drives the sampler's own draws. ``steps`` is the sampler's count from
    pure noise (None: its default), of which the edit takes the share S.
    """
    plan = sdedit_start(
        diffusion, strength, steps if steps is not None else samplers.default_steps(sampler, diffusion.num_timesteps)
    )
    if plan is None:
        return x0.clone()
    t0, n = plan
    if noise is None:
        noise = _noise(x0.shape, generator, x0)
    if strength == 1.0:
        x_t = noise
    else:
        abar = float(diffusion.alphas_cumprod[t0])
        x_t = math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise.to(x0.dtype)
    return samplers.sample(
        model, diffusion, x_t, sampler=sampler, steps=n, start=t0, generator=generator, callback=callback, **options
    )


# --- RePaint ------------------------------------------------------------------------------
def jump_schedule(steps: int, jump_length: int, resamplings: int) -> list[int]:
    """The levels RePaint visits on a grid of ``steps`` points: 0 (the grid's first, noisiest point) to ``steps`` (clean).

    Consecutive levels differ by one: +1 is a reverse (denoising) step, -1 a forward one. Every
    ``jump_length`` levels counted back from the clean end, once at least ``jump_length`` levels
    lie above, the walk goes back up ``jump_length`` levels and down again, ``resamplings - 1``
    times (RePaint's time schedule, Lugmayr et al. 2022, sec. 4.2, with its j and r; r = 1 is
    plain reverse diffusion). So there are about ``resamplings * steps`` reverse steps in all.
    """
    steps = _positive("--steps", steps, MAX_TIMESTEPS)  # a grid finer than any T: refused before it is built
    jump_length = _positive("--jump", jump_length)
    resamplings = _positive("--resample", resamplings, MAX_RESAMPLINGS)
    left = {level: resamplings - 1 for level in range(steps - 1, jump_length - 1, -jump_length)}
    level, path = 0, [0]
    while level < steps:
        level += 1
        path.append(level)
        if left.get(level, 0) > 0:
            left[level] -= 1
            path.extend(range(level - 1, level - jump_length - 1, -1))
            level -= jump_length
    return path


def repaint_calls(steps: int, jump_length: int, resamplings: int) -> int:
    """Model evaluations of one :func:`repaint` run: its reverse steps."""
    path = jump_schedule(steps, jump_length, resamplings)
    return sum(b > a for a, b in zip(path, path[1:], strict=False))


def _check_keep(keep: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``keep`` as a bool tensor that broadcasts against x0: True where the pixel is known."""
    keep = torch.as_tensor(keep, device=x0.device)
    try:
        torch.broadcast_shapes(keep.shape, x0.shape)
    except RuntimeError as err:
        raise ConfigError(f"mask of shape {tuple(keep.shape)} does not fit images of shape {tuple(x0.shape)}") from err
    if keep.dtype != torch.bool:
        if bool(((keep != 0) & (keep != 1)).any()):
            raise ConfigError("the mask must be 0 (fill in) or 1 (keep) everywhere")
        keep = keep != 0
    return keep


@torch.no_grad()
def repaint(
    model: Model,
    diffusion: Diffusion,
    x0: torch.Tensor,
    keep: torch.Tensor,
    x_T: torch.Tensor | None = None,
    *,
    steps: int = DEFAULT_REPAINT_STEPS,
    jump_length: int = DEFAULT_JUMP_LENGTH,
    resamplings: int = DEFAULT_RESAMPLINGS,
    variance: str = samplers.DEFAULT_VARIANCE,
    spacing: str = samplers.DEFAULT_SPACING["ddpm"],
    generator: Generators = None,
    clip_x0: bool | str = True,
    callback=None,
) -> torch.Tensor:
    """RePaint inpainting (Lugmayr et al. 2022, Algorithm 1) on a respaced grid of ``steps`` timesteps.

    ``x0`` (B, C, H, W) is the image in [-1, 1]; ``keep`` (broadcasting against it, bool or 0/1)
    is True where a pixel is known and kept. The walk of :func:`jump_schedule` goes through the
    levels of ``samplers.timestep_grid(diffusion, steps, spacing)`` (abar of the clean level = 1):

    - down one level t -> s: unknown pixels by the respaced ancestral step
      (``samplers.ddpm_step``: DDPM eq. 7 with beta_{t,s} = 1 - abar_t / abar_s), known pixels
      x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps (DDPM eq. 4), the two joined by the mask;
    - up one level s -> t: x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) eps
      (the respaced DDPM eq. 2), all pixels.

    The walk ends on clean data, where the known pixels are ``x0``'s exactly. ``x_T`` is the
    starting noise (default: drawn from ``generator``); ``callback`` gets ``samplers``' dict at
    each model call, with ``steps`` = :func:`repaint_calls`.
    """
    keep = _check_keep(keep, x0)
    path = jump_schedule(steps, jump_length, resamplings)
    grid = samplers.timestep_grid(diffusion, steps, spacing)
    abars = samplers._alphas_cumprod(diffusion, grid) + [1.0]
    clip = samplers._clip_mode(clip_x0)
    if variance not in FIXED_VARIANCES:
        raise ConfigError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(FIXED_VARIANCES)}")
    calls = sum(b > a for a, b in zip(path, path[1:], strict=False))
    x = _noise(x0.shape, generator, x0) if x_T is None else x_T.to(x0.dtype)
    i = 0
    for a, b in zip(path, path[1:], strict=False):
        if b < a:  # back up one level: q(x_t | x_s) of the respaced chain
            r = abars[b] / abars[a]
            x = math.sqrt(r) * x + math.sqrt(1.0 - r) * _noise(x.shape, generator, x)
            continue
        t = int(grid[a])
        x_in = x
        x, x0_pred, _, _ = samplers._denoise(model, diffusion, x, t, abars[a], clip)
        samplers._report(callback, i, calls, t, x_in, x0_pred)
        i += 1
        unknown = samplers.ddpm_step(x, x0_pred, abars[a], abars[b], variance, generator)
        if b == len(grid):
            known = x0
        else:
            known = math.sqrt(abars[b]) * x0 + math.sqrt(1.0 - abars[b]) * _noise(x.shape, generator, x)
        x = torch.where(keep, known, unknown)
    return x


# --- interpolation ------------------------------------------------------------------------
def slerp(a: torch.Tensor, b: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per row: sin((1 - f) w) / sin w a + sin(f w) / sin w b, w the angle between a and b.

    ``a``, ``b`` (C, H, W); ``frac`` (N,) -> (N, C, H, W). Falls back to linear when a and b are
    (nearly) parallel. Between two Gaussian x_T it keeps the norm a linear mix would shrink.
    """
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = (fa @ fb / (fa.norm() * fb.norm())).clamp(-1.0, 1.0)
    w = torch.arccos(cos)
    f = frac.double().reshape(-1, 1, 1, 1)
    if float(w.sin()) < 1e-6:
        out = (1.0 - f) * a.double() + f * b.double()
    else:
        out = (torch.sin((1.0 - f) * w) * a.double() + torch.sin(f * w) * b.double()) / w.sin()
    return out.to(a.dtype)


@torch.no_grad()
def ddim_invert(
    model: Model,
    diffusion: Diffusion,
    x0: torch.Tensor,
    *,
    steps: int = samplers.DEFAULT_STEPS["ddim"],
    spacing: str = samplers.DEFAULT_SPACING["ddim"],
    callback=None,
) -> torch.Tensor:
    """DDIM inversion: x0 -> x_T by the deterministic DDIM step (Song et al. 2021, eq. 12, eta = 0) run backwards.

    On the grid of ``samplers.ddim`` (same ``steps`` and ``spacing``) from clean data up to
    grid[0]: x_t = sqrt(abar_t) x0_pred + sqrt(1 - abar_t) eps, with (x0_pred, eps) the model's
    at the level below (at the clean level, at grid[-1]). No clipping, so that ``samplers.ddim``
    with ``clip_x0=False`` on the same grid retraces the path (exactly as steps grow).
    """
    grid = samplers.timestep_grid(diffusion, steps, spacing)
    abars = samplers._alphas_cumprod(diffusion, grid)
    n = len(grid)
    x = x0
    for k in range(n):
        j = n - 1 - k  # the level this step reaches; it starts from level j + 1 (clean data for k = 0)
        if k == 0:
            _, _, eps, _ = samplers._denoise(model, diffusion, x, int(grid[-1]), abars[-1], "none")
            x0_pred = x0  # at the clean level x0 is known; only eps comes from the model
        else:
            _, x0_pred, eps, _ = samplers._denoise(model, diffusion, x, int(grid[j + 1]), abars[j + 1], "none")
        samplers._report(callback, k, n, int(grid[j]), x, x0_pred)
        x = math.sqrt(abars[j]) * x0_pred + math.sqrt(1.0 - abars[j]) * eps  # DDIM eq. 12, eta = 0
    return x


def check_frames(frames) -> int:
    if isinstance(frames, bool) or not isinstance(frames, int) or not 2 <= frames <= MAX_FRAMES:
        raise ConfigError(f"--frames must be between 2 and {MAX_FRAMES} (got {frames!r})")
    return frames


@torch.no_grad()
def interpolate(
    model: Model,
    diffusion: Diffusion,
    a: torch.Tensor,
    b: torch.Tensor,
    frames: int = 8,
    *,
    method: str = "ddim",
    strength: float = DEFAULT_INTERPOLATION_STRENGTH,
    sampler: str = samplers.DEFAULT_SAMPLER,
    steps: int | None = None,
    seed: int = 0,
    clip_x0: bool | str = True,
    callback=None,
) -> torch.Tensor:
    """``frames`` images from ``a`` to ``b`` (each (C, H, W) in [-1, 1]): (frames, C, H, W).

    - ``noise`` (Ho et al. 2020, sec. 4.3, fig. 8): x_t = q(x_t | a) and x'_t = q(x_t | b) at
      t = ``strength`` T, each frame denoises (1 - f) x_t + f x'_t from t with ``sampler``;
      every frame gets the same random stream (seeded by ``seed``), so the reverse process's
      noise is fixed across f, as in the paper. The end frames are reconstructions of a and b.
    - ``ddim``: :func:`ddim_invert` both to x_T, :func:`slerp`, and decode with deterministic
      DDIM on the same grid (``steps``, default DDIM's); no randomness at all.
    """
    frames = check_frames(frames)
    if method not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {method!r}; choose one of {', '.join(INTERPOLATIONS)}")
    if a.shape != b.shape:
        raise ConfigError(f"the two images differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    frac = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    if method == "ddim":
        n = steps if steps is not None else samplers.default_steps("ddim", diffusion.num_timesteps)
        ends = ddim_invert(model, diffusion, torch.stack([a, b]), steps=n)
        x_T = slerp(ends[0], ends[1], frac)
        return samplers.ddim(model, diffusion, x_T, steps=n, clip_x0=clip_x0, callback=callback)
    n = steps if steps is not None else samplers.default_steps(sampler, diffusion.num_timesteps)
    t0, n = sdedit_start(diffusion, check_strength(strength), n) or (0, 1)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    eps = _noise((2, *a.shape), gen, a)
    abar = float(diffusion.alphas_cumprod[t0])
    ends = math.sqrt(abar) * torch.stack([a, b]) + math.sqrt(1.0 - abar) * eps
    f = frac.to(a.dtype).reshape(-1, 1, 1, 1).to(a.device)
    x_t = (1.0 - f) * ends[0] + f * ends[1]
    gens = [torch.Generator(device=a.device).manual_seed(seed + 1) for _ in range(frames)]
    return samplers.sample(
        model, diffusion, x_t, sampler=sampler, steps=n, start=t0, generator=gens, clip_x0=clip_x0, callback=callback
    )
