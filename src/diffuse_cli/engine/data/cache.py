"""Decode an image folder once into a uint8 file that every rank and every later run memory-maps.

One cache file per (folder, image size, channels) lives in the cache directory
(:func:`default_cache_dir`: ``$DIFFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffuse``,
else ``~/.cache/diffuse``). Its layout::

    bytes 0..44      magic b"DIFFUSEU8", format version (u32), data offset (u64), JSON offset (u64),
                     JSON length (u64), CRC-32 of the JSON (u32), 3 bytes reserved (little-endian)
    data offset..    N * C * H * W raw uint8 rows, (N, C, H, W) C-order: what numpy.memmap maps
                     (65536 when written: page-aligned on every platform)
    JSON offset..    the JSON header, right after the data: shape (N, C, H, W), fingerprint, CRC-32 of
                     the data, the DataSummary (counts of skipped files by reason, a few example names),
                     the class names and one label per image; the file ends with it

The header follows the data because its size is only known once the folder is decoded (the labels of a
class folder grow with the number of images), and then it has no size limit. Files of older format
versions (version 2 kept the header in a fixed 64 KiB slot, which 20,000 labelled images overflowed) are
decoded again like any other invalid cache.

The fingerprint hashes the decoder's version, the image size, the channels asked for,
the pixel limit and, for every image file under the folder, its relative path, size and
mtime. A file added, removed or touched changes it, and the cache is decoded again.

Nothing in a cache file is trusted without a check. Every opener checks the magic,
version, header checksum, fingerprint and the exact file size (a truncated file fails
here); the process that decides whether to rebuild (see below) also reads the data once
to check its CRC-32 (a damaged byte fails here). A file that fails is decoded again.

Writing is atomic (:func:`fileio.atomic_path`: a temporary file in the same folder,
renamed over the old one), so a reader sees the old file or the new one, never a
half-written one. A lock file (``flock``) serialises builders and checkers, across
processes and, on file systems whose locks work across machines, across nodes.

Who builds the cache and how torchrun's ranks share it is :mod:`.sharing`'s; whether batches are read
from the mapping or from a copy on the accelerator is :mod:`.placement`'s.

Under torchrun, each node's local rank 0 checks or builds the cache while holding the
lock, then leaves a note ``<cache>.ready`` naming this launch (run id, master address,
restart count); the node's other ranks wait until the note names their launch, then
map the file without scanning the folder. If local rank 0 fails, the note carries its
error and every rank stops with that one line.

A memory-mapped dataset is an ordinary CPU tensor: ``images[idx]`` reads only the rows
in ``idx``, the bytes come from the page cache that every process on the machine
shares, and the values are those of the in-memory decode, so training is bit-identical.
:func:`place_images` then decides, per device, whether to copy the uint8 data onto the
accelerator (when it fits) or to read each batch from the mapping.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from ..config import format_size, normalize_size
from ..fileio import atomic_path
from . import folders as D

MAGIC = b"DIFFUSEU8"
FORMAT_VERSION = 3  # 2: class labels from sub-folders in the header; 3: the header after the data, any size
# Bump when decode_image's output changes for some file: every cache is then decoded again.
DECODER_VERSION = 1
_PREFIX = struct.Struct("<9sIQQQI3x")  # magic, format version, data offset, JSON offset, JSON length, JSON CRC-32
DATA_OFFSET = 65536  # where a writer puts the data: page-aligned on every platform
HEADER_MAX = 1 << 30  # bytes of JSON a reader accepts (about 100 million labels): a damaged length is refused
SUFFIX = ".u8"
_CHUNK = 16 << 20  # bytes per block while building (moving rows, checksumming the mapping)
_READ = 1 << 20  # bytes per read while checking: a small buffer leaves no large allocation behind
EXAMPLE_NAME_MAX = 200  # characters of an example file name kept in the header


class CacheInvalid(Exception):
    """A cache file that cannot be used; the message says why (internal: it is rebuilt)."""


# --------------------------------------------------------------------------- where


def default_cache_dir() -> Path:
    """``$DIFFUSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffuse``, else ``~/.cache/diffuse``."""
    if os.environ.get("DIFFUSE_CACHE_DIR"):
        return Path(os.environ["DIFFUSE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and os.path.isabs(os.path.expanduser(xdg)) else Path.home() / ".cache"
    return base / "diffuse"


def cache_path(cache_dir: str | os.PathLike, root: str | os.PathLike, image_size, channels: int | None) -> Path:
    """The cache file of (folder, image size, channels): readable name + hash of the real path."""
    real = os.path.realpath(os.fsencode(Path(root).expanduser()))
    digest = hashlib.sha256(real).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.fsdecode(os.path.basename(real)))[:40].strip("._") or "data"
    return Path(cache_dir).expanduser() / f"{name}-{digest}-{format_size(image_size)}px-{channels or 'auto'}c{SUFFIX}"


def fingerprint(
    root: Path,
    files: list[str],
    image_size: int,
    channels: int | None,
    max_pixels: int,
    ignored: int = 0,
    unreadable_folders: int = 0,
) -> str:
    """SHA-256 over what decides the decoded array: settings, and each file's path, size and mtime.

    ``files`` as :func:`data.list_files` gives them (strings under ``root``).
    """
    h = hashlib.sha256()
    size = list(image_size) if isinstance(image_size, tuple) else image_size  # a square's key is what it was
    h.update(json.dumps([DECODER_VERSION, size, channels, max_pixels, ignored, unreadable_folders]).encode())
    base = os.path.join(os.fspath(root), "")  # with one trailing separator
    for p in files:
        try:
            st = os.stat(p)
            stamp = b"%d %d" % (st.st_size, st.st_mtime_ns)
        except OSError as err:  # decoding will skip it as unreadable; if it comes back, the key changes
            stamp = b"error %d" % (err.errno or 0)
        rel = p[len(base) :] if p.startswith(base) else os.path.basename(p)
        h.update(os.fsencode(rel) + b"\0" + stamp + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def _crc32_of_file(f, start: int, length: int) -> int:
    """CRC-32 of ``length`` bytes from ``start``, read in chunks (plain reads: no pages stay mapped)."""
    f.seek(start)
    crc = 0
    buf = bytearray(min(_READ, max(length, 1)))
    view = memoryview(buf)
    left = length
    while left:
        got = f.readinto(view[: min(len(buf), left)])
        if not got:
            raise CacheInvalid("the file is shorter than its header says")
        crc = zlib.crc32(view[:got], crc)
        left -= got
    return crc


def read_header(f) -> dict:
    """The JSON header of an open cache file, after checking magic, version, checksum and size.

    Its key ``"data_offset"`` says where the data start (from the prefix).
    """
    f.seek(0)
    raw = f.read(_PREFIX.size)
    if len(raw) < _PREFIX.size:
        raise CacheInvalid("the file is truncated (no header)")
    magic, version, data_offset, json_offset, n, crc = _PREFIX.unpack(raw)
    if magic != MAGIC:
        raise CacheInvalid("it is not a diffuse cache file")
    if version != FORMAT_VERSION:
        raise CacheInvalid(f"it has format version {version}, this version reads {FORMAT_VERSION}")
    if not (_PREFIX.size <= data_offset <= json_offset and 0 < n <= HEADER_MAX):
        raise CacheInvalid("its header is damaged")
    size = os.fstat(f.fileno()).st_size
    if size != json_offset + n:  # the header ends the file: a cut or an append shows here
        raise CacheInvalid(f"the file has {size} bytes, its header says {json_offset + n} (truncated or damaged)")
    f.seek(json_offset)
    text = f.read(n)
    if len(text) != n or zlib.crc32(text) != crc:
        raise CacheInvalid("its header is damaged")
    try:
        head = json.loads(text)
        shape = tuple(int(v) for v in head["shape"])
        ok = len(shape) == 4 and shape[0] > 0 and shape[1] in (1, 3) and min(shape[2:]) > 0
    except (ValueError, KeyError, TypeError) as err:
        raise CacheInvalid("its header is damaged") from err
    if not ok or json_offset != data_offset + int(np.prod(shape)):
        raise CacheInvalid("its header is damaged")
    head["shape"], head["data_offset"] = shape, data_offset
    return head


def open_cache(
    path: str | os.PathLike, expect_fingerprint: str | None = None, *, verify_data: bool = False, source: str = ""
) -> D.ImageDataset:
    """Map a cache file read-only (copy-on-write) as an :class:`ImageDataset`; CacheInvalid if unusable.

    ``verify_data`` also reads the whole data section once to check its CRC-32.
    ``source`` replaces the stored source text in the summary (the folder as given now).
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError as err:
        raise CacheInvalid("missing") from err
    except OSError as err:
        raise CacheInvalid(f"unreadable ({err.strerror or err})") from err
    with f:
        try:
            head = read_header(f)
            if expect_fingerprint is not None and head.get("fingerprint") != expect_fingerprint:
                raise CacheInvalid("the folder changed: a file was added, removed or modified")
            offset = head["data_offset"]
            if verify_data and _crc32_of_file(f, offset, int(np.prod(head["shape"]))) != head.get("data_crc32"):
                raise CacheInvalid("its data is damaged (checksum mismatch)")
            # Mapping the descriptor we checked: a builder renaming a new file over the path cannot
            # swap the data under us. Read-only and shared: a private (copy-on-write) mapping would be
            # charged to the commit limit in full, and one larger than RAM + swap would be refused.
            array = np.memmap(f, dtype=np.uint8, mode="r", offset=offset, shape=head["shape"])
        except OSError as err:
            raise CacheInvalid(f"unreadable ({err.strerror or err})") from err
    try:
        s = head["summary"]
        summary = D.DataSummary(
            source=source or str(s["source"]),
            found=int(s["found"]),
            used=int(s["used"]),
            channels=int(s["channels"]),
            image_size=normalize_size(s["image_size"]),
            skipped={str(k): int(v) for k, v in s.get("skipped", {}).items()},
            examples={str(k): tuple(map(str, v)) for k, v in s.get("examples", {}).items()},
            ignored=int(s.get("ignored", 0)),
            unreadable_folders=int(s.get("unreadable_folders", 0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CacheInvalid("its header is damaged") from err
    if (summary.used, summary.channels, D.hw(summary.image_size)) != (*head["shape"][:2], tuple(head["shape"][2:])):
        raise CacheInvalid("its header is damaged")
    try:
        labels = None if head.get("labels") is None else torch.tensor(head["labels"], dtype=torch.int64)
        classes, notes = tuple(map(str, head.get("classes", []))), tuple(map(str, head.get("notes", [])))
    except (TypeError, ValueError) as err:
        raise CacheInvalid("its header is damaged") from err
    if labels is not None and (labels.shape != (summary.used,) or len(classes) < 2):
        raise CacheInvalid("its header is damaged")
    with warnings.catch_warnings():  # "not writable": nothing writes into a dataset (batches are gathered copies)
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(array)  # shares the mapping; rows are read from disk when first touched
    return D.ImageDataset(images, summary, labels, classes, notes, cache=D.CacheInfo(path, "hit"))


# --------------------------------------------------------------------------- writing


def write_header(f, head: dict) -> None:
    """Write the prefix, and the JSON header right after the data, into the open file ``f``; the file ends there.

    The data are ``prod(head["shape"])`` bytes at :data:`DATA_OFFSET`.
    """
    head = {k: v for k, v in head.items() if k != "data_offset"}  # the prefix holds it
    text = json.dumps(head).encode()
    json_offset = DATA_OFFSET + int(np.prod(head["shape"]))
    f.seek(json_offset)
    f.write(text)
    f.truncate(json_offset + len(text))
    f.seek(0)
    f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, DATA_OFFSET, json_offset, len(text), zlib.crc32(text)))


def _compact(flat: np.ndarray, n: int, planes: int, row_pixels: int, used: list[int], channels: int) -> None:
    """Move the used rows (first ``channels`` planes) to the front of ``flat``, in place.

    Destinations never pass the end of the block just read (j <= i and channels <= planes),
    so a block is copied out before anything overwrites it.
    """
    src_row = planes * row_pixels
    dst_row = channels * row_pixels
    rows_per_block = max(1, _CHUNK // src_row)
    used_arr = np.asarray(used, dtype=np.int64)
    j = 0
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        sel = used_arr[(used_arr >= start) & (used_arr < stop)] - start
        block = flat[start * src_row : stop * src_row].reshape(stop - start, planes, row_pixels)
        moved = np.ascontiguousarray(block[sel, :channels])  # a copy
        flat[j * dst_row : (j + len(sel)) * dst_row] = moved.reshape(-1)
        j += len(sel)


def build_cache(
    path: Path,
    root: Path,
    files: list[str],
    image_size: int,
    channels: int | None,
    fp: str,
    progress: D.Progress | None = None,
    *,
    ignored: int = 0,
    unreadable_folders: int = 0,
    max_pixels: int = D.MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> None:
    """Decode ``files`` straight into a new cache file at ``path`` (atomically replacing any old one).

    The rows are decoded into a mapping of the file itself, so a dataset larger than memory
    can be built. DataError when no image is usable (no file is left behind).
    """
    n = len(files)
    planes = channels or 3
    height, width = D.hw(image_size)
    row_pixels = height * width
    with atomic_path(path) as tmp:
        with open(tmp, "w+b") as f:
            total = DATA_OFFSET + n * planes * row_pixels
            if hasattr(os, "posix_fallocate"):
                try:  # a full disk fails here with ENOSPC, not later as SIGBUS inside the mapping
                    os.posix_fallocate(f.fileno(), 0, total)
                except OSError as err:
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # the file system cannot: fall back
                        raise
                    f.truncate(total)
            else:  # pragma: no cover
                f.truncate(total)
        flat = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=DATA_OFFSET, shape=(n * planes * row_pixels,))
        buffer = torch.from_numpy(flat).view(n, planes, height, width)
        reasons, gray = D.decode_into(files, buffer, channels, progress, max_pixels=max_pixels, workers=workers)
        used, summary = D.summarize(root, files, reasons, gray, image_size, channels, ignored, unreadable_folders)
        classes, labels, notes = D.folder_classes(Path(root), [Path(files[i]) for i in used])
        c = summary.channels
        if len(used) != n or c != planes:
            _compact(flat, n, planes, row_pixels, used, c)
        length = len(used) * c * row_pixels
        crc = 0
        for start in range(0, length, _CHUNK):
            crc = zlib.crc32(flat[start : min(length, start + _CHUNK)], crc)
        flat.flush()
        del buffer, flat
        s = summary.to_dict()
        s["examples"] = {r: [e[:EXAMPLE_NAME_MAX] for e in ex] for r, ex in summary.examples.items()}
        head = {"shape": [len(used), c, height, width], "dtype": "uint8", "fingerprint": fp,
                "data_crc32": crc, "summary": s, "classes": list(classes), "notes": list(notes),
                "labels": None if labels is None else labels.tolist()}  # fmt: skip
        with open(tmp, "r+b") as f:
            write_header(f, head)
