"""Log-densities and KL divergences of diagonal Gaussians: the pieces of DDPM's variational bound.

Shared by the bound that ``diffuse eval`` reports (:mod:`.evaluate`) and the L_vlb term of the hybrid
loss that trains a learned variance (:meth:`.diffusion.Diffusion.vlb_terms`). All per element, in nats.
"""

from __future__ import annotations

import math

import torch

_FAR = 1e4  # standard deviations: "infinitely" far for a Gaussian in float64


def _normal_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return normal_kl_log(mean1, torch.log(var1), mean2, torch.log(var2))


def normal_kl_log(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats, from log-variances.

    The form improved-diffusion uses (``normal_kl``): stable for the tiny variances near t = 0, and its
    gradient with respect to a learned log-variance needs no division by a variance.
    """
    return 0.5 * (
        log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0
    )


def _log_normal_bin(lo: torch.Tensor, hi: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log P(lo < X < hi) for X ~ N(mean, std^2), accurate in both tails (float64)."""
    # An infinite end as a far finite one: the same value in float64 (Phi(-1e4) underflows to 0), but
    # finite gradients (inf / std and log_ndtr at -inf give NaN ones), which the learned variance's loss needs.
    lo_inf, hi_inf = torch.isinf(lo), torch.isinf(hi)
    a = torch.where(lo_inf, -_FAR, (torch.where(lo_inf, mean, lo) - mean) / std)
    b = torch.where(hi_inf, _FAR, (torch.where(hi_inf, mean, hi) - mean) / std)
    flip = (a + b) > 0  # use the tail nearer the interval: P(a < Z < b) = P(-b < Z < -a)
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return log_b + torch.log1p(-torch.exp(log_a - log_b).clamp(max=1.0 - 1e-16))


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log p(x0) under Ho et al. 2020 eq. 13 per element: x0 holds 8-bit values scaled to [-1, 1]."""
    half_bin = 1.0 / 255.0
    inf = torch.full_like(x0, math.inf)
    lo = torch.where(x0 < -1.0 + 1e-3, -inf, x0 - half_bin)
    hi = torch.where(x0 > 1.0 - 1e-3, inf, x0 + half_bin)
    return _log_normal_bin(lo, hi, mean, torch.exp(0.5 * log_var))


def _gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 / torch.exp(log_var))
