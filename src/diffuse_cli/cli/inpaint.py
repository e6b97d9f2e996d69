"""`diffuse inpaint CHECKPOINT IMAGE --mask MASK`: fill in part of a picture with RePaint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.config import DEFAULT_JUMP_LENGTH, DEFAULT_REPAINT_STEPS, DEFAULT_RESAMPLINGS
from .app import DeviceOpt, SeedOpt, console, run
from .sample import CheckpointArg, ClassOpt, GuidanceOpt

ImageArg = Annotated[Path, typer.Argument(help="The picture to complete (png, jpg, webp, ...).", show_default=False)]


def inpaint(
    checkpoint: CheckpointArg,
    image: ImageArg,
    mask: Annotated[
        Path,
        typer.Option(
            "--mask",
            "-m",
            help="Greyscale mask: white = fill in, black = keep (any size; it is stretched to the image's).",
            show_default=False,
        ),
    ],  # fmt: skip
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for one PNG per result.")] = Path("inpainted"),
    grid: Annotated[
        Path | None, typer.Option("--grid", help="input | hole | mask | results as one PNG. [default: OUT/grid.png]")
    ] = None,
    num: Annotated[int, typer.Option("--num", "-n", help="How many different completions.")] = 8,
    invert_mask: Annotated[
        bool, typer.Option("--invert-mask", help="White = keep, black = fill in (RePaint's own convention).")
    ] = False,
    steps: Annotated[int, typer.Option("--steps", help="Respaced reverse steps (RePaint uses 250).")] = (
        DEFAULT_REPAINT_STEPS
    ),
    jump: Annotated[int, typer.Option("--jump", help="Jump length j: steps gone back up before each resampling.")] = (
        DEFAULT_JUMP_LENGTH
    ),
    resample: Annotated[
        int, typer.Option("--resample", help="r: times each stretch of j steps is walked (1 = no resampling).")
    ] = DEFAULT_RESAMPLINGS,
    class_: ClassOpt = None,
    guidance: GuidanceOpt = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Images per model call (does not change the images).")
    ] = 8,
    device: DeviceOpt = "auto",
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Clip predicted x_0 to [-1, 1] at each step.")] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the images an earlier run left in --out.")
    ] = False,
) -> None:
    """Fill in the white part of --mask with what the model thinks belongs there (RePaint, Lugmayr et al. 2022).

    At each reverse step of DDPM (Ho et al. 2020, Algorithm 2) the pixels to keep are replaced by the
    picture noised to that step with q(x_t | x_0) (Ho et al. 2020, eq. 4), so the model only invents the
    hole. Going back up --jump steps (eq. 2) and down again, --resample times, lets the invented part
    match the kept part; the kept pixels of the results are the input's exactly. The image is
    centre-cropped and resized to the model's size as training does. Each result costs about
    --resample x --steps model calls. Works with any unconditional model; with a class-conditional
    one, --class and --guidance steer the completion.

    **Examples**

        diffuse inpaint runs/digits digit.png --mask lower-half.png --out filled/

        diffuse inpaint runs/faces face.jpg --mask eyes.png --num 16 --resample 10 --jump 10 --steps 250

        diffuse inpaint runs/digits digit.png --mask keep.png --invert-mask --class 3 --guidance 2
    """
    from ..engine import edit_files
    from .progress import CountingProgress

    grid = grid if grid is not None or out is None else out / "grid.png"
    job = run(
        edit_files.prepare_inpaint, checkpoint, image, mask, num, out=out, grid=grid, steps=steps, jump_length=jump,
        resamplings=resample, invert_mask=invert_mask, clip=clip, device=device, classes=class_ or [],
        guidance=guidance, overwrite=overwrite,
    )  # fmt: skip
    ck = job.checkpoint
    kept = float(job.inputs[1].float().mean())
    console.print(
        f"[bold]inpaint[/] {image} with {ck.path} (step {ck.step}, T = {job.diffusion.num_timesteps}): "
        f"{1 - kept:.0%} of the pixels to fill; {steps} steps, jump {jump}, {resample} passes = "
        f"{job.steps} model calls per image, device {job.device}"
    )
    if job.classes is not None:
        console.print(f"[bold]class[/] {', '.join(job.class_names)}, guidance w = {job.guidance:g}")
    from ..engine import sample_files

    with CountingProgress("inpaint", job.num) as bar:
        images = run(sample_files.run, job, seed=seed, batch_size=batch_size, progress=bar.advance)
    run(edit_files.save_inpaint, job, images, out=out, grid=grid)
    if out is not None:
        console.print(f"{job.num} images written to [bold]{out}/[/]")
    if grid is not None:
        console.print(f"grid written to [bold]{grid}[/] (input | hole | mask | results)")
