"""Images in, one uint8 tensor (N, C, H, W) out: ONE :func:`load_dataset` for every command.

* :mod:`.folders` decodes image files and folders (every mode, skips counted by reason), in memory;
* :mod:`.builtin` holds the data sets that ship with the package (``builtin:digits``);
* :mod:`.cache` is the decoded-data cache file (format, checks, building) and :mod:`.sharing` who
  builds it and how torchrun's ranks share it; :mod:`.placement` decides where training reads batches.
"""

from __future__ import annotations

import os
from pathlib import Path

from .builtin import BUILTIN, BUILTIN_PREFIX, BuiltinDataset, load_builtin, load_digits
from .folders import (
    DEFAULT_IMAGE_SIZE,
    IMAGE_EXTENSIONS,
    MAX_AUTO_IMAGE_SIZE,
    MAX_IMAGE_PIXELS,
    SKIP_REASONS,
    CacheInfo,
    DataSummary,
    ImageDataset,
    ImageSkipped,
    Progress,
    decode_image,
    display_path,
    from_model_range,
    infer_image_size,
    list_files,
    load_folder,
    resolve_image_size,
    to_model_range,
    with_size_note,
)


def load_dataset(
    spec: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    progress: Progress | None = None,
    *,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **folder_options,
) -> ImageDataset:
    """``builtin:NAME`` (native size by default) or a folder / image file (the images' own size by default).

    Folders are decoded once into the cache (:mod:`.cache`, in ``cache_dir``) that later runs and every
    torchrun process memory-map; ``cache=False`` decodes into memory and writes nothing. Built-in data sets
    are small and ship with the package: they are never cached. ``folder_options`` (``max_pixels``,
    ``workers``) go to :func:`.folders.load_folder`.
    """
    text = os.fspath(spec)
    if isinstance(text, str) and text.startswith(BUILTIN_PREFIX):
        return load_builtin(text[len(BUILTIN_PREFIX) :], image_size, channels)
    root = Path(os.fsdecode(text)).expanduser()
    if not cache:
        return load_folder(root, image_size, channels, progress, **folder_options)
    from .sharing import cached_folder

    if not root.exists():  # the usual mistake: say it before reading any header
        list_files(root)
    size, note, listing = resolve_image_size(root, image_size)
    ds = cached_folder(root, size, channels, progress, cache_dir=cache_dir, listing=listing, **folder_options)
    return with_size_note(ds, note)


def describe(ds: ImageDataset) -> str:
    """How the images were obtained, for the data line: "read from the cache ..." or "decoded into memory"."""
    c = ds.cache
    if c is None:
        return "decoded into memory"
    if c.status == "hit":
        return f"memory-mapped from the cache {c.path}"
    again = f" (decoded again: {c.reason})" if c.reason else ""
    return f"decoded into the cache {c.path}{again}"


__all__ = [
    "BUILTIN",
    "BUILTIN_PREFIX",
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "MAX_AUTO_IMAGE_SIZE",
    "MAX_IMAGE_PIXELS",
    "SKIP_REASONS",
    "BuiltinDataset",
    "CacheInfo",
    "DataSummary",
    "ImageDataset",
    "ImageSkipped",
    "Progress",
    "decode_image",
    "describe",
    "display_path",
    "from_model_range",
    "infer_image_size",
    "list_files",
    "load_builtin",
    "load_dataset",
    "load_digits",
    "load_folder",
    "resolve_image_size",
    "to_model_range",
]
