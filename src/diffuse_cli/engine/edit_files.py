"""``diffuse inpaint`` and ``diffuse interpolate`` end to end: read the image(s) and the mask as training
reads its data, check every option before the model runs, edit (:mod:`editing`), and write the pictures.

Inpainting reuses ``diffuse sample``'s job (:mod:`sample_files`): the same model loading, classes and
guidance, per-image random streams and batching (``generate(edit=...)``); only the edit differs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from PIL import Image

from . import editing, sample_files
from . import images as img
from .data import decode_image, from_model_range
from .errors import ConfigError, DataError
from .fileio import ensure_dir
from .models import load_for_sampling

MASK_THRESHOLD = 128  # a mask pixel >= 128 (of 255) after resizing is white


def load_mask(path: str | os.PathLike, image: str | os.PathLike, size: int, invert: bool = False) -> torch.Tensor:
    """The pixels to keep, (1, 1, size, size) bool, from a greyscale mask: white = fill in, black = keep
    (``invert``: the opposite, RePaint's own convention).

    A mask of the image's size goes through the same centre crop and resize as the image; a mask of
    another size is first stretched to the image's size, so its picture lines up with the image's.
    """
    path, image = Path(path), Path(image)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give one mask image")
    try:
        with Image.open(image) as im:  # the image decoded already (sample_files.load_image): its header reads
            target = im.size
        with Image.open(path) as im:
            stretched = None if im.size == target else im.convert("L").resize(target, Image.Resampling.LANCZOS)
    except OSError as err:
        raise DataError(f"cannot read the mask {path}: {err}") from err
    if stretched is None:
        grey = decode_image(path, size, channels=1)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            stretched.save(Path(tmp) / "mask.png")
            grey = decode_image(Path(tmp) / "mask.png", size, channels=1)
    fill = grey >= MASK_THRESHOLD
    if invert:
        fill = ~fill
    if not bool(fill.any()):
        raise ConfigError(
            f"the mask {path} marks no pixel to fill in (white = fill in, black = keep"
            f"{'; --invert-mask swaps them' if not invert else ', swapped by --invert-mask'})"
        )
    return ~fill[None]


def prepare_inpaint(
    checkpoint: str | os.PathLike,
    image: str | os.PathLike,
    mask: str | os.PathLike,
    num: int,
    *,
    out: Path | None,
    grid: Path | None = None,
    steps: int = editing.DEFAULT_REPAINT_STEPS,
    jump_length: int = editing.DEFAULT_JUMP_LENGTH,
    resamplings: int = editing.DEFAULT_RESAMPLINGS,
    invert_mask: bool = False,
    clip: bool = True,
    device: str = "auto",
    classes: list[str] = (),
    guidance: float | None = None,
    overwrite: bool = False,
) -> sample_files.SampleJob:
    """``num`` RePaint inpaintings (Lugmayr et al. 2022) of ``image`` where ``mask`` is white, as a sample job."""
    editing.jump_schedule(steps, jump_length, resamplings)  # checks the three numbers
    if out is None and grid is None:
        raise ConfigError("nothing to write: give --out or --grid")
    job = sample_files.prepare(
        checkpoint, num, out=out, grid=None, sampler="ddpm", steps=steps, clip=clip, device=device,
        classes=classes, guidance=guidance, overwrite=overwrite,
    )  # fmt: skip
    if grid is not None:
        ensure_dir(Path(grid).parent)
    x0 = sample_files.load_image(image, job.checkpoint).to(job.device)
    keep = load_mask(mask, image, x0.shape[-1], invert_mask).to(job.device)
    job.inputs = (x0, keep)

    def edit(model, diffusion, x_T, rows, generator, callback):
        b = x_T.shape[0]
        return editing.repaint(
            model, diffusion, x0.to(x_T.dtype).expand(b, -1, -1, -1), keep, x_T, steps=steps,
            jump_length=jump_length, resamplings=resamplings, generator=generator, clip_x0=clip, callback=callback,
        )  # fmt: skip

    job.edit = edit
    job.steps = editing.repaint_calls(steps, jump_length, resamplings)  # model calls per image, for the report
    return job


def inpaint_grid(x0: torch.Tensor, keep: torch.Tensor, results: torch.Tensor, nrow: int = 8) -> Image.Image:
    """input | input with the hole (grey) | mask (white = filled in) | results, ``nrow`` results a row."""
    x0 = x0.cpu().float()[None]
    keep = keep.cpu()[None]
    holed = torch.where(keep, x0, torch.zeros_like(x0))
    mask = torch.where(keep, -1.0, 1.0).expand_as(x0)
    results = results.cpu().float()
    rows = []
    for start in range(0, results.shape[0], nrow):
        chunk = results[start : start + nrow]
        lead = [x0, holed, mask] if start == 0 else [torch.full_like(x0, -1.0)] * 3
        pad = [torch.full_like(x0, -1.0)] * (nrow - chunk.shape[0])
        rows.append(torch.cat([*lead, chunk, *pad]))
    return img.upscale(img.make_grid(torch.cat(rows), nrow=nrow + 3, pad_value=128), 256)


def save_inpaint(job: sample_files.SampleJob, results: torch.Tensor, *, out: Path | None, grid: Path | None) -> None:
    """The results as ``out/0000.png ...`` and the grid of :func:`inpaint_grid`."""
    sample_files.save(job, results, out=out)
    if grid is not None:
        x0, keep = job.inputs
        img.save_image(inpaint_grid(x0[0], keep[0], results), grid)


def interpolate(
    checkpoint: str | os.PathLike,
    a: str | os.PathLike,
    b: str | os.PathLike,
    frames: int,
    *,
    out: Path,
    method: str = "ddim",
    strength: float = editing.DEFAULT_INTERPOLATION_STRENGTH,
    sampler: str = editing.samplers.DEFAULT_SAMPLER,
    steps: int | None = None,
    seed: int = 0,
    clip: bool = True,
    device: str = "auto",
) -> torch.Tensor:
    """``frames`` images from image ``a`` to image ``b`` (:func:`editing.interpolate`), written to ``out``:
    a strip (a | frames | b) for .png, an animation for .gif. Returns the frames, uint8 (frames, C, S, S)."""
    from .config import check_seed
    from .device import ThreadPolicy, resolve_device

    check_seed(seed)
    editing.check_frames(frames)
    out = Path(out)
    if out.suffix.lower() not in (".png", ".gif"):
        raise ConfigError(f"--out must end in .png (a strip) or .gif (an animation); got {out.name}")
    ensure_dir(out.parent)
    dev = resolve_device(device)
    model, diffusion, ck = load_for_sampling(checkpoint, dev)
    xa, xb = (sample_files.load_image(p, ck).to(dev)[0] for p in (a, b))
    ThreadPolicy(None, dev).start()  # CPU threads: the cores other processes leave free (one batch: decided once)
    x = editing.interpolate(
        model, diffusion, xa, xb, frames, method=method, strength=strength, sampler=sampler, steps=steps, seed=seed,
        clip_x0=clip,
    )  # fmt: skip
    u8 = from_model_range(x.cpu())
    if out.suffix.lower() == ".gif":
        img.save_gif([img.upscale(img.to_pil(f), 128) for f in u8], out, duration_ms=150)
    else:
        strip = torch.cat([from_model_range(xa[None].cpu()), u8, from_model_range(xb[None].cpu())])
        img.save_image(img.upscale(img.make_grid(strip, nrow=strip.shape[0], pad_value=128), 128), out)
    return u8
