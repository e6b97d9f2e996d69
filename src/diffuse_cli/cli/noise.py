"""`diffuse noise IMAGE`: the fixed forward process on a real image, as a strip, frames or a GIF."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import BEndOpt, BStartOpt, KindOpt, Schedule, SeedOpt, TOpt, ZtsnrOpt, console, fmt_snr_db, run


def noise(
    image: Annotated[Path, typer.Argument(help="An image file (png, jpg, webp, bmp, gif, tif).", show_default=False)],
    t: Annotated[
        str | None,
        typer.Option("--t", help="Comma-separated timesteps in [0, T), e.g. 0,100,500,999. Default: a spread."),
    ] = None,
    kind: KindOpt = Schedule("linear"),
    timesteps: TOpt = 1000,
    beta_start: BStartOpt = 1e-4,
    beta_end: BEndOpt = 0.02,
    zero_terminal_snr: ZtsnrOpt = False,
    size: Annotated[
        int, typer.Option("--size", help="Resize + center-crop to this many pixels.", min=1, max=4096)
    ] = 128,
    seed: SeedOpt = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Labelled PNG strip. Default: `<image>-noise.png` in the current folder."),
    ] = None,
    frames: Annotated[Path | None, typer.Option("--frames", help="Also write each panel as DIR/t0123.png.")] = None,
    gif: Annotated[Path | None, typer.Option("--gif", help="Also write an animation through t.")] = None,
    iterative: Annotated[
        bool, typer.Option("--iterative", help="Apply the one-step kernel t+1 times instead of the closed form.")
    ] = False,
) -> None:
    """Watch the fixed forward process destroy a real image.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I), with pixels scaled to [-1, 1].
    With --iterative the image is noised step by step, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps:
    a different draw, but the same distribution (Ho et al. 2020, eq. 4: q(x_t | x_0) in closed form).

    **Examples**

        diffuse noise photo.jpg

        diffuse noise photo.jpg --t 0,50,200,999 --kind cosine --out strip.png --gif noise.gif

        diffuse noise photo.jpg --iterative --frames frames/
    """
    from ..engine.config import DiffusionConfig, parse_ints

    config = run(DiffusionConfig, kind.value, timesteps, beta_start, beta_end, zero_terminal_snr)
    ts = run(parse_ints, t, "--t") if t else None
    out = out or Path(f"{image.stem}-noise.png")
    from ..engine.forward_process import show

    panels = run(show, image, config, ts, size, seed, iterative, out, frames_dir=frames, gif=gif)
    title = f"forward process on {image.name} ({kind.value}, T = {timesteps}, "
    table = Table(title=title + ("iterative)" if iterative else "closed form)"), title_justify="left")
    for col in ("t", "sqrt(alpha_bar_t)", "sqrt(1-alpha_bar_t)", "SNR (dB)", "PSNR vs x_0 (dB)"):
        table.add_column(col, justify="right")
    for p in panels:
        psnr = "inf" if math.isinf(p.psnr) else f"{p.psnr:.1f}"
        table.add_row(str(p.t), f"{p.signal:.4f}", f"{p.noise:.4f}", fmt_snr_db(p.snr), psnr)
    console.print(table)
    console.print(f"strip written to [bold]{out}[/]")
    if frames is not None:
        console.print(f"frames written to [bold]{frames}/[/] (t0000.png ...)")
    if gif is not None:
        console.print(f"animation written to [bold]{gif}[/]")
