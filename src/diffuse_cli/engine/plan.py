"""The training plan: the configs a `diffuse train` run uses, from the options given and the run in --out.

New runs take each setting from its option, else from the preset and the data (image size, channels,
classes, device). ``--resume`` keeps the stored run's model, diffusion and class settings and applies only
the training options given again (a larger ``--steps``, a new ``--time``); see ``TrainConfig.resumed``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import budget, rundir
from .config import (
    AUGMENT_DIM,
    UNLIMITED_STEPS,
    DiffusionConfig,
    TrainConfig,
    UNetConfig,
    default_batch_size,
    parse_duration,
    parse_positive_ints,
)
from .data import ImageDataset, Progress, describe, load_dataset

MIN_CLASS_IMAGES = 10  # a class with fewer training images gets a warning

#: Regularisation for small data sets: (at most this many images, augment p, dropout), first match wins.
#: Models trained on a few hundred images reproduce them (near-copies); non-leaking augmentation
#: (Karras et al. 2022, appendix C.4) and dropout counter that. A row goes in only where measurement says
#: it beats both no augmentation and flips on FD to the whole data set *and* on near-copies
#: (benchmarks/augment.py, section in benchmarks/RESULTS.md). Measured on subsets of the 16x16 digits,
#: 6,000 steps of the tiny preset: on 100 images p 0.12 with dropout 0.1 cut near-copies 91% -> 17% and
#: FD to all 1,797 digits 20.7 -> 18.0 (flips: 27%, 27.7); on 500 images plain training does not copy
#: (0.4%) and generalises (FD 3.3, below the 5.0 of the 500 images themselves), and augmentation only
#: costs FD (7.0), so larger folders train as before.
SMALL_DATA: tuple[tuple[int, float, float], ...] = ((100, 0.12, 0.1),)


def regularisation(num_images: int) -> tuple[float, float | None]:
    """(augment p, dropout) that new runs on ``num_images`` images get by default; dropout None: the preset's."""
    for most, p, dropout in SMALL_DATA:
        if num_images <= most:
            return p, dropout
    return 0.0, None


def _regularise(n: int, train: dict, model: dict) -> tuple[dict, dict, str]:
    """``train`` and ``model`` options with the data-size defaults filled in (augment p, dropout, the
    augmentation conditioning), and the words for the data line ("" when nothing was filled in)."""
    p, dropout = regularisation(n)
    said, off = [], ""
    if train.get("augment") is None:
        train = {**train, "augment": p}
        if p:
            said.append(f"augment p = {p:g}")
            off = " (--augment 0: off)"
    if model.get("dropout") is None and dropout is not None:
        model = {**model, "dropout": dropout}
        said.append(f"dropout {dropout:g}")
    model = {**model, "augment_dim": AUGMENT_DIM if train["augment"] else 0}
    why = f"{' and '.join(said)} for {n} images, so they are not copied{off}" if said else ""
    return train, model, why


@dataclass(frozen=True)
class TrainPlan:
    out: Path
    data: ImageDataset
    model: UNetConfig
    diffusion: DiffusionConfig | None  # None on --resume: training takes it from the stored state
    train: TrainConfig
    resume: bool
    overwrite: bool
    data_line: str  # "builtin:digits: 1797 images used, 1x8x8, decoded into memory in 0.0s"
    notes: tuple[tuple[str, str], ...]  # (level, text), level "" or "warning": the data's skips, classes, ...
    sizing: str = ""  # why this model, when --time chose it (engine/budget.py); "" otherwise


def class_notes(data: ImageDataset) -> list[tuple[str, str]]:
    """Lines about the data's classes: their count and images per class; a warning for classes too small
    to be learned."""
    import torch

    if data.labels is None:
        return [("warning", note) for note in data.notes]
    counts = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    per = ", ".join(f"{name} {n}" for name, n in zip(data.classes, counts, strict=True))
    lines = [("", f"{len(data.classes)} classes, images per class: {per}")]
    few = [f"{name} ({n})" for name, n in zip(data.classes, counts, strict=True) if n < MIN_CLASS_IMAGES]
    if few:
        which = "these classes have" if len(few) > 1 else "this class has"
        lines.append(
            (
                "warning",
                f"warning: {which} fewer than {MIN_CLASS_IMAGES} images and may not be learned: {', '.join(few)}",
            )
        )
    return lines


def _configs(stored, data: ImageDataset, preset: str, device_type: str, train: dict, model: dict, diffusion: dict):
    """(model, diffusion, train) configs and the data line's words on regularisation: from the options and the
    data for a new run, from the stored run on resume."""
    if train.get("time_limit") is not None:
        train = {**train, "time_limit": parse_duration(train["time_limit"])}
        if train.get("steps") is None and stored is None:
            train["steps"] = UNLIMITED_STEPS
    if stored is not None:
        return UNetConfig.from_dict(stored.model), None, TrainConfig.from_dict(stored.train).resumed(**train), "", ""
    chose_model = any(v is not None for v in model.values())  # before the data-size defaults fill any in
    train, model, why = _regularise(data.images.shape[0], train, model)
    model = {
        **model,
        "channel_mults": parse_positive_ints(model.get("channel_mults"), "--channel-mults"),
        "attention_resolutions": parse_positive_ints(
            model.get("attention_resolutions"), "--attention-res", allow_empty=True
        ),
    }
    model_config = UNetConfig.preset(
        preset, data.image_size, data.channels, device_type, num_classes=len(data.classes), **model
    )
    diffusion_config = DiffusionConfig(**{k: v for k, v in diffusion.items() if v is not None})
    train = {**train, "batch_size": train.get("batch_size") or default_batch_size(device_type)}
    train_config = TrainConfig(**{k: v for k, v in train.items() if v is not None})
    sizing = ""
    if budget.wants_sizing(train_config.time_limit, preset, device_type, chose_model, resume=False):
        sized = budget.size_for_budget(
            model_config, train_config.time_limit, train_config.batch_size, train_config.precision
        )
        model_config, sizing = sized.model, sized.note
    return model_config, diffusion_config, train_config, why, sizing


def plan_training(
    data_spec: str,
    out: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    preset: str = "auto",
    classes: str = "auto",
    train: dict | None = None,
    model: dict | None = None,
    diffusion: dict | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> TrainPlan:
    """Load the data (through the cache) and decide every config of the run.

    ``train``, ``model`` and ``diffusion`` map config field names to the options given (None = not given;
    ``time_limit`` is a duration text such as ``"5m"``, ``channel_mults``/``attention_resolutions``
    comma-separated text). ``classes`` is ``auto`` (learn the data's labels) or ``none``.
    """
    from .device import resolve_device

    rundir.check_mode(resume, overwrite)
    out = Path(out) if out is not None else rundir.default_out(data_spec)
    stored = rundir.newest_state(out, tensors=False) if resume else None  # metadata only: training reads tensors
    if stored is not None:
        image_size = image_size or stored.model.get("image_size")
        channels = channels or stored.model.get("in_channels")
    t0 = time.perf_counter()
    data = load_dataset(data_spec, image_size, channels, progress, cache=cache, cache_dir=cache_dir)
    n, c, h, w = data.images.shape
    size_note = f" ({data.summary.size_note})" if data.summary.size_note else ""
    data_line = (
        f"{data.summary.source}: {n} images used, {c}x{h}x{w}{size_note}, {describe(data)} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    notes = [("warning", line) for line in data.summary.lines()]
    conditional = stored.model.get("num_classes") if stored is not None else classes != "none"
    if not conditional:
        data = dataclasses.replace(
            data, labels=None, classes=(), notes=()
        )  # unconditional, as asked (or as the run was)
    if stored is not None and classes == "none" and conditional:
        notes.append(
            ("warning", "--classes none does not apply to --resume: the run keeps the classes it was started with")
        )
    notes += class_notes(data)
    model_config, diffusion_config, train_config, why, sizing = _configs(
        stored, data, preset, resolve_device(device).type, train or {}, model or {}, diffusion or {}
    )
    data_line += f"; {why}" if why else ""
    return TrainPlan(
        out, data, model_config, diffusion_config, train_config, resume, overwrite, data_line, tuple(notes), sizing
    )
