"""Exact denoisers for Gaussian and Gaussian-mixture data: a feature for testing samplers.

If the data is a mixture sum_k w_k N(mu_k, Sigma_k), every noisy marginal is a mixture
too: given component k, x_t ~ N(a mu_k, a^2 Sigma_k + s^2 I) with a = sqrt(abar_t) and
s^2 = 1 - abar_t (DDPM eq. 4). The posterior mean E[x0 | x_t] - the best possible
network under the L2 loss - is then available in closed form (Gaussian conditioning):

    E[x0 | x_t, k] = mu_k + a Sigma_k C_k^{-1} (x_t - a mu_k),   C_k = a^2 Sigma_k + s^2 I
    E[x0 | x_t]    = sum_k r_k(x_t) E[x0 | x_t, k],               r_k ∝ w_k N(x_t; a mu_k, C_k)

so a sampler driven by :meth:`GaussianMixture.model` can be checked against the exact
data distribution, free of any training error. Everything is computed in float64.

Taking each component as a class gives the exact class-conditional network too:
:meth:`GaussianMixture.conditional_model` predicts from E[x0 | x_t, k] for label k and from
the mixture's E[x0 | x_t] for the null label K, the pair classifier-free guidance combines.

Shapes: data points are (B, D); :meth:`GaussianMixture.model` also accepts (B, ...) and
flattens the trailing dimensions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .diffusion import PREDICTIONS, Diffusion, from_x0_eps
from .errors import ConfigError

_F64 = torch.float64


def _as_f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=_F64)


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) in D dimensions, with its exact posterior mean under a diffusion.

    ``weights``: (K,), normalised here. ``means``: (K, D). Give either ``covs`` (K, D, D),
    symmetric positive definite, or ``stds``: (K,) isotropic standard deviations.
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, means, covs=None, stds=None):
        w = _as_f64(weights).flatten()
        mu = _as_f64(means)
        if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise ConfigError(f"means must have shape (K, D) with K = {w.shape[0]} weights (got {tuple(mu.shape)})")
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError("mixture weights must be non-negative and not all zero")
        k, d = mu.shape
        if (covs is None) == (stds is None):
            raise ConfigError("give exactly one of covs (K, D, D) or stds (K,)")
        if covs is None:
            s = _as_f64(stds).flatten().expand(k)
            cov = s[:, None, None] ** 2 * torch.eye(d, dtype=_F64)
        else:
            cov = _as_f64(covs)
            if cov.shape != (k, d, d):
                raise ConfigError(f"covs must have shape {(k, d, d)} (got {tuple(cov.shape)})")
            cov = 0.5 * (cov + cov.transpose(1, 2))
        self.weights = w / w.sum()
        self.means = mu
        self.covs = cov
        self._chol = torch.linalg.cholesky(cov)  # raises if a covariance is not positive definite

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def mean(self) -> torch.Tensor:
        """Overall mean, shape (D,)."""
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> torch.Tensor:
        """Overall covariance, shape (D, D): within-component plus between-component parts."""
        m = self.mean()
        dev = self.means - m
        between = torch.einsum("k,ki,kj->ij", self.weights, dev, dev)
        return torch.einsum("k,kij->ij", self.weights, self.covs) + between

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws from the data distribution, shape (n, D), float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=_F64)
        return self.means[comp] + torch.einsum("nij,nj->ni", self._chol[comp], z)

    def sample_noisy(self, n: int, abar: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws of x_t ~ q(x_t) at noise level abar_t, shape (n, D), float64."""
        x0 = self.sample(n, generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=_F64)
        return abar**0.5 * x0 + (1.0 - abar) ** 0.5 * eps

    def posterior_mean(self, x_t: torch.Tensor, abar: float) -> torch.Tensor:
        """E[x0 | x_t] at noise level ``abar`` (one value for the whole batch); x_t (B, D), float64."""
        x = x_t.to(_F64)
        a = abar**0.5
        eye = torch.eye(self.dim, dtype=_F64, device=x.device)
        cov, mu, w = self.covs.to(x.device), self.means.to(x.device), self.weights.to(x.device)
        c = abar * cov + (1.0 - abar) * eye  # (K, D, D): covariance of x_t given the component
        chol = torch.linalg.cholesky(c)
        chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(c), upper=False)  # L^-1, (K, D, D)
        gain = a * cov @ chol_inv.transpose(1, 2) @ chol_inv  # a Sigma C^-1, (K, D, D)
        if mu.shape[0] == 1:  # one Gaussian: E[x0 | x_t] is affine in x_t
            return mu[0] + (x - a * mu[0]) @ gain[0].T
        diff = x[:, None, :] - a * mu  # (B, K, D)
        z = torch.einsum("kij,bkj->bki", chol_inv, diff)  # whitened residual
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        r = torch.softmax(torch.log(w) - 0.5 * (z * z).sum(-1) - 0.5 * log_det, dim=-1)  # (B, K)
        post = mu + torch.einsum("kij,bkj->bki", gain, diff)  # E[x0 | x_t, k], (B, K, D)
        return torch.einsum("bk,bkd->bd", r, post)

    def model(
        self, diffusion: Diffusion, prediction: str | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:  # an _ExactModel
        """The exact network of kind ``prediction`` (default: the diffusion's) as ``model(x_t, t)``.

        ``t`` is an int64 tensor of shape (B,) in [0, T); the output has x_t's shape and dtype.
        """
        return _ExactModel(diffusion, prediction, [self])

    def component(self, k: int) -> GaussianMixture:
        """Component ``k`` alone, as a one-component mixture N(mu_k, Sigma_k)."""
        return GaussianMixture([1.0], self.means[k : k + 1], covs=self.covs[k : k + 1])

    def conditional_model(self, diffusion: Diffusion, prediction: str | None = None) -> _ExactModel:
        """The exact class-conditional network ``model(x_t, t, y)``, each component a class.

        Label ``k`` in [0, K) predicts from E[x0 | x_t, component k]; the null label K (also
        ``y=None``; ``model.null_class``) from the whole mixture's E[x0 | x_t]: the conditional
        and unconditional models a perfectly trained guided network would be.
        """
        k = self.means.shape[0]
        return _ExactModel(diffusion, prediction, [self.component(i) for i in range(k)] + [self])


class _ExactModel:
    """``model(x_t, t[, y])``: the exact prediction under ``mixtures[y]`` (y None = the last one)."""

    def __init__(self, diffusion: Diffusion, prediction: str | None, mixtures: list[GaussianMixture]):
        self.kind = prediction or diffusion.prediction
        if self.kind not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {self.kind!r}; choose one of {', '.join(PREDICTIONS)}")
        self.abar_table = diffusion.alphas_cumprod.detach().to("cpu", _F64)
        self.mixtures = mixtures
        self.null_class = len(mixtures) - 1  # 0 for an unconditional model

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = x_t.reshape(x_t.shape[0], -1).to(_F64)
        t_cpu = t.to("cpu")
        y_cpu = torch.full_like(t_cpu, self.null_class) if y is None else torch.as_tensor(y).to("cpu")
        x0 = torch.empty_like(x)
        for tv in torch.unique(t_cpu).tolist():
            for yv in torch.unique(y_cpu[t_cpu == tv]).tolist():
                rows = ((t_cpu == tv) & (y_cpu == yv)).to(x.device)
                x0[rows] = self.mixtures[yv].posterior_mean(x[rows], float(self.abar_table[tv]))
        abar = self.abar_table[t_cpu].to(x.device)[:, None]
        a, s = abar.sqrt(), (1.0 - abar).sqrt()
        eps = (x - a * x0) / s  # s > 0 for every t in [0, T)
        return from_x0_eps(self.kind, x0, eps, a, s).reshape(x_t.shape).to(x_t.dtype)


class GaussianData(GaussianMixture):
    """N(mean, cov) data: a one-component mixture, plus the exact probability-flow ODE map."""

    def __init__(self, mean, cov):
        mu = _as_f64(mean).flatten()
        c = _as_f64(cov)
        if c.shape != (mu.shape[0], mu.shape[0]):
            raise ConfigError(f"cov must have shape {(mu.shape[0], mu.shape[0])} (got {tuple(c.shape)})")
        super().__init__([1.0], mu[None], covs=c[None])

    def ode_solution(self, x_t: torch.Tensor, abar: float) -> torch.Tensor:
        """Where the probability-flow ODE carries x_t (at noise level abar) at clean data, (B, D).

        For Gaussian data every C(abar) = abar Sigma + (1 - abar) I shares Sigma's eigenvectors,
        the ODE is linear and decouples per eigen-coordinate, and its flow is the monotone
        affine map between the two Gaussians: x0 = mu + Sigma^{1/2} C^{-1/2} (x_t - sqrt(abar) mu).
        """
        x = x_t.to(_F64)
        evals, evecs = torch.linalg.eigh(self.covs[0])
        scale = evals.sqrt() / (abar * evals + 1.0 - abar).sqrt()  # (D,)
        mu = self.means[0]
        y = (x - abar**0.5 * mu) @ evecs
        return mu + (y * scale) @ evecs.T
