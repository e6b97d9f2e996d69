"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any conditional model.

A class-conditional network ``model(x_t, t, y)`` trained with labels dropped now and then
(``y`` = the null class) is both the conditional model eps(x_t, t, y) and the unconditional
one eps(x_t, t, null). Guidance extrapolates from the second towards and past the first
(Ho & Salimans 2022, eq. 6 and Algorithm 2, written with w' = 1 + w of the paper):

    pred = uncond + w * (cond - uncond)

``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one, ``w > 1``
trades diversity for samples that look more like their class. In DDPM's terms (Ho et al.
2020, eq. 11) the network predicts the noise in x_t; the guided noise estimate points the
denoising step more firmly away from "any image" and towards "an image of class y".

The combination is the same on eps, x0 or v predictions: at a fixed x_t each is an affine
function of the others with coefficients that depend only on t (``diffusion.to_x0_eps``), and
an affine map commutes with ``uncond + w * (cond - uncond)``. So the wrapper combines
whatever the model predicts, and the samplers never know guidance is there. A learned-variance
model's variance channels (beyond the image's C) are taken from the conditional model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import ConfigError

ConditionalModel = Callable[..., torch.Tensor]  # model(x_t, t, y) -> prediction; y in [0, null_class]


def check_guidance(w: float) -> float:
    """``w`` as a float, or ConfigError unless it is a finite number >= 0."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ConfigError(f"--guidance must be a finite number >= 0 (1 = no guidance, 0 = unconditional; got {w!r})")
    return float(w)


def guided(
    model: ConditionalModel, y: torch.Tensor, w: float, null_class: int | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model`` with labels ``y`` (B,) bound and guidance scale ``w``, as a sampler's ``model(x_t, t)``.

    For ``w`` not 0 or 1 each call is one batched call of size 2B: [x_t, x_t] with labels
    [y, null], so the conditional and unconditional predictions share one pass. ``w = 1`` calls
    only the conditional model and ``w = 0`` only the unconditional one, so both are exactly
    the plain model. ``null_class`` defaults to ``model.null_class``.
    """
    w = check_guidance(w)
    if null_class is None:
        null_class = int(model.null_class)
    y = torch.as_tensor(y, dtype=torch.long)

    def pred(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = y.to(x_t.device)
        assert labels.shape == x_t.shape[:1], f"{labels.shape[0]} labels for {x_t.shape[0]} images"
        null = torch.full_like(labels, null_class)
        if w == 1.0:
            return model(x_t, t, labels)
        if w == 0.0:
            return model(x_t, t, null)
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        c = x_t.shape[1]
        # A learned-variance model's extra channels (Improved DDPM eq. 15) are not a prediction of the
        # image: keep the conditional model's variance, as GLIDE (Nichol et al. 2022) does.
        return torch.cat([uncond[:, :c] + w * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)

    return pred
