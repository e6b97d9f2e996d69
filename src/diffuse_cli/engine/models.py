"""Models for sampling: a U-Net and its diffusion from a checkpoint file, a run folder or a diffusers folder.

The file format is :mod:`checkpoint`'s; diffusers folders are :mod:`diffusers_io`'s. This module builds
what they describe, checks it, and answers questions about it (its classes).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import diffusers_io
from .checkpoint import Checkpoint, check_weights, load, prefixed
from .config import DiffusionConfig, UNetConfig
from .diffusion import Diffusion
from .errors import CheckpointError, ConfigError
from .unet import UNet


def build_model(ck: Checkpoint, device: str | torch.device = "cpu", prefix: str = "") -> Any:
    """The U-Net described by a checkpoint, with its weights loaded, in eval mode."""
    try:
        cfg = UNetConfig.from_dict(ck.model)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ck.path} has an invalid model config: {err}") from err
    trained = (ck.dataset.get("channels"), ck.dataset.get("image_size"))
    trained_hw = tuple(trained[1]) if isinstance(trained[1], list) else (trained[1], trained[1])
    if trained != (None, None) and (trained[0], trained_hw) != (cfg.in_channels, cfg.hw):
        raise CheckpointError(
            f"{ck.path} has an inconsistent model config: {cfg.in_channels}x{cfg.hw[0]}x{cfg.hw[1]} images, "
            f"but it was trained on {trained[0]}x{trained_hw[0]}x{trained_hw[1]} (edited or damaged metadata)"
        )
    weights = {k: v.to("cpu") for k, v in (prefixed(ck.tensors, prefix) if prefix else ck.tensors).items()}
    with torch.device("meta"):  # names and shapes only: a damaged config is refused before it allocates anything
        skeleton = UNet(cfg)
    check_weights(skeleton.state_dict(), weights, ck.path)
    model = UNet(cfg)
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval()


def class_names(ck: Checkpoint) -> list[str]:
    """The class names a checkpoint was trained with, label i first ([] for an unconditional model).

    They live in the ``dataset`` metadata (``classes``); a conditional model without them (edited
    metadata) gets its ids as names.
    """
    k = ck.model.get("num_classes") or 0
    k = k if isinstance(k, int) and k > 0 else 0
    names = ck.dataset.get("classes")
    if isinstance(names, list) and len(names) == k:
        return [str(n) for n in names]
    return [str(i) for i in range(k)]


def load_for_sampling(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a model checkpoint (file, run folder or diffusers folder): returns (model, diffusion, checkpoint).

    ``model`` is the U-Net (EMA weights) in eval mode on ``device``; ``diffusion`` is the
    :class:`~.diffusion.Diffusion` it was trained with, on the same device. A diffusers pipeline
    folder (UNet2DModel + DDPM/DDIM scheduler) is converted on load by :func:`.diffusers_io.load`. A class-conditional
    model's class names are :func:`class_names` of the checkpoint.
    """
    if diffusers_io.is_diffusers_folder(path):
        return diffusers_io.load(path, device)
    ck = load(path)
    if ck.kind == "state":
        prefix = "ema."
    else:
        prefix = ""
    model = build_model(ck, device, prefix=prefix)
    try:
        diffusion = Diffusion(DiffusionConfig.from_dict(ck.diffusion)).to(device)
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ck.path} has an invalid diffusion config: {err}") from err
    if diffusion.learned_variance != model.config.learned_variance:
        raise CheckpointError(
            f"{ck.path} has an inconsistent config: variance {diffusion.config.variance} but "
            f"{model.config.out_channels} output channels (edited or damaged metadata)"
        )
    return model, diffusion, ck


def class_ids(ck: Checkpoint, asked: list[str]) -> tuple[list[int], list[str]]:
    """The ids and names of the classes asked for by name or id; ConfigError for a model without classes
    or an unknown class (listing the known ones)."""
    names = class_names(ck)
    if not names:
        raise ConfigError(
            f"{ck.path} was trained without classes, so --class cannot choose one; train on a folder with one "
            "sub-folder per class (or builtin:digits) with --classes auto"
        )
    ids = []
    for text in asked:
        if text in names:
            ids.append(names.index(text))
        elif text.strip().isdigit() and int(text) < len(names):
            ids.append(int(text))
        else:
            shown = ", ".join(names) if len(names) <= 40 else ", ".join(names[:40]) + f", ... ({len(names)} in all)"
            raise ConfigError(f"unknown class {text!r}; this model knows {shown} (a name or an id 0..{len(names) - 1})")
    return ids, [names[i] for i in ids]


def export(source: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write ``source`` (a diffuse run folder, model or state file, or a diffusers folder) as a diffusers
    DDPMPipeline folder; see :func:`diffusers_io.write_pipeline`."""
    model, diffusion, ck = load_for_sampling(source, "cpu")
    return diffusers_io.write_pipeline(model, diffusion, ck, out_dir, overwrite=overwrite)
