"""The Gaussian diffusion process of DDPM (Ho et al. 2020).

Everything is derived once, in float64, from the betas of a schedule:

    alpha_t     = 1 - beta_t
    alpha_bar_t = prod_{s <= t} alpha_s
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)            (DDPM eq. 4)
    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                     (DDPM eq. 2)
    q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)                                  (DDPM eqs. 6-7)

Timestep convention: ``t`` is an int64 tensor with values in ``[0, T)``; ``t = 0``
already has one step of noise (beta_0), ``t = T - 1`` is the noisiest step. The
"previous" step of ``t = 0`` is the clean image x_0 itself (alpha_bar_{-1} = 1).

Shapes: ``x0``, ``x_t``, ``eps``, ``v`` are (B, ...); ``t`` is (B,). Coefficients
are looked up per sample and broadcast by :meth:`Diffusion._coef`.

Learned variance (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models",
"Improved DDPM"). With ``variance="learned"`` the network outputs 2C channels: the usual
prediction (eps, x0 or v) and, per element, a value r whose v = (r + 1) / 2 interpolates the
reverse variance in log space between DDPM's two choices (their eq. 15):

    Sigma_theta(x_t, t) = exp(v log beta_t + (1 - v) log beta~_t)

It is trained with L_hybrid = L_simple + lambda L_vlb (their sec. 3.1, lambda = 0.001), the mean
held fixed (stop-gradient) in L_vlb, so L_simple alone trains the mean as in DDPM.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import schedules
from .config import DEFAULT_VLB_WEIGHT, PREDICTIONS, REVERSE_VARIANCES, WEIGHTINGS, DiffusionConfig
from .errors import ConfigError
from .gaussians import _gaussian_log_density, discretized_gaussian_log_likelihood, normal_kl_log


def learned_log_variance(r: torch.Tensor, log_beta, log_beta_tilde) -> torch.Tensor:
    """log Sigma = v log beta + (1 - v) log beta~ with v = (r + 1) / 2 (Nichol & Dhariwal 2021, eq. 15).

    ``r`` is the network's variance output (a zero-initialised output layer starts at v = 1/2, the
    geometric mean); it is not clamped, as in the paper. ``log_beta`` and ``log_beta_tilde`` are
    floats (a sampler's respaced step) or tensors that broadcast against ``r``.
    """
    v = (r + 1.0) * 0.5
    return v * log_beta + (1.0 - v) * log_beta_tilde


def split_output(out: torch.Tensor, learned: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance output r or None): a learned-variance network's 2C channels are [prediction, r]."""
    if not learned:
        return out, None
    pred, r = out.chunk(2, dim=1)
    return pred, r


def to_x0_eps(kind: str, pred: torch.Tensor, x_t: torch.Tensor, a, s) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a network output ``pred`` of kind eps, x0 or v at ``x_t``: the one place this algebra lives.

    ``a = sqrt(abar_t)`` and ``s = sqrt(1 - abar_t)`` are floats or tensors that broadcast against
    x_t, so the samplers (float64 scalars per step) and training (per-sample tables) share it.
    From x_t = a x0 + s eps and v = a eps - s x0 (Salimans & Ho 2022, sec. 4):

        eps:  x0 = (x_t - s eps) / a
        x0:   eps = (x_t - a x0) / s                      (s > 0 for every t in [0, T))
        v:    x0 = a x_t - s v,   eps = s x_t + a v

    At a = 0 (zero terminal SNR) an eps prediction says nothing about x0; we return x0 = 0
    there, the limit of (x_t - s eps) / a when eps = x_t, to stay finite.
    """
    if kind == "eps":
        if isinstance(a, torch.Tensor):
            x0 = torch.where(a > 0, (x_t - s * pred) / a.clamp(min=torch.finfo(a.dtype).tiny), torch.zeros_like(x_t))
        else:
            x0 = (x_t - s * pred) / a if a > 0 else torch.zeros_like(x_t)
        return x0, pred
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind == "v":
        return a * x_t - s * pred, s * x_t + a * pred
    raise ConfigError(f"unknown prediction {kind!r}; choose one of {', '.join(PREDICTIONS)}")


def from_x0_eps(kind: str, x0: torch.Tensor, eps: torch.Tensor, a, s) -> torch.Tensor:
    """The network output of kind eps, x0 or v that (x0, eps) correspond to: the inverse of :func:`to_x0_eps`."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return a * eps - s * x0
    raise ConfigError(f"unknown prediction {kind!r}; choose one of {', '.join(PREDICTIONS)}")


class Diffusion:
    """Coefficient tables of one schedule, and the distributions they define.

    All tables are float64 tensors of shape (T,). :meth:`to` moves them to a
    device once, so per-step lookups never synchronise with the host.
    """

    def __init__(self, config: DiffusionConfig | None = None, betas: torch.Tensor | None = None):
        self.config = config or DiffusionConfig()
        if betas is None:
            c = self.config
            betas = schedules.make_betas(c.schedule, c.timesteps, c.beta_start, c.beta_end, c.zero_terminal_snr)
        betas = betas.to(torch.float64)
        self.num_timesteps = int(betas.shape[0])
        self.prediction = self.config.prediction
        self.learned_variance = self.config.variance == "learned"
        self.betas = betas
        self.log_betas = betas.log()
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.log_snr = self.snr.log()
        # Posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0; improved-diffusion clips the log at t = 0 to beta~_1 for numerical safety.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = (
            torch.cat([pv[1:2], pv[1:]]).log() if len(pv) > 1 else pv.clamp(min=1e-20).log()
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    _TABLES = (
        "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "snr", "log_snr", "posterior_variance", "posterior_log_variance_clipped", "log_betas",
        "posterior_mean_coef1", "posterior_mean_coef2",
    )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> Diffusion:
        """Move every table to ``device`` (in place) and return self."""
        for name in self._TABLES:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def schedule_record(self, kind: str) -> dict:
        """Every t's beta, alpha_bar and SNR as plain lists (``diffuse schedule --format json/csv``)."""
        return {
            "kind": kind,
            "timesteps": self.num_timesteps,
            "zero_terminal_snr": self.config.zero_terminal_snr,
            "t": list(range(self.num_timesteps)),
            "beta": self.betas.tolist(),
            "alpha_bar": self.alphas_cumprod.tolist(),
            "snr": self.snr.tolist(),
        }

    @staticmethod
    def _coef(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to (B, 1, ..., 1) to broadcast against ``like``, in like's dtype."""
        out = table.to(like.device)[t].to(like.dtype)
        return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    # --- forward process -------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_0) (DDPM eq. 4)."""
        mean = self._coef(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self._coef(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        return mean, var

    def q_sample(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in closed form: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return (
            self._coef(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * eps
        )

    def q_step_sample(
        self,
        x_prev: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (DDPM eq. 2).

        With ``t = 0`` the input is the clean image x_0.
        """
        if eps is None:
            eps = torch.randn(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
        return self._coef(self.alphas.sqrt(), t, x_prev) * x_prev + self._coef(self.betas.sqrt(), t, x_prev) * eps

    def q_sample_iterative(self, x0: torch.Tensor, t: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply the one-step kernel t + 1 times (steps 0..t) to reach x_t: same law as :meth:`q_sample`."""
        x = x0
        for s in range(t + 1):
            ts = torch.full((x0.shape[0],), s, dtype=torch.int64, device=x0.device)
            x = self.q_step_sample(x, ts, generator=generator)
        return x

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        mean = self._coef(self.posterior_mean_coef1, t, x_t) * x0 + self._coef(self.posterior_mean_coef2, t, x_t) * x_t
        var = self._coef(self.posterior_variance, t, x_t)
        log_var = self._coef(self.posterior_log_variance_clipped, t, x_t)
        return mean, var, log_var

    # --- what a network can predict --------------------------------------------------
    def split_prediction(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a network output of kind ``prediction`` (default: the config's) into (x0, eps)."""
        a, s = self._coef(self.sqrt_alphas_cumprod, t, x_t), self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return to_x0_eps(prediction or self.prediction, pred, x_t, a, s)

    def target(
        self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction: str | None = None
    ) -> torch.Tensor:
        """What a network of kind ``prediction`` should output for (x0, eps, t)."""
        a, s = self._coef(self.sqrt_alphas_cumprod, t, x0), self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return from_x0_eps(prediction or self.prediction, x0, eps, a, s)

    # --- training objective ---------------------------------------------------------
    def loss_weight(
        self, t: torch.Tensor, weighting: str = "uniform", gamma: float = 5.0, prediction: str | None = None
    ) -> torch.Tensor:
        """Per-sample loss weight, shape (B,), float32.

        ``min-snr``: Hang et al. (2023), "Efficient Diffusion Training via Min-SNR Weighting",
        weight min(SNR, gamma) expressed in the loss of each target: divided by SNR for eps,
        by 1 for x0 and by SNR + 1 for v.
        """
        if weighting == "uniform":
            return torch.ones(t.shape, device=t.device, dtype=torch.float32)
        if weighting != "min-snr":
            raise ConfigError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        snr = self.snr.to(t.device)[t]
        clipped = snr.clamp(max=gamma)
        kind = prediction or self.prediction
        denom = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0}[kind]
        return (clipped / denom.clamp(min=1e-12)).to(torch.float32)

    # --- the reverse process ------------------------------------------------------------
    def p_log_variance(
        self, t: torch.Tensor, like: torch.Tensor, variance: str = "beta", r: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log of the reverse variance at ``t``, shaped like ``like``: beta_t, beta~_t or the learned one.

        "posterior" uses beta~ with t = 0's entry clipped to beta~ of t = 1 (improved-diffusion's
        ``posterior_log_variance_clipped``; beta~_0 = 0). "learned" needs the network's variance output ``r``.
        """
        if variance == "learned":
            if r is None:
                raise ConfigError(
                    "the learned variance needs a model trained with a learned variance (--variance learned)"
                )
            log_beta, log_tilde = (
                self._coef(self.log_betas, t, r),
                self._coef(self.posterior_log_variance_clipped, t, r),
            )
            return learned_log_variance(r, log_beta, log_tilde)
        table = self.log_betas if variance == "beta" else self.posterior_log_variance_clipped
        return self._coef(table, t, like).expand_as(like)

    def reverse_variance(self, variance: str | None = None) -> str:
        """The reverse variance ``variance`` names, checked; None means the model's own: learned, else beta_t (DDPM)."""
        if variance is None:
            return "learned" if self.learned_variance else "beta"
        if variance not in REVERSE_VARIANCES:
            raise ConfigError(f"unknown variance {variance!r}; choose one of {', '.join(REVERSE_VARIANCES)}")
        if variance == "learned" and not self.learned_variance:
            raise ConfigError("variance 'learned' needs a model trained with a learned variance; use beta or posterior")
        return variance

    def p_mean_variance(
        self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, variance: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mean, exp(log_var) I) from the network output ``out``: (mean, log_var, x0, eps).

        The mean is the posterior mean of DDPM eq. 7 at the network's x0 (equal to eq. 11 for eps
        models), unclipped; ``variance`` is beta, posterior or learned (Improved DDPM eq. 15;
        default :meth:`reverse_variance`). ``out`` has 2C channels for a learned-variance model.
        """
        pred, r = split_output(out, self.learned_variance)
        x0, eps = self.split_prediction(pred, x_t, t)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        return mean, self.p_log_variance(t, x_t, self.reverse_variance(variance), r), x0, eps

    def vlb_terms(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        mean: torch.Tensor,
        log_var: torch.Tensor,
        discrete: bool = True,
    ) -> torch.Tensor:
        """The term L_{t-1} of the variational bound (DDPM eq. 5) per sample, in nats (summed over elements): (B,).

        For t > 0 the KL(q(x_{t-1} | x_t, x0) || N(mean, e^log_var)) of eq. 5-7; for t = 0 the decoder
        -log p(x0 | x_t): DDPM eq. 13 over 8-bit bins when ``discrete``, else the Gaussian density.
        """
        mean_q, _, log_var_q = self.q_posterior_mean_variance(x0, x_t, t)
        kl = normal_kl_log(mean_q, log_var_q, mean, log_var)
        decoder_ll = discretized_gaussian_log_likelihood if discrete else _gaussian_log_density
        first = (t == 0).reshape(-1, *([1] * (x0.ndim - 1)))
        # the decoder sees harmless inputs where it is not used: a where() passes NaN gradients of either branch
        decoder = -decoder_ll(x0, torch.where(first, mean, x0), torch.where(first, log_var, 0.0))
        return torch.where(first, decoder, kl).flatten(1).sum(1)

    def _vlb_loss(
        self, pred: torch.Tensor, r: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, discrete: bool
    ) -> torch.Tensor:
        """L_t in bits/dim per sample with the mean held fixed (Improved DDPM sec. 3.1): only ``r`` gets gradients.

        Computed in float64: the decoder's bins of width 2/255 need it at t = 0.
        """
        frozen = torch.cat([pred.detach(), r], dim=1).to(torch.float64)
        x0_64, x_t_64 = x0.to(torch.float64), x_t.to(torch.float64)
        mean, log_var, _, _ = self.p_mean_variance(frozen, x_t_64, t, "learned")
        nats = self.vlb_terms(x0_64, x_t_64, t, mean, log_var, discrete)
        return (nats / (x0[0].numel() * math.log(2.0))).to(torch.float32)

    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        weighting: str = "uniform",
        vlb_weight: float = DEFAULT_VLB_WEIGHT,
        discrete: bool = True,
    ) -> torch.Tensor:
        """DDPM's simple loss ||target - model(x_t, t)||^2, averaged per sample: shape (B,).

        t ~ Uniform{0..T-1} and eps ~ N(0, I) unless given. For eps-prediction with
        uniform weighting this is exactly DDPM's L_simple (eq. 14).

        A learned-variance model adds lambda L_vlb (Improved DDPM's L_hybrid, sec. 3.1; lambda =
        ``vlb_weight``): L_vlb = sum_t L_t is estimated from the sampled t as T L_t, with L_t in bits/dim
        (as improved-diffusion's code, whose "vb * T / 1000" is this with lambda = 0.001) and the mean
        held fixed. ``discrete``: x0 holds 8-bit values, so L_0 is DDPM's discretised decoder (eq. 13).
        """
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=x0.device)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, eps)
        pred, r = split_output(model(x_t, t), self.learned_variance)
        target = self.target(x0, eps, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        per_sample = per_sample * self.loss_weight(t, weighting)
        if r is not None and vlb_weight > 0:
            per_sample = per_sample + (vlb_weight * self.num_timesteps) * self._vlb_loss(pred, r, x0, x_t, t, discrete)
        return per_sample
