"""Beta schedules: pure functions returning float64 tensors of shape (T,).

Timestep convention (used everywhere in diffuse): ``t`` is an integer in
``[0, T)``. ``betas[t]`` is the variance of the noise added by step ``t``, so
``t = 0`` already carries one step of noise and ``t = T - 1`` is the last,
noisiest step (x_T in Ho et al. 2020). The paper counts 1..T; its x_t is our
index ``t - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import DEFAULT_BETA_END, DEFAULT_BETA_START, DEFAULT_TIMESTEPS
from .errors import ConfigError

#: Nichol & Dhariwal (2021) eq. 17: the small offset s keeps beta_0 from being tiny.
COSINE_S = 0.008
#: Nichol & Dhariwal (2021): betas above 0.999 cause singularities near t = T.
MAX_BETA = 0.999
#: A sanity cap on T: 100x DDPM's 1000 is far past any use, and it stops a typo (-T 1000000000) from
#: allocating gigabytes of coefficient tables.
MAX_TIMESTEPS = 100_000


def _check_timesteps(timesteps: int) -> None:
    if int(timesteps) != timesteps or not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ConfigError(f"timesteps must be an integer in [1, {MAX_TIMESTEPS}] (got {timesteps})")


def _check_common(timesteps: int, beta_start: float, beta_end: float) -> None:
    _check_timesteps(timesteps)
    if not (0.0 < beta_start < beta_end < 1.0):
        raise ConfigError(f"need 0 < beta_start < beta_end < 1 (got beta_start={beta_start:g}, beta_end={beta_end:g})")


def linear(timesteps: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END) -> torch.Tensor:
    """Linear betas from ``beta_start`` to ``beta_end`` (Ho et al. 2020)."""
    _check_common(timesteps, beta_start, beta_end)
    if timesteps == 1:
        return torch.tensor([beta_end], dtype=torch.float64)
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def quadratic(
    timesteps: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END
) -> torch.Tensor:
    """Betas linear in sqrt(beta) between the endpoints (sometimes called "binomial")."""
    _check_common(timesteps, beta_start, beta_end)
    if timesteps == 1:
        return torch.tensor([beta_end], dtype=torch.float64)
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), timesteps, dtype=torch.float64) ** 2


def cosine_alpha_bar(u: torch.Tensor, s: float = COSINE_S) -> torch.Tensor:
    """alpha_bar at continuous time u = t/T in [0, 1]: f(u)/f(0), f(u) = cos^2(((u + s)/(1 + s)) pi/2).

    Nichol & Dhariwal (2021), "Improved DDPM", eq. 17.
    """
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine(timesteps: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021): beta_t = 1 - abar((t+1)/T) / abar(t/T), clipped at 0.999.

    ``beta_start``/``beta_end`` are accepted for a uniform signature but not used.
    """
    _check_timesteps(timesteps)
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    abar = cosine_alpha_bar(u)
    betas = 1.0 - abar[1:] / abar[:-1]
    return betas.clamp(max=MAX_BETA)


def sigmoid(timesteps: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END) -> torch.Tensor:
    """Sigmoid schedule: beta_t = beta_start + (beta_end - beta_start) sigmoid(linspace(-6, 6, T)).

    The shape follows GeoDiff (Xu et al. 2022). This is diffusers' ``beta_schedule="sigmoid"``
    exactly, so a checkpoint trained with either names the same betas. The sigmoid is not rescaled:
    the ends sit at sigmoid(-6) ~ 0.25% and sigmoid(6) ~ 99.75% of the way from beta_start to
    beta_end, not on them. (diffuse 0.1.0 min-max scaled the sigmoid onto the endpoints; its
    sigmoid checkpoints now sample with betas up to 0.5% different.)
    """
    _check_common(timesteps, beta_start, beta_end)
    s = torch.sigmoid(torch.linspace(-6.0, 6.0, timesteps, dtype=torch.float64))
    return beta_start + s * (beta_end - beta_start)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear,
    "quadratic": quadratic,
    "cosine": cosine,
    "sigmoid": sigmoid,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar at the last step is exactly 0.

    Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: sqrt(abar) is shifted so its last value is 0 and scaled so its
    first value is unchanged; betas are then re-derived. The last beta becomes 1.
    """
    sqrt_abar = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    if first - last <= 0:
        raise ConfigError("cannot rescale to zero terminal SNR: alpha_bar does not decrease")
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_betas(
    kind: str,
    timesteps: int = DEFAULT_TIMESTEPS,
    beta_start: float = DEFAULT_BETA_START,
    beta_end: float = DEFAULT_BETA_END,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Look a schedule up by name and return its float64 betas, shape (T,)."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    betas = SCHEDULES[kind](timesteps, beta_start, beta_end)
    if zero_terminal_snr:
        if timesteps < 2:
            raise ConfigError("zero terminal SNR needs at least 2 timesteps")
        betas = rescale_zero_terminal_snr(betas)
    return betas
