"""`diffuse interpolate CHECKPOINT A B`: a path between two pictures through the model's latent space."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.config import DEFAULT_INTERPOLATION_STRENGTH, INTERPOLATIONS
from .app import DeviceOpt, SeedOpt, choices, console, run
from .sample import CheckpointArg, SamplerName

Method = choices("Method", INTERPOLATIONS)


def interpolate(
    checkpoint: CheckpointArg,
    a: Annotated[Path, typer.Argument(help="The first picture.", show_default=False)],
    b: Annotated[Path, typer.Argument(help="The last picture.", show_default=False)],
    frames: Annotated[int, typer.Option("--frames", "-f", help="Pictures from A to B, both ends included.")] = 8,
    out: Annotated[Path, typer.Option("--out", "-o", help="A .png strip (A | frames | B) or a .gif animation.")] = Path(
        "interpolation.png"
    ),
    method: Annotated[
        Method,
        typer.Option(
            "--method",
            help="ddim: invert both to x_T, slerp, decode (deterministic). "
            "noise: DDPM fig. 8, mix at t = --strength T.",
        ),
    ] = Method("ddim"),  # fmt: skip
    strength: Annotated[
        float, typer.Option("--strength", help="--method noise: how far to noise both, t = strength x T.")
    ] = DEFAULT_INTERPOLATION_STRENGTH,
    sampler: Annotated[
        SamplerName, typer.Option("--sampler", help="--method noise: the sampler that denoises each frame.")
    ] = SamplerName("dpmpp"),
    steps: Annotated[
        int | None, typer.Option("--steps", help="Sampler steps from pure noise (an edit takes its share).")
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Clip predicted x_0 to [-1, 1] at each step.")] = True,
) -> None:
    """Interpolate between two pictures with a trained model.

    --method noise is Ho et al. 2020, sec. 4.3 and fig. 8: both pictures are noised to t with
    q(x_t | x_0) (eq. 4), mixed linearly, and each mix is denoised by the reverse process with the same
    noise; the end frames are the model's reconstructions of A and B. --method ddim (the default)
    inverts both with deterministic DDIM (Song et al. 2021) to x_T, moves between the two x_T on the
    sphere (slerp), and decodes each point with DDIM: no randomness, and the ends come back close to A
    and B.

    **Examples**

        diffuse interpolate runs/digits one.png seven.png --frames 10 --out strip.png

        diffuse interpolate runs/digits one.png seven.png --method noise --strength 0.5 --out morph.gif
    """
    from ..engine import edit_files

    run(
        edit_files.interpolate, checkpoint, a, b, frames, out=out, method=method.value, strength=strength,
        sampler=sampler.value, steps=steps, seed=seed, clip=clip, device=device,
    )  # fmt: skip
    console.print(f"{frames} frames ({method.value}) written to [bold]{out}[/]")
