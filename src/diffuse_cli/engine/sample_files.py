"""``diffuse sample`` end to end: load a model, resolve its classes, check the outputs before any work,
generate (:func:`generate.generate`), and write PNGs, a grid and a denoising GIF. With ``init`` the
images are SDEdit edits of a picture (:func:`editing.sdedit`) rather than samples from pure noise."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data, editing, rundir, samplers
from . import images as img
from .checkpoint import Checkpoint
from .config import DEFAULT_GUIDANCE
from .device import ThreadPolicy, autocast_dtype, resolve_device
from .errors import ConfigError, DataError
from .fileio import ensure_dir, safe_name
from .generate import Trajectory, generate
from .models import class_ids, class_names, load_for_sampling


@dataclass
class SampleJob:
    model: torch.nn.Module
    diffusion: object  # diffusion.Diffusion
    checkpoint: Checkpoint
    device: torch.device
    num: int  # images in all (per class x classes)
    sampler: str
    steps: int
    options: dict  # for the sampler: clip_x0, eta
    classes: torch.Tensor | None = None  # (num,) class ids, or None: unconditional
    class_names: tuple[str, ...] = ()  # the classes asked for, in order
    per_class: int = 0
    guidance: float = 1.0
    known_classes: int = 0  # how many classes the model knows (0: unconditional model)
    inputs: tuple = ()  # diffuse inpaint: (image (1, C, S, S), pixels kept (1, 1, S, S))
    edit: Callable | None = None  # generate()'s edit: SDEdit (--init) or RePaint (diffuse inpaint); None: from noise


def prepare(
    checkpoint: str | os.PathLike,
    num: int,
    *,
    out: Path | None,
    grid: Path | None = None,
    gif: Path | None = None,
    sampler: str = samplers.DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float = 0.0,
    clip: bool = True,
    device: str = "auto",
    classes: list[str] = (),
    guidance: float | None = None,
    overwrite: bool = False,
    init: Path | None = None,
    strength: float | None = None,
) -> SampleJob:
    """Everything before sampling, with every mistake reported before the model runs.

    ``init`` (an image file) with ``strength`` S makes every image an SDEdit of it (Meng et al. 2022):
    the image noised to t = S T by q(x_t | x_0) (Ho et al. 2020, eq. 4), then denoised by ``sampler``."""
    from .guidance import check_guidance

    if out is None and grid is None and gif is None:
        raise ConfigError("nothing to write: give --out, --grid or --gif")
    dev = resolve_device(device)
    if strength is not None and init is None:
        raise ConfigError("--strength says how much of --init to redraw: give --init IMAGE too")
    if init is not None:
        strength = editing.check_strength(editing.DEFAULT_STRENGTH if strength is None else strength)
    if guidance is not None and not classes:
        raise ConfigError("--guidance steers towards a class: give --class too")
    model, diffusion, ck = load_for_sampling(checkpoint, dev)
    job = SampleJob(model, diffusion, ck, dev, num, sampler, 0, {}, known_classes=len(class_names(ck)))
    if classes:
        job.guidance = check_guidance(DEFAULT_GUIDANCE if guidance is None else guidance)
        ids, names = class_ids(ck, list(classes))
        job.classes = torch.tensor(ids).repeat_interleave(num)  # num images of each class, classes in the order asked
        job.class_names, job.per_class, job.num = tuple(names), num, num * len(ids)
    job.steps = steps if steps is not None else samplers.default_steps(sampler, diffusion.num_timesteps)
    if out is not None:  # outputs are checked before spending time sampling
        rundir.prepare_sample_dir(Path(out), overwrite)
    for folder in [Path(p).parent for p in (grid, gif) if p is not None]:
        ensure_dir(folder)
    job.options = {
        "clip_x0": clip,
        **({"eta": eta} if sampler == "ddim" or eta != 0.0 else {}),
    }  # the engine says where eta applies
    if init is not None:
        job.edit = _sdedit(load_image(init, ck).to(dev), strength, job)
    return job


def load_image(path: str | os.PathLike, ck: Checkpoint) -> torch.Tensor:
    """An image file as the model sees its data: (1, C, S, S) float32 in [-1, 1], decoded, centre-cropped and
    resized as training decodes a folder (:func:`data.decode_image`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give one image file")
    size, channels = ck.model["image_size"], ck.model["in_channels"]
    return data.to_model_range(data.decode_image(path, size, channels))[None]


def _sdedit(image: torch.Tensor, strength: float, job: SampleJob) -> Callable:
    def edit(model, diffusion, x_T, rows, generator, callback):
        x0 = image.to(x_T.dtype).expand(x_T.shape[0], -1, -1, -1)
        return editing.sdedit(model, diffusion, x0, strength, sampler=job.sampler, steps=job.steps, noise=x_T,
                              generator=generator, callback=callback, **job.options)  # fmt: skip

    edit.strength = strength
    return edit


def run(job: SampleJob, *, seed: int = 0, batch_size: int = 64, progress=None, trajectory: Trajectory | None = None,
        threads: int | None = None):  # fmt: skip
    """The job's images, (num, C, H, W) float32 in [-1, 1] on the CPU. ``threads`` None: CPU threads follow
    the machine's load, re-checked between batches (:class:`~.device.ThreadPolicy`)."""
    cfg = job.model.config
    return generate(
        job.model, job.diffusion, job.num, (cfg.in_channels, *cfg.hw), sampler=job.sampler, steps=job.steps, seed=seed,
        batch_size=batch_size, device=job.device, amp=autocast_dtype("auto", job.device), progress=progress,
        trajectory=trajectory, classes=job.classes, guidance=job.guidance if job.classes is not None else 1.0,
        threads=ThreadPolicy(threads, job.device), edit=job.edit, **job.options,
    )  # fmt: skip


def save(job: SampleJob, images: torch.Tensor, *, out: Path | None, grid: Path | None = None,
         gif: Path | None = None, trajectory: Trajectory | None = None) -> None:  # fmt: skip
    """PNGs ``out/0000.png ...`` (``0012-7.png`` with classes), a grid (one row per class) and the GIF."""
    if out is not None:
        width = max(4, len(str(job.num - 1)))
        for i, im in enumerate(images):
            tag = "" if job.classes is None else f"-{safe_name(job.class_names[i // job.per_class])}"
            img.save_image(img.to_pil(im), Path(out) / f"{i:0{width}d}{tag}.png")
    if grid is not None:
        nrow = job.per_class if job.classes is not None and len(job.class_names) > 1 else None
        img.save_image(img.upscale(img.make_grid(images, nrow=nrow), 512), grid)
    if gif is not None and trajectory is not None and trajectory.frames:
        img.save_gif(img.trajectory_frames(trajectory.frames), gif, duration_ms=120)
