"""Image folders and built-in datasets -> uint8 tensors.

A dataset is decoded once into one contiguous uint8 tensor (N, C, H, W) on the
CPU: in memory (:func:`load_folder`), or, through :mod:`.cache`, into a cache
file that later runs and every torchrun process memory-map. Training gathers
batches from it on its device, maps them to [-1, 1] with :func:`to_model_range`
and augments them there (see ``step.py``).

How an image file becomes a (C, S, S) uint8 tensor (:func:`decode_image`):

* The whole file is decoded, so a truncated or damaged file fails here and is
  skipped, never half-used (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off).
* The EXIF orientation is applied. Animated GIF, WebP and TIFF files give their
  first frame.
* Transparency (modes LA, PA, RGBA, or P/L/RGB with a transparent colour) is
  composited onto WHITE. Images with transparent backgrounds are mostly icons,
  sprites, logos and scanned digits drawn to be shown on a page; on black, their
  black strokes or outlines would vanish.
* 16-bit integer images (I;16, I;16B, ...) are scaled by their bit depth,
  ``v * 255 / 65535``, never clipped, so a 16-bit PNG keeps its full range.
  32-bit integer images (mode I) whose values lie in 0..65535 are treated the
  same way, since that is what 16-bit PNG, PGM and TIFF files decode to; any
  other range is stretched linearly from its min..max to 0..255.
* Float images (mode F, e.g. float TIFF) whose values lie in [0, 1] are scaled by
  255 (the usual convention for float images); values in [0, 255] are used as
  they are; any other range is stretched min..max. NaN counts as the minimum,
  +-inf as the finite maximum / minimum.
* The largest centred box of the target's shape is cropped and resized to it
  (Lanczos, antialiased when shrinking): for a square ``image_size`` S the
  shorter side becomes S and the centred square is kept; for ``(H, W)`` (a
  non-square size, ``--image-size 24x40``) the box has the aspect ratio W / H. Tiny images, even 1x1, are
  upscaled and used: they are valid images.
* ``channels=1`` gives luminance (Pillow's "L", ITU-R 601-2), ``channels=3`` RGB.
  ``channels=None`` picks 1 when every used image is colourless (a grayscale
  mode, or RGB with three equal channels) and 3 otherwise.

Files that cannot be used are skipped and counted by reason (:data:`SKIP_REASONS`);
the :class:`DataSummary` says how many and gives a few example names.

Folders default to the images' own size (:func:`infer_image_size`: the most common shorter
side, rounded to a size the U-Net supports, at most :data:`MAX_AUTO_IMAGE_SIZE`; H x W when the
images share one non-square aspect ratio). Built-in datasets
default to their native size. A path to a single image file is accepted as a
one-image dataset (handy to check that a model can memorise one picture).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import format_size, parse_size
from ..errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_IMAGE_SIZE = 32  # for folders whose images' sizes cannot be read; built-in datasets use their native size
MAX_AUTO_IMAGE_SIZE = 64  # the largest size picked without --image-size: 64x64 already trains for hours on a CPU
MAX_IMAGE_SIZE = 4096  # beyond it a data set no longer fits in memory, let alone trains
SIZE_PROBE = 1000  # images whose headers are read to guess the size
# Pillow's own default (about 9459 x 9459). Pillow warns above it and refuses twice
# as much; we skip anything above it as "too large". A lower value may be passed in.
MAX_IMAGE_PIXELS = 89_478_485
SKIP_REASONS = ("unreadable", "empty", "not an image", "corrupt or truncated", "too large")
EXAMPLES_PER_REASON = 3
# reason -> how DataSummary.lines() says it for one file and for several ("{n}" is the count)
_SKIP_PHRASES = {
    "unreadable": ("skipped 1 unreadable file", "skipped {n} unreadable files"),
    "empty": ("skipped 1 empty file", "skipped {n} empty files"),
    "not an image": ("skipped 1 file that is not an image", "skipped {n} files that are not images"),
    "corrupt or truncated": ("skipped 1 corrupt or truncated file", "skipped {n} corrupt or truncated files"),
    "too large": ("skipped 1 image too large to decode safely", "skipped {n} images too large to decode safely"),
}

Progress = Callable[[int, int], None]  # progress(done, total)

# What Pillow raises for damaged data: its decoders use OSError ("image file is
# truncated", "broken data stream"), its parsers SyntaxError, struct.error,
# ValueError, IndexError, KeyError or EOFError; zlib.error for a bad PNG stream.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, zlib.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_GRAY_MODES = ("1", "L", "LA", "La")
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def display_path(path: str | os.PathLike) -> str:
    """``path`` as printable text: bytes that are not UTF-8 appear as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class ImageSkipped(DataError):
    """One file could not be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        self.path = Path(os.fsdecode(path))
        self.reason = reason
        self.detail = detail
        super().__init__(f"cannot use {display_path(path)}: {reason}" + (f" ({detail})" if detail else ""))


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class DataSummary:
    """What was loaded, what was skipped and why; stored in checkpoint metadata."""

    source: str  # "builtin:digits" or the folder / file as given (printable)
    found: int  # files with an image extension
    used: int  # images in the dataset
    channels: int
    image_size: int | tuple[int, int]  # a side, or (height, width) for non-square images (UNetConfig's form)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count, reasons with count > 0 only
    examples: dict[str, tuple[str, ...]] = field(default_factory=dict)  # reason -> first few names
    ignored: int = 0  # files without an image extension (hidden files are not counted)
    unreadable_folders: int = 0
    size_note: str = ""  # how the image size was chosen, when it was not given

    def lines(self) -> list[str]:
        """One human line per kind of skipped or ignored file, in a fixed order."""
        out = []
        for reason in SKIP_REASONS:
            n = self.skipped.get(reason, 0)
            if n:
                line = _SKIP_PHRASES[reason][n != 1].format(n=n)
                if self.examples.get(reason):
                    line += f" (e.g. {', '.join(self.examples[reason])})"
                out.append(line)
        if self.unreadable_folders:
            out.append(f"skipped {_plural(self.unreadable_folders, 'unreadable folder')}")
        if self.ignored:
            out.append(f"ignored {_plural(self.ignored, 'file')} without an image extension")
        return out

    def to_dict(self) -> dict:
        """JSON-ready counts (example names are left out: they are for the console, not the checkpoint)."""
        return {
            "source": self.source,
            "found": self.found,
            "used": self.used,
            "channels": self.channels,
            "image_size": list(self.image_size) if isinstance(self.image_size, tuple) else self.image_size,
            "skipped": dict(self.skipped),
            "ignored": self.ignored,
            "unreadable_folders": self.unreadable_folders,
        }


@dataclass(frozen=True)
class CacheInfo:
    """Where a dataset's decoded images live on disk (see :mod:`.datacache`)."""

    path: Path  # the cache file, memory-mapped read-only
    status: str  # "hit" (read as it was), "built" (decoded now), "rebuilt" (decoded again: see reason)
    reason: str = ""  # why a cache file that was there could not be used ("the folder changed", ...)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Decoded images: in memory, or memory-mapped from a cache file (``cache`` says which)."""

    images: torch.Tensor  # (N, C, H, W) uint8, contiguous, CPU (RAM or a read-only file mapping)
    summary: DataSummary
    labels: torch.Tensor | None = None  # (N,) int64 where the source has classes (builtin:digits, class folders)
    classes: tuple[str, ...] = ()  # class names; label i is classes[i]
    notes: tuple[str, ...] = ()  # why the data has no classes when that may surprise (one sub-folder, loose files)
    cache: CacheInfo | None = None  # None: decoded into memory for this process only

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4 and self.images.is_contiguous()
        assert self.labels is None or self.labels.shape == self.images.shape[:1]
        assert (self.labels is None) == (not self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int | tuple[int, int]:
        """A side for square images, else (height, width): UNetConfig's form."""
        h, w = self.images.shape[-2:]
        return h if h == w else (h, w)


# --------------------------------------------------------------------------- value ranges and augmentation


def to_model_range(u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 0..255 -> float in [-1, 1] (x / 127.5 - 1), on the same device."""
    return u8.to(dtype).div_(127.5).sub_(1.0)


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 0..255: clamped, then rounded to nearest."""
    return x.detach().float().clamp(-1.0, 1.0).add(1.0).mul_(127.5).round_().to(torch.uint8)


# --------------------------------------------------------------------------- finding files


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path) -> tuple[list[str], int, int]:
    """(image files, other files, unreadable sub-folders) under the folder ``root``.

    Hidden names (starting with '.') are skipped. Symlinked folders are followed,
    each real folder at most once (by (st_dev, st_ino)), which makes loops safe.
    Paths are plain strings (``root`` joined with the names): a million ``Path``
    objects would cost seconds and a gigabyte before the first image is read.
    """
    top = os.fspath(root)
    found: list[tuple[tuple[bytes, ...], str]] = []  # (relative path as bytes, folder by folder; path)
    ignored = unreadable = 0
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, tuple[bytes, ...]]] = [(top, ())]
    while stack:
        folder, parts = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(folder) as it:  # sorted: a folder reached twice (symlinks) is named the same way
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as err:
            if folder == top:
                raise DataError(f"cannot read folder {display_path(root)}: {err.strerror or err}") from err
            unreadable += 1
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
                is_file = not is_dir and entry.is_file()
                dangling = not is_dir and not is_file and entry.is_symlink()
            except OSError:
                is_dir = is_file = False
                dangling = True
            if is_dir:
                subfolders.append((entry.path, (*parts, os.fsencode(entry.name))))
            elif _has_image_extension(entry.name) and (is_file or dangling):
                found.append(((*parts, os.fsencode(entry.name)), entry.path))  # a dangling link: unreadable later
            else:
                ignored += 1  # other files, and FIFOs, sockets, devices, whose reading could block
        stack.extend(reversed(subfolders))
    found.sort(key=lambda f: f[0])
    return [path for _, path in found], ignored, unreadable


# --------------------------------------------------------------------------- decoding one image


def hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a size in UNetConfig's form (a side, or a pair)."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def format_hw(image_size) -> str:
    """``32x32`` or ``24x40`` (height x width)."""
    h, w = hw(image_size)
    return f"{h}x{w}"


def _check_size_channels(image_size, channels: int | None) -> int | tuple[int, int]:
    """``image_size`` (a side, an (H, W) pair or text such as ``24x40``) in UNetConfig's form, checked."""
    bad = ConfigError(
        f"--image-size must be a whole number or HxW between 1 and {MAX_IMAGE_SIZE} (got {format_size(image_size)!r})"
    )
    if isinstance(image_size, str):
        try:
            image_size = parse_size(image_size)
        except ConfigError:
            raise bad from None
    if isinstance(image_size, list):
        image_size = tuple(image_size)
    parts = image_size if isinstance(image_size, tuple) else (image_size,)
    if len(parts) not in (1, 2) or any(isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGE_SIZE
                                       for n in parts):  # fmt: skip
        raise bad
    if channels not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 (grayscale) or 3 (RGB) (got {channels!r})")
    h, w = hw(image_size)
    return h if h == w else (h, w)


def _stretch_to_l(img: Image.Image) -> Image.Image:
    """Integer (I, I;16*) or float (F) image -> 8-bit L, by the rules in the module docstring."""
    a = np.asarray(img).astype(np.float64)
    is_float = img.mode == "F"
    if img.mode.startswith("I;16"):
        u = a * (255.0 / 65535.0)
    else:
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        if is_float and lo >= 0.0 and hi <= 1.0:
            u = a * 255.0
        elif is_float and lo >= 0.0 and hi <= 255.0:
            u = a
        elif not is_float and lo >= 0.0 and hi <= 65535.0:
            u = a * (255.0 / 65535.0)  # 16-bit data in a 32-bit container
        elif hi > lo:
            u = (a - lo) * (255.0 / (hi - lo))
        else:
            u = np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(u), 0, 255).astype(np.uint8), "L")


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> L or RGB, transparency composited onto white."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return _stretch_to_l(img)
    gray = mode in _GRAY_MODES
    if img.has_transparency_data:
        rgba = img.convert("LA" if gray else "RGBA")
        base = Image.new("L" if gray else "RGB", img.size, 255 if gray else (255, 255, 255))
        base.paste(rgba.convert(base.mode), mask=rgba.getchannel("A"))  # alpha blend: a * fg + (1 - a) * white
        return base
    return img.convert("L" if gray else "RGB")


def _read_image(
    path: str | os.PathLike, size: tuple[int, int], channels: int | None, max_pixels: int
) -> tuple[np.ndarray, bool]:
    """Decode ``path`` to an (H, W) or (H, W, 3) uint8 array (``size`` = (H, W)) and whether it has no colour.

    Raises ImageSkipped. The caller turns DecompressionBombWarning into an error.
    """
    try:
        f = open(path, "rb")  # closed by the `with` below; Pillow reads from it
    except OSError as err:
        raise ImageSkipped(path, "unreadable", err.strerror or str(err)) from err
    with f:
        try:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageSkipped(path, "empty")
            img = Image.open(f)  # reads the header only
        except UnidentifiedImageError as err:
            # A file that starts like a PNG, JPEG, GIF, TIFF or WebP but that Pillow cannot even
            # identify was cut short or damaged early on (e.g. inside a GIF's palette).
            f.seek(0)
            head = f.read(12)
            damaged = head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            raise ImageSkipped(path, "corrupt or truncated" if damaged else "not an image") from err
        except _BOMB_ERRORS as err:
            raise ImageSkipped(path, "too large", str(err)) from err
        except _DECODE_ERRORS as err:
            raise _damaged(path, err) from err
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageSkipped(path, "too large", f"{w}x{h} pixels, the limit is {max_pixels}")
            try:
                height, width = size
                img.draft(None, (width, height))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that is enough
                img.load()  # the whole first frame: damaged data fails here
                frame: Image.Image = img
                try:
                    frame = ImageOps.exif_transpose(img)
                except _DECODE_ERRORS:
                    pass  # damaged EXIF data: the pixels are fine, keep them unrotated
                frame = _to_l_or_rgb(frame)
                if channels == 1 and frame.mode == "RGB":
                    frame = frame.convert("L")  # before resizing: a third of the work
                frame = frame.resize(
                    (width, height),
                    Image.Resampling.LANCZOS,
                    box=_crop_box(frame.size, size),
                    reducing_gap=3.0,  # shrink by an integer factor first, then resample: fast, same quality
                )
            except _BOMB_ERRORS as err:
                raise ImageSkipped(path, "too large", str(err)) from err
            except _DECODE_ERRORS as err:
                raise _damaged(path, err) from err
    arr = np.array(frame)  # a writable copy: torch.from_numpy needs one
    if arr.ndim == 2:
        return arr, True
    return arr, bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def _crop_box(wh: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The largest centred box of a ``wh`` = (w, h) picture with the aspect ratio of ``size`` = (H, W)."""
    w, h = wh
    height, width = size
    if height == width:  # the centred square, in whole pixels
        m = min(w, h)
        left, top = (w - m) // 2, (h - m) // 2
        return left, top, left + m, top + m
    bw = min(w, h * width / height)
    bh = bw * height / width
    left, top = (w - bw) / 2, (h - bh) / 2
    return left, top, left + bw, top + bh


def _damaged(path: Path, err: Exception) -> ImageSkipped:
    # An OSError with an errno is the operating system failing to read (EIO, ...);
    # Pillow's own "truncated" / "broken data stream" errors carry none.
    if isinstance(err, OSError) and err.errno is not None:
        return ImageSkipped(path, "unreadable", err.strerror or str(err))
    return ImageSkipped(path, "corrupt or truncated", str(err) or type(err).__name__)


def _to_chw(arr: np.ndarray, channels: int | None) -> torch.Tensor:
    t = torch.from_numpy(arr)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if channels == 3 and t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


class _BombWarningsAsErrors(warnings.catch_warnings):
    """Pillow's DecompressionBombWarning becomes an error; its other warnings (odd EXIF, ...) are silenced.

    Warning filters are process-wide, so this wraps a whole load, not each
    decoding thread (entering and leaving catch_warnings from threads races).
    """

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", module="PIL")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return out


def decode_image(
    path: str | os.PathLike, image_size: int, channels: int | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Decode one image file to a (C, H, W) uint8 tensor (``image_size``: a side, (H, W) or ``"HxW"``).

    ``channels`` 1 or 3 forces grayscale or RGB; None keeps 1 for colourless images
    and 3 otherwise. Raises :class:`ImageSkipped` (a DataError) with ``.reason`` in
    :data:`SKIP_REASONS` when the file cannot be used. Images over ``max_pixels``
    (which can lower, not raise, Pillow's own limit) are "too large".
    """
    size = hw(_check_size_channels(image_size, channels))
    with _BombWarningsAsErrors():
        arr, colourless = _read_image(Path(path), size, channels, max_pixels)
    if channels is None and colourless and arr.ndim == 3:
        arr = arr[..., 0]
    return _to_chw(arr, channels)


# --------------------------------------------------------------------------- folders


def _default_workers() -> int:
    # Pillow releases the GIL in its decoders and in resize, so threads can use
    # every core; a few extra hide file-system latency.
    return min(16, (os.cpu_count() or 1) + 2)


def folder_classes(root: Path, files: list[Path]) -> tuple[tuple[str, ...], torch.Tensor | None, tuple[str, ...]]:
    """Class labels from sub-folder names, torchvision ImageFolder's convention: (names, labels, notes).

    A file's class is the first folder of its path below ``root`` (so ``root/cat/2024/a.png`` is
    a cat); ids follow the names sorted as raw bytes, so they do not depend on the locale.
    Only folders that hold used images count, so empty class folders are no classes. The data is
    unlabelled (labels None, with a note saying why when sub-folders exist) unless every image
    sits in a sub-folder and there are at least two of them.
    """
    parts = [p.relative_to(root).parts for p in files] if root.is_dir() else []
    loose = sum(len(q) == 1 for q in parts)
    names = sorted({q[0] for q in parts if len(q) > 1}, key=os.fsencode)
    if not names:
        return (), None, ()
    if loose:
        return (
            (),
            None,
            (
                f"{_plural(loose, 'image')} directly in {display_path(root)}, so its sub-folders "
                "are not used as classes (put every image in a class folder to train with classes)",
            ),
        )
    if len(names) == 1:
        return (
            (),
            None,
            (f"all images are in one sub-folder ({display_path(names[0])}): one class, so training is unconditional",),
        )
    ids = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([ids[q[0]] for q in parts], dtype=torch.int64)
    return tuple(display_path(n) for n in names), labels, ()


def list_files(root: str | os.PathLike) -> tuple[list[str], int, int]:
    """(image files, other files ignored, unreadable sub-folders) of a folder or a single image file.

    The files are paths as strings, in a fixed order: by path relative to ``root``, compared folder by
    folder as raw bytes, so it does not depend on the file system or the locale. Hidden files and folders
    are skipped; symlinked folders are followed once (loops are safe); unreadable sub-folders are skipped.

    Raises DataError when ``root`` is missing, is not an image file, or holds no images.
    """
    root = Path(root)
    src = display_path(root)
    if not root.exists():
        raise DataError(f"no such file or folder: {src}")
    if root.is_dir():
        files, ignored, unreadable_folders = _walk(root)
    elif _has_image_extension(root.name):
        files, ignored, unreadable_folders = [os.fspath(root)], 0, 0
    else:
        raise DataError(f"{src} is neither a folder nor an image file ({' '.join(IMAGE_EXTENSIONS)})")
    if not files:
        extra = f"; {_plural(unreadable_folders, 'unreadable folder')} skipped" if unreadable_folders else ""
        raise DataError(
            f"no images found in {src} (looked for {' '.join(IMAGE_EXTENSIONS)}; "
            f"{_plural(ignored, 'other file')} ignored{extra})"
        )
    return files, ignored, unreadable_folders


def decode_into(
    files: Sequence[str | os.PathLike],
    buffer: torch.Tensor,
    channels: int | None,
    progress: Progress | None = None,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> tuple[list[ImageSkipped | None], list[bool]]:
    """Decode ``files[i]`` into ``buffer[i]`` ((N, C, S, S) uint8; C = 3 when ``channels`` is None).

    ``buffer`` may live in memory or in a memory-mapped file. Returns, per file, the
    skip (None if used) and whether the image is colourless. Rows of skipped files are
    left as they were. ``progress(done, total)`` is called from this thread, first with 0.
    """
    n = len(files)
    planes, size = buffer.shape[1], tuple(buffer.shape[-2:])
    assert buffer.shape[0] == n and planes == (channels or 3) and buffer.dtype == torch.uint8
    gray = [False] * n

    # Each thread writes its own rows, so no lock is needed.
    def work(i: int) -> ImageSkipped | None:
        try:
            arr, gray[i] = _read_image(files[i], size, channels, max_pixels)
        except ImageSkipped as skip:
            return skip
        buffer[i] = _to_chw(arr, planes)
        return None

    reasons: list[ImageSkipped | None] = []
    if progress:
        progress(0, n)
    n_workers = min(n, max(1, workers if workers is not None else _default_workers()))
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="diffuse-decode") if n_workers > 1 else None
    try:
        with _BombWarningsAsErrors():
            for skip in (pool.map if pool else map)(work, range(n)):  # both keep the order of `files`
                reasons.append(skip)
                if progress:
                    progress(len(reasons), n)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, do not decode the rest
    return reasons, gray


def summarize(
    root: str | os.PathLike,
    files: Sequence[str | os.PathLike],
    reasons: list[ImageSkipped | None],
    gray: list[bool],
    image_size: int,
    channels: int | None,
    ignored: int = 0,
    unreadable_folders: int = 0,
) -> tuple[list[int], DataSummary]:
    """(indices of the used files, summary) after :func:`decode_into`; DataError if none is usable.

    ``channels`` None becomes 1 when every used image is colourless, else 3.
    """
    root = Path(root)
    src = display_path(root)
    n = len(files)

    def shown(p: str | os.PathLike) -> str:
        p = Path(p)
        return display_path(p.relative_to(root)) if p != root else display_path(p.name)

    skipped: dict[str, int] = {}
    examples: dict[str, tuple[str, ...]] = {}
    for path, skip in zip(files, reasons, strict=True):
        if skip is not None:
            reason = skip.reason
            skipped[reason] = skipped.get(reason, 0) + 1
            if len(examples.get(reason, ())) < EXAMPLES_PER_REASON:
                examples[reason] = (*examples.get(reason, ()), shown(path))
    skipped = {r: skipped[r] for r in SKIP_REASONS if r in skipped}
    examples = {r: examples[r] for r in skipped}
    used_idx = [i for i, r in enumerate(reasons) if r is None]
    if not used_idx:
        details = "; ".join(
            f"{count} {reason} (e.g. {', '.join(examples[reason])})" for reason, count in skipped.items()
        )
        if n == 1:
            raise DataError(str(reasons[0]))
        raise DataError(f"none of the {n} images in {src} could be decoded: {details}")
    if channels is None:
        channels = 1 if all(gray[i] for i in used_idx) else 3
    summary = DataSummary(
        source=src,
        found=n,
        used=len(used_idx),
        channels=channels,
        image_size=image_size,
        skipped=skipped,
        examples=examples,
        ignored=ignored,
        unreadable_folders=unreadable_folders,
    )
    return used_idx, summary


def _round_side(side: int) -> int:
    """The nearest multiple of 4 (8 from 64 up: what the U-Net's levels divide), at least 8."""
    multiple = 8 if side >= 64 else 4
    return max(8, int(side / multiple + 0.5) * multiple)


def infer_image_size(
    files: Sequence[str | os.PathLike], max_size: int = MAX_AUTO_IMAGE_SIZE
) -> tuple[int | tuple[int, int], str]:
    """The size to train at when none is given, and a note saying why: the most common shorter side
    among the images (headers only, up to :data:`SIZE_PROBE` files spread over the list), rounded to
    the nearest multiple of 4 (8 from 64 up: what the U-Net's levels divide), at least 8, at most
    ``max_size``. When every probed image has the same non-square aspect ratio (within 1%), the
    longer side follows it: (H, W), the longer side rounded the same way."""
    step = max(1, len(files) // SIZE_PROBE)
    sides: dict[int, int] = {}
    ratios: list[float] = []  # width / height of each probed image
    for p in list(files)[::step][:SIZE_PROBE]:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - unreadable files are counted when they are decoded
            continue
        sides[min(w, h)] = sides.get(min(w, h), 0) + 1
        ratios.append(w / h)
    if not sides:
        return DEFAULT_IMAGE_SIZE, "no image size could be read; pass --image-size to choose"
    side = max(sides, key=lambda k: (sides[k], k))  # most common; ties: the larger
    size = min(max_size, _round_side(side))
    capped = side > max_size
    ratio = ratios[0]
    shared = all(abs(r / ratio - 1) <= 0.01 for r in ratios) and abs(ratio - 1) > 0.01
    if shared:  # one aspect ratio: keep it, the shorter side as for squares
        long = _round_side(round(size * max(ratio, 1 / ratio)))
        if long != size:
            hw_size = (size, long) if ratio > 1 else (long, size)
            own = (side, round(side * ratio)) if ratio > 1 else (round(side / ratio), side)
            if capped:
                return hw_size, (f"the images are {format_hw(own)}; capped at {format_hw(hw_size)}, their aspect "
                                 "ratio kept; pass --image-size to change")  # fmt: skip
            if hw_size == own:
                return hw_size, "the images' own size"
            return hw_size, f"the images are {format_hw(own)}; {format_hw(hw_size)} keeps their aspect ratio"
    if capped:
        return max_size, f"the images are {side} px; capped at {max_size}, pass --image-size to change"
    return size, "the images' own size" if size == side else f"the images' {side} px rounded to {size}"


def resolve_image_size(root: str | os.PathLike, image_size: int | None) -> tuple[int, str, tuple | None]:
    """``(image_size, note, listing)``: the size given (note "", listing None), else :func:`infer_image_size`
    over the folder's images, with the :func:`list_files` result it walked, so callers need not walk again."""
    if image_size is not None:
        return image_size, "", None
    listing = list_files(root)
    return (*infer_image_size(listing[0]), listing)


def with_size_note(ds: ImageDataset, note: str) -> ImageDataset:
    """``ds`` whose summary says how its image size was chosen."""
    if not note:
        return ds
    return dataclasses.replace(ds, summary=dataclasses.replace(ds.summary, size_note=note))


def load_folder(
    root: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    progress: Progress | None = None,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> ImageDataset:
    """Decode every usable image under ``root`` (a folder, or a single image file) into memory.

    ``channels`` None: 1 if every used image is colourless, else 3. ``progress``,
    if given, is called as ``progress(done, total)`` from this thread, first with
    done = 0. Decoding runs on ``workers`` threads (default: cores + 2); the order
    of the images is that of :func:`list_files` whatever the number of threads.
    (:mod:`.datacache` decodes the same way into a file that later runs memory-map.)
    ``image_size`` None: the images' own size (:func:`infer_image_size`).
    """
    root = Path(root)
    image_size, note, listing = resolve_image_size(root, image_size)
    image_size = _check_size_channels(image_size, channels)
    files, ignored, unreadable_folders = listing or list_files(root)
    # Decoded straight into the final buffer (three planes when the channel count is still open).
    buffer = torch.empty((len(files), channels or 3, *hw(image_size)), dtype=torch.uint8)
    reasons, gray = decode_into(files, buffer, channels, progress, max_pixels=max_pixels, workers=workers)
    used_idx, summary = summarize(root, files, reasons, gray, image_size, channels, ignored, unreadable_folders)
    images = buffer if len(used_idx) == len(files) else buffer[used_idx]
    if images.shape[1] != summary.channels:
        images = images[:, : summary.channels]  # all colourless: the three planes are equal
    classes, labels, notes = folder_classes(root, [Path(files[i]) for i in used_idx])
    return with_size_note(ImageDataset(images.contiguous(), summary, labels, classes, notes), note)
