"""`diffuse sample CHECKPOINT`: generate PNGs with DDPM, DDIM or DPM-Solver++ (and classifier-free guidance)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.config import DEFAULT_GUIDANCE, DEFAULT_STRENGTH, SAMPLER_NAMES
from .app import DeviceOpt, SeedOpt, ThreadsOpt, choices, console, d, run

SamplerName = choices("SamplerName", SAMPLER_NAMES)

CheckpointArg = Annotated[
    Path,
    typer.Argument(help="A model .safetensors file, a run folder or a diffusers DDPM folder.", show_default=False),
]
ClassOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--class",
        "-c",
        help="Draw images of this class: a name (e.g. a sub-folder's) or an id; repeat for several "
        "(the grid gets one row per class). Needs a model trained with classes.",
        show_default=False,
        metavar="NAME|ID",
    ),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        "-w",
        help="Classifier-free guidance scale w with --class: 1 = the plain class-conditional model, "
        f"0 = ignore the class, above 1 = more typical of the class, less varied. [default: {DEFAULT_GUIDANCE:g}]",
    ),
]
SamplerOpt = Annotated[
    SamplerName,
    typer.Option("--sampler", help="dpmpp (fast, default), ddim, or ddpm (DDPM's ancestral sampler, Algorithm 2)."),
]
GifOpt = Annotated[
    Path | None,
    typer.Option("--gif", help="Animate the denoising of the first few images: x_t beside predicted x_0."),
]


InitOpt = Annotated[
    Path | None,
    typer.Option("--init", help="Edit this picture instead of starting from noise (SDEdit).", show_default=False),
]
StrengthOpt = Annotated[
    float | None,
    typer.Option(
        "--strength",
        help=f"With --init: how much to redraw, 0 = keep the picture, 1 = ignore it. {d(DEFAULT_STRENGTH)}",
    ),
]


def sample(
    checkpoint: CheckpointArg,
    num: Annotated[int, typer.Option("--num", "-n", help="How many images (of each class, with --class).")] = 16,
    class_: ClassOpt = None,
    guidance: GuidanceOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for one PNG per image (0000.png ...).")
    ] = Path("samples"),
    grid: Annotated[Path | None, typer.Option("--grid", help="Also write all images as one grid PNG.")] = None,
    sampler: SamplerOpt = SamplerName("dpmpp"),
    steps: Annotated[
        int | None, typer.Option("--steps", help="Model evaluations. [default: 20 dpmpp, 50 ddim, T ddpm]")
    ] = None,
    eta: Annotated[float, typer.Option("--eta", help="DDIM noise: 0 deterministic, 1 DDPM-like.")] = 0.0,
    seed: SeedOpt = 0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Images per model call (does not change the images).")
    ] = 64,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    gif: GifOpt = None,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Clip predicted x_0 to [-1, 1] at each step.")] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the images an earlier run left in --out.")
    ] = False,
    init: InitOpt = None,
    strength: StrengthOpt = None,
) -> None:
    """Generate images by running the learned reverse process from pure noise x_T ~ N(0, I).

    `--sampler ddpm --steps T` is DDPM's Algorithm 2 exactly; ddim (Song et al. 2021) and dpmpp
    (DPM-Solver++, Lu et al. 2022) reach similar quality in 10-50 model calls. Each image has its own
    random stream, seeded from --seed and its number, so --batch-size never changes the images.

    **Classes and guidance.** A model trained with classes (`diffuse train DATA --classes auto`) is two
    models in one network: it predicts the noise eps(x_t, t, c) for class c, and, because training hid
    the label now and then, the noise eps(x_t, t) of an image of any class. Classifier-free guidance
    (Ho & Salimans 2022, eq. 6 / Algorithm 2) uses eps(x_t, t) + w (eps(x_t, t, c) - eps(x_t, t)) in
    place of DDPM's eps_theta (Ho et al. 2020, Algorithm 2): w = 1 is the conditional model, w > 1
    extrapolates past it, away from "any image" towards "an image of class c": samples look more like
    their class and less like each other. Each step costs one model call on twice the batch.

    **Editing a picture.** With --init, each image starts from the picture noised to t = S T by
    q(x_t | x_0) (Ho et al. 2020, eq. 4) rather than from pure noise, and the sampler denoises it from
    there in the share S of its steps: SDEdit (Meng et al. 2022). Small --strength S keeps the picture's
    layout and fixes details; large S keeps only its rough shape.

    **Examples**

        diffuse sample runs/digits --num 64 --grid grid.png

        diffuse sample runs/digits --class 7 --num 16 --grid sevens.png

        diffuse sample runs/digits --class 0 --class 1 --class 2 --num 8 --guidance 2 --grid rows.png

        diffuse sample runs/digits/model.safetensors --sampler ddim --steps 50 --eta 0 --out imgs/

        diffuse sample runs/digits --sampler ddpm --num 8 --gif denoise.gif

        diffuse sample runs/digits --init sketch.png --strength 0.5 --num 8 --grid edits.png
    """
    from ..engine import sample_files
    from ..engine.generate import Trajectory
    from .progress import CountingProgress

    outputs = dict(out=out, grid=grid, gif=gif)
    job = run(
        sample_files.prepare, checkpoint, num, **outputs, sampler=sampler.value, steps=steps, eta=eta, clip=clip,
        device=device, classes=class_ or [], guidance=guidance, overwrite=overwrite, init=init, strength=strength,
    )  # fmt: skip
    ck = job.checkpoint
    console.print(
        f"[bold]sample[/] {ck.path} (step {ck.step}, {ck.diffusion.get('schedule')} schedule, "
        f"T = {job.diffusion.num_timesteps}, predicts {ck.diffusion.get('prediction')}); {job.sampler}, "
        f"{job.steps} steps, device {job.device}"
    )
    if init is not None:
        console.print(f"[bold]edit[/] {init} at strength {job.edit.strength:g} (SDEdit)")
    if job.classes is not None:
        each = f"{job.per_class} image(s) each, guidance w = {job.guidance:g}"
        console.print(f"[bold]class[/] {', '.join(job.class_names)}: {each}")
    elif job.known_classes:
        console.print(f"unconditional samples; this model knows {job.known_classes} classes: choose with --class")
    trajectory = Trajectory() if gif is not None else None
    with CountingProgress("sample", job.num) as bar:
        images = run(
            sample_files.run, job, seed=seed, batch_size=batch_size, progress=bar.advance, trajectory=trajectory,
            threads=threads,
        )  # fmt: skip
    run(sample_files.save, job, images, **outputs, trajectory=trajectory)
    if out is not None:
        console.print(f"{job.num} images written to [bold]{out}/[/]")
    if grid is not None:
        console.print(f"grid written to [bold]{grid}[/]")
    if trajectory is not None and trajectory.frames:
        console.print(f"trajectory written to [bold]{gif}[/] (top: x_t, bottom: predicted x_0)")
