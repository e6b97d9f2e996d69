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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import schedules
from .errors import ConfigError

PREDICTIONS = ("eps", "x0", "v")
WEIGHTINGS = ("uniform", "min-snr")


@dataclass(frozen=True)
class DiffusionConfig:
    """What defines the forward process and what the network predicts."""

    schedule: str = "linear"  # DDPM's choice; cosine is better for small images
    timesteps: int = schedules.DEFAULT_TIMESTEPS  # T = 1000 as in DDPM
    beta_start: float = schedules.DEFAULT_BETA_START
    beta_end: float = schedules.DEFAULT_BETA_END
    zero_terminal_snr: bool = False  # Lin et al. 2024; pair it with v-prediction
    prediction: str = "eps"  # the seed's objective: predict the noise

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if self.schedule not in schedules.KINDS:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(schedules.KINDS)}")
        if not isinstance(self.zero_terminal_snr, bool):
            raise ConfigError(f"zero_terminal_snr must be true or false (got {self.zero_terminal_snr!r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # With zero terminal SNR alpha_bar_{T-1} = 0 exactly: 1/sqrt(abar) is inf there
        # and x0 cannot be recovered from an eps prediction (Lin et al. 2024, sec. 3.2).
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.log_snr = self.snr.log()
        # Posterior q(x_{t-1} | x_t, x_0), DDPM eq. 7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0; improved-diffusion clips the log at t = 0 to beta~_1 for numerical safety.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.cat([pv[1:2], pv[1:]]).log() if len(pv) > 1 else pv.clamp(min=1e-20).log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    _TABLES = (
        "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "snr", "log_snr", "posterior_variance", "posterior_log_variance_clipped",
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

    @staticmethod
    def _coef(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to (B, 1, ..., 1) to broadcast against ``like``, in like's dtype."""
        out = table.to(like.device)[t].to(like.dtype)
        return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def check_t(self, t: torch.Tensor) -> None:
        assert t.dtype == torch.int64, "timesteps must be int64"

    # --- forward process -------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_0) (DDPM eq. 4)."""
        mean = self._coef(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self._coef(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        return mean, var

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in closed form: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self._coef(self.sqrt_alphas_cumprod, t, x0) * x0 + self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * eps

    def q_step_sample(self, x_prev: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
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

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7)."""
        mean = self._coef(self.posterior_mean_coef1, t, x_t) * x0 + self._coef(self.posterior_mean_coef2, t, x_t) * x_t
        var = self._coef(self.posterior_variance, t, x_t)
        log_var = self._coef(self.posterior_log_variance_clipped, t, x_t)
        return mean, var, log_var

    # --- conversions between what a network can predict -----------------------------
    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        return self._coef(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._coef(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        return (x_t - self._coef(self.sqrt_alphas_cumprod, t, x_t) * x0) / self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def v_from_x0_eps(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""
        return self._coef(self.sqrt_alphas_cumprod, t, x0) * eps - self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        return self._coef(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
        return self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + self._coef(self.sqrt_alphas_cumprod, t, x_t) * v

    def split_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         prediction: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn a network output of kind ``prediction`` (default: the config's) into (x0, eps)."""
        kind = prediction or self.prediction
        if kind == "eps":
            return self.x0_from_eps(x_t, t, pred), pred
        if kind == "x0":
            return pred, self.eps_from_x0(x_t, t, pred)
        if kind == "v":
            return self.x0_from_v(x_t, t, pred), self.eps_from_v(x_t, t, pred)
        raise ConfigError(f"unknown prediction {kind!r}")

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction: str | None = None) -> torch.Tensor:
        """What a network of kind ``prediction`` should output for (x0, eps, t)."""
        kind = prediction or self.prediction
        if kind == "eps":
            return eps
        if kind == "x0":
            return x0
        if kind == "v":
            return self.v_from_x0_eps(x0, t, eps)
        raise ConfigError(f"unknown prediction {kind!r}")

    # --- training objective ---------------------------------------------------------
    def loss_weight(self, t: torch.Tensor, weighting: str = "uniform", gamma: float = 5.0,
                    prediction: str | None = None) -> torch.Tensor:
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

    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        weighting: str = "uniform",
    ) -> torch.Tensor:
        """The seed's simple loss ||target - model(x_t, t)||^2, averaged per sample: shape (B,).

        t ~ Uniform{0..T-1} and eps ~ N(0, I) unless given. For eps-prediction with
        uniform weighting this is exactly DDPM's L_simple (eq. 14).
        """
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=x0.device)
        if eps is None:
            eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, eps)
        pred = model(x_t, t)
        target = self.target(x0, eps, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return per_sample * self.loss_weight(t, weighting)

    # --- reporting ------------------------------------------------------------------
    def terminal_snr(self) -> float:
        return float(self.snr[-1])
