"""The fixed forward process on a real image, for ``diffuse noise``: x_t at chosen t, with numbers.

x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4), or with
``iterative`` the one-step kernel x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps (eq. 2)
applied t + 1 times: a different draw of the same distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data
from .config import DiffusionConfig, check_seed
from .diffusion import Diffusion
from .errors import ConfigError, DataError
from .images import to_uint8


@dataclass(frozen=True)
class Panel:
    t: int
    image: torch.Tensor  # (C, S, S) uint8
    signal: float  # sqrt(alpha_bar_t)
    noise: float  # sqrt(1 - alpha_bar_t)
    snr: float  # alpha_bar_t / (1 - alpha_bar_t)
    psnr: float  # of the 8-bit x_t against x_0, dB (inf when equal)


def default_timesteps(T: int) -> list[int]:
    """A spread from the first to the last step: 0, T/20, T/10, T/4, T/2, 3T/4, T-1."""
    return sorted({0, T // 20, T // 10, T // 4, T // 2, (3 * T) // 4, T - 1})


def noise_image(
    image: Path, diffusion: Diffusion, ts: list[int] | None, size: int, seed: int = 0, iterative: bool = False
) -> tuple[torch.Tensor, list[Panel]]:
    """x_0 of ``image`` (resized and centre-cropped to ``size``, uint8) and one :class:`Panel` per t."""
    check_seed(seed)
    T = diffusion.num_timesteps
    ts = ts or default_timesteps(T)
    bad = [x for x in ts if not 0 <= x < T]
    if bad:
        raise ConfigError(f"--t values must be in [0, {T - 1}] (t is 0-based; got {bad[0]})")
    if not image.exists():
        raise DataError(f"no such file: {image}")
    if image.is_dir():
        raise DataError(f"{image} is a folder; give one image file")
    x0_u8 = data.decode_image(image, size)
    x0 = data.to_model_range(x0_u8, torch.float64)[None]
    gen = torch.Generator().manual_seed(seed)
    panels = []
    for t in ts:
        if iterative:
            x_t = diffusion.q_sample_iterative(x0, t, generator=gen)
        else:
            x_t = diffusion.q_sample(x0, torch.tensor([t]), generator=gen)
        u8 = to_uint8(x_t[0])
        mse = (u8.float() - x0_u8.float()).pow(2).mean().item()
        psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
        panels.append(
            Panel(
                t,
                u8,
                float(diffusion.sqrt_alphas_cumprod[t]),
                float(diffusion.sqrt_one_minus_alphas_cumprod[t]),
                float(diffusion.snr[t]),
                psnr,
            )
        )
    return x0_u8, panels


def save_pictures(
    x0_u8: torch.Tensor,
    panels: list[Panel],
    out: Path,
    *,
    frames_dir: Path | None = None,
    gif: Path | None = None,
    size: int = 128,
) -> None:
    """Write the labelled strip (x_0, then x_t for each panel) to ``out``; optionally each panel as
    ``frames_dir/t0123.png`` and an animation through t as ``gif``."""
    from . import images as img
    from .fileio import ensure_dir

    pictures = [img.to_pil(x0_u8)] + [img.to_pil(p.image) for p in panels]
    labels = ["original x_0"] + [f"t = {p.t}" for p in panels]
    if frames_dir is not None:
        ensure_dir(frames_dir)
        for p, pil in zip(panels, pictures[1:], strict=True):
            img.save_image(pil, Path(frames_dir) / f"t{p.t:04d}.png")
    img.save_image(img.labelled_strip(pictures, labels, panel_size=max(96, min(size, 192))), out)
    if gif is not None:
        frames = [
            img.labelled_strip([p], [lab], panel_size=max(128, size)) for p, lab in zip(pictures, labels, strict=True)
        ]
        img.save_gif(frames, gif, duration_ms=400)


def show(
    image: Path,
    config: DiffusionConfig,
    ts: list[int] | None,
    size: int,
    seed: int,
    iterative: bool,
    out: Path,
    *,
    frames_dir: Path | None = None,
    gif: Path | None = None,
) -> list[Panel]:
    """``diffuse noise``: the panels of :func:`noise_image`, written by :func:`save_pictures`."""
    x0_u8, panels = noise_image(image, Diffusion(config), ts, size, seed, iterative)
    save_pictures(x0_u8, panels, out, frames_dir=frames_dir, gif=gif, size=size)
    return panels
