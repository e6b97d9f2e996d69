"""`diffuse export RUN OUT`: a model as a diffusers DDPMPipeline folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import console, run


def export(
    run_: Annotated[
        Path,
        typer.Argument(
            metavar="RUN",
            help="A run folder, a model or state .safetensors file, or a diffusers folder.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Argument(help="New (or empty) folder for the diffusers pipeline.", show_default=False)],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a folder that is not empty (replacing our files).")
    ] = False,
) -> None:
    """Write a model as a diffusers DDPMPipeline folder (no diffusers needed to write it).

    OUT gets model_index.json, unet/config.json + diffusion_pytorch_model.safetensors (UNet2DModel) and
    scheduler/scheduler_config.json (DDPMScheduler with the same betas, prediction type, and variance
    beta_t as `diffuse sample --sampler ddpm`). Load it with
    `diffusers.DDPMPipeline.from_pretrained(OUT)`. Models diffusers' UNet2DModel cannot express are refused
    with the reason.

    **Examples**

        diffuse export runs/digits-plain digits-diffusers    (a run trained with --classes none)

        python -c "from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('digits-diffusers')(num_inference_steps=1000)"
    """
    from ..engine import models

    result = run(models.export, run_, out, overwrite=overwrite)
    u, s = result["unet"], result["scheduler"]
    console.print(f"[bold]export[/] {result['source']} (step {result['step']}) -> [bold]{result['out']}/[/]")
    for name in result["files"]:
        console.print(f"  {name}")
    console.print(
        f"  UNet2DModel {u['sample_size']}x{u['sample_size']}x{u['in_channels']}, widths {u['block_out_channels']}; "
        f"DDPMScheduler {s['beta_schedule']}, T = {s['num_train_timesteps']}, {s['prediction_type']}"
    )
    console.print(
        f'  next: python -c "from diffusers import DDPMPipeline; '
        f"DDPMPipeline.from_pretrained('{result['out']}')(num_inference_steps={s['num_train_timesteps']})\""
    )
