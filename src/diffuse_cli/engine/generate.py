"""Batched generation with per-image seeds: ``diffuse sample`` and the training previews.

Image ``i`` of a run with ``seed`` gets its own random generator, seeded from (seed, i), for
its x_T and for any noise a stochastic sampler adds (as EDM's generate.py does). So
``--batch-size`` never changes the images of a given ``--seed``, and image 7 of 64 is
image 7 of 8.

A class-conditional model takes one label per image (``classes``) and a guidance scale
(:mod:`guidance`); the labels never touch the random streams, so image ``i`` starts from the
same x_T whatever class it is asked for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import samplers
from .config import check_seed
from .diffusion import Diffusion
from .errors import ConfigError
from .guidance import check_guidance, guided

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run seeded with ``seed``: independent streams per image."""
    digest = hashlib.blake2b(f"diffuse:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_generators(seed: int, start: int, count: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per image ``start .. start + count - 1``, on ``device``."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in range(start, start + count)]


@dataclass
class Trajectory:
    """(x_t, predicted x0) of the first ``k`` images after every model call, on the CPU."""

    k: int = 4
    frames: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __call__(self, state: dict) -> None:
        self.frames.append((state["x_t"][: self.k].float().cpu(), state["x0_pred"][: self.k].float().cpu()))


@torch.no_grad()
def generate(
    model: Model,
    diffusion: Diffusion,
    num: int,
    shape: tuple[int, ...],
    *,
    sampler: str = samplers.DEFAULT_SAMPLER,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    trajectory: Trajectory | None = None,
    classes: torch.Tensor | None = None,
    guidance: float = 1.0,
    threads=None,
    edit: Callable[..., torch.Tensor] | None = None,
    **options,
) -> torch.Tensor:
    """``num`` samples of ``shape`` (C, H, W) from ``model``, float32 on the CPU in [-1, 1] (clipped
    by the caller if needed). ``progress(done)`` is called after each batch; ``trajectory`` records
    the first batch's denoising. ``options`` go to the sampler (``clip_x0``, ``eta``, ...).

    ``classes`` (``num``,) int64 asks a class-conditional ``model(x_t, t, y)`` for one class per
    image, guided with scale ``guidance`` (:func:`guidance.guided`; 1 = the plain conditional model).
    A conditional model given no ``classes`` samples its unconditional (null-class) model.
    ``threads`` (a :class:`~.device.ThreadPolicy`) sets torch's CPU threads first and is re-checked
    between batches, so a long run follows the machine's load.

    ``edit`` replaces plain sampling from x_T (:mod:`editing`: SDEdit, RePaint): it is called once
    per batch as ``edit(model, diffusion, x_T, rows, generator=gens, callback=...)`` with the
    batch's (guided) model, its per-image noise x_T, the ``slice`` of image indices it holds and
    their generators, and returns the batch's images."""
    check_seed(seed)
    if num < 1:
        raise ConfigError(f"--num must be at least 1 (got {num})")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
    samplers.timestep_grid(diffusion, steps or samplers.default_steps(sampler, diffusion.num_timesteps))  # checks steps
    device = torch.device(device)
    check_guidance(guidance)
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.long).cpu()
        if classes.shape != (num,):
            raise ConfigError(f"give one class per image: {num} images but classes of shape {tuple(classes.shape)}")
        null = int(getattr(model, "null_class", 0))  # a conditional model says which label means "no class"
        if null < 1:
            raise ConfigError("this model was trained without classes, so it cannot be asked for one")
        if bool(((classes < 0) | (classes >= null)).any()):
            raise ConfigError(f"class ids must be in 0..{null - 1}")
    if not getattr(getattr(model, "config", None), "null_class", True):  # e.g. a diffusers num_class_embeds model
        if classes is None:
            raise ConfigError("this model has no unconditional (null) class: give a class for every image")
        if guidance != 1.0:
            raise ConfigError(
                "this model has no null class, so it cannot be guided (Ho & Salimans 2022 need one); use --guidance 1"
            )

    def net(x_t: torch.Tensor, t: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model(x_t, t, *y).float()

    if threads is not None:
        threads.start()
    out = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        gens = image_generators(seed, start, b, device)
        x_T = samplers.noise_like((b, *shape), gens, device)
        call = net if classes is None else guided(net, classes[start : start + b], guidance, null_class=null)
        callback = trajectory if start == 0 else None
        if edit is not None:
            x0 = edit(call, diffusion, x_T, slice(start, start + b), generator=gens, callback=callback)
        else:
            x0 = samplers.sample(
                call, diffusion, x_T, sampler=sampler, steps=steps, generator=gens, callback=callback, **options
            )
        out.append(x0.float().cpu())
        if threads is not None:
            threads.update()
        if progress is not None:
            progress(start + b)
    return torch.cat(out)
