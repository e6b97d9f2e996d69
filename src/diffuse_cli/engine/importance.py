"""Importance sampling of the training timestep (Nichol & Dhariwal 2021, "Improved DDPM", sec. 3.3).

L_vlb = sum_t L_t is dominated by a few early terms, so a uniform t gives a noisy estimate of it.
Drawing t with probability p_t instead and weighting each term by 1 / (T p_t) keeps the estimate
of the uniform average unbiased (their eq. 18, with the uniform average as the target), and

    p_t  proportional to  sqrt(E[L_t^2])

minimises its variance. E[L_t^2] is estimated from the last ``history`` (10, as in the paper) losses
seen at each t; until every t has that many, t stays uniform. As in the authors' code, a share
``uniform_share`` (0.001) of uniform probability is mixed in, so no t is ever starved.

Everything lives on the training device and updates without host synchronisation. Several
processes stay identical: each hands over the per-sample losses of the whole global batch.
"""

from __future__ import annotations

import torch

HISTORY = 10  # losses kept per timestep (Nichol & Dhariwal 2021, sec. 3.3)
UNIFORM_SHARE = 1e-3  # improved-diffusion's LossSecondMomentResampler mixes this much uniform probability in


class ImportanceSampler:
    """p_t from the second moment of recent losses at each of T timesteps; see the module docstring."""

    def __init__(self, num_timesteps: int, device: torch.device | str = "cpu", history: int = HISTORY):
        self.num_timesteps = num_timesteps
        self.history = history
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64, device=device)  # a ring per t
        self.count = torch.zeros(num_timesteps, dtype=torch.int64, device=device)  # losses seen per t

    def probs(self) -> torch.Tensor:
        """p_t, float64 (T,): uniform until every t has ``history`` losses, then proportional to sqrt(E[L_t^2])."""
        T = self.num_timesteps
        uniform = torch.full((T,), 1.0 / T, dtype=torch.float64, device=self.losses.device)
        rms = self.losses.square().mean(1).sqrt()
        p = rms / rms.sum().clamp(min=torch.finfo(torch.float64).tiny)
        p = p * (1.0 - UNIFORM_SHARE) + UNIFORM_SHARE / T
        ready = (self.count >= self.history).all() & (rms.sum() > 0)
        return torch.where(ready, p, uniform)

    def draw(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weight): ``batch`` timesteps drawn from p_t and their weights 1 / (T p_t), float32."""
        p = self.probs()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).to(torch.float32)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample ``losses`` (B,) at timesteps ``t`` (B,): each t's ring takes its newest values."""
        order = torch.argsort(t, stable=True)
        ts, ls = t[order], losses[order].to(torch.float64)
        rank = torch.arange(ts.shape[0], device=ts.device) - torch.searchsorted(ts, ts)  # k-th of its t here
        slot = (self.count[ts] + rank) % self.history
        self.losses[ts, slot] = ls
        self.count.index_add_(0, ts, torch.ones_like(ts))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a training state stores to resume exactly."""
        return {"importance.losses": self.losses, "importance.count": self.count}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors` (tensors from a state file, any device); a state without them starts afresh."""
        if "importance.losses" in tensors:
            self.losses.copy_(tensors["importance.losses"])
            self.count.copy_(tensors["importance.count"])
