"""Built-in datasets that ship with the package (no download): ``builtin:digits``."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from ..errors import DataError
from .folders import DataSummary, ImageDataset, _check_size_channels, hw

# --------------------------------------------------------------------------- built-in datasets

_DIGITS_FILE = "digits.bin.gz"
_DIGITS_HEADER = struct.Struct("<4sIBBB")  # magic, count, height, width, max value; see scripts/make_digits.py


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 UCI handwritten digits: (images uint8 (1797, 1, 8, 8), labels int64 (1797,)).

    White strokes on black, as in MNIST: the original ink counts 0..16 map to
    round(v * 255 / 16) (halves up), so 0 -> 0 and 16 -> 255.
    """
    try:
        raw = gzip.decompress(resources.files("diffuse_cli.data").joinpath(_DIGITS_FILE).read_bytes())
        magic, n, h, w, vmax = _DIGITS_HEADER.unpack_from(raw)
        if magic != b"DGT1" or len(raw) != _DIGITS_HEADER.size + n + n * h * w:
            raise ValueError("unexpected layout")
    except (OSError, ValueError, EOFError, struct.error, zlib.error) as err:
        raise DataError(f"the built-in digits data is missing or damaged ({err}); reinstall diffuse-cli") from err
    buf = bytearray(raw)  # writable, so torch.frombuffer does not warn
    off = _DIGITS_HEADER.size
    labels = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=off).to(torch.int64)
    ink = torch.frombuffer(buf, dtype=torch.uint8, count=n * h * w, offset=off + n).to(torch.int32)
    images = ((ink * 255 + vmax // 2) // vmax).to(torch.uint8).reshape(n, 1, h, w)
    return images, labels


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    native_size: int
    channels: int
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (uint8 (N, C, S, S), int64 labels (N,))
    classes: tuple[str, ...] = ()  # the name of each label


BUILTIN: Mapping[str, BuiltinDataset] = {
    "digits": BuiltinDataset(
        name="digits",
        description="1,797 8x8 handwritten digits, white on black (UCI, Alpaydin & Kaynak 1998, CC BY 4.0)",
        native_size=8,
        channels=1,
        load=load_digits,
        classes=tuple("0123456789"),
    ),
}
BUILTIN_PREFIX = "builtin:"


def _resize_u8(images: torch.Tensor, size) -> torch.Tensor:
    """Bicubic resize of a uint8 batch to ``size`` (a side or (H, W); antialiased when shrinking), rounded."""
    x = F.interpolate(images.float(), size=hw(size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0, 255).round_().to(torch.uint8)


def load_builtin(name: str, image_size: int | None = None, channels: int | None = None) -> ImageDataset:
    """A built-in dataset by name (see :data:`BUILTIN`), at its native size unless ``image_size`` is given."""
    info = BUILTIN.get(name)
    if info is None:
        available = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN)
        raise DataError(f"unknown built-in dataset {BUILTIN_PREFIX}{name} (available: {available})")
    size = _check_size_channels(info.native_size if image_size is None else image_size, channels)
    images, labels = info.load()
    if size != info.native_size:
        images = _resize_u8(images, size)
    channels = channels or info.channels
    if images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601-2 luma, as Pillow's "L"
        images = (images.float() * weights).sum(1, keepdim=True).round_().to(torch.uint8)
    n = images.shape[0]
    summary = DataSummary(source=BUILTIN_PREFIX + name, found=n, used=n, channels=channels, image_size=size)
    return ImageDataset(images.contiguous(), summary, labels, info.classes)
