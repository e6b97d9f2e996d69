"""Who decodes a cached folder: one process per machine builds or checks the cache under a lock;
under torchrun the other ranks wait for its note, then map the file (see :mod:`.cache` for the format)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError, OutputError
from ..fileio import TMP_PREFIX, atomic_write_text, describe_os_error, ensure_dir
from . import folders as D

try:  # POSIX; elsewhere the atomic rename alone keeps readers safe, and builders may race
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .cache import CacheInvalid, build_cache, cache_path, default_cache_dir, fingerprint, open_cache

WAIT_POLL_S = 0.05


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<path>.lock`` (blocking)."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise OutputError(describe_os_error(err, lock)) from err
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:  # a file system without locks (some network mounts): renames still keep
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # readers safe
                    raise OutputError(describe_os_error(err, lock)) from err
        yield
    finally:
        os.close(fd)  # releases the lock


def launch_id() -> str | None:
    """This torchrun launch (same on every rank of every node), or None outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    return "/".join(os.environ.get(k, "") for k in keys)


def process_start_time() -> float | None:
    """When this process started (seconds since the epoch, rounded down to the second), or None if unknown.

    From /proc: the start time in clock ticks since boot, plus the boot time.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        btime = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _note_path(path: Path) -> Path:
    return path.with_name(path.name + ".ready")


def _read_note(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        note = json.loads(_note_path(path).read_text(encoding="utf-8"))
        if isinstance(note, dict):
            return note
    return {}


def _check_or_build(
    path, root, image_size, channels, progress, max_pixels, workers, listing=None
) -> tuple[D.ImageDataset, str]:
    """Under the lock: map a valid cache (its data checked) or decode a new one. Returns (dataset, fingerprint).
    ``listing``: :func:`data.list_files` of ``root`` when the caller has just walked it."""
    files, ignored, unreadable = listing or D.list_files(root)
    fp = fingerprint(root, files, image_size, channels, max_pixels, ignored, unreadable)
    src = D.display_path(root)
    try:
        return open_cache(path, fp, verify_data=True, source=src), fp
    except CacheInvalid as why:
        reason = "" if str(why) == "missing" else str(why)
    # Builders hold the lock, so a temporary of this file that exists now was left by a killed one.
    for old in path.parent.glob(f"{TMP_PREFIX}*-{path.name}"):
        with contextlib.suppress(OSError):
            old.unlink()
    build_cache(path, root, files, image_size, channels, fp, progress, ignored=ignored,
                unreadable_folders=unreadable, max_pixels=max_pixels, workers=workers)  # fmt: skip
    try:
        ds = open_cache(path, fp, source=src)
    except CacheInvalid as err:  # just written under the lock: only a failing disk gets here
        raise DataError(f"the data cache {path} could not be read back ({err}); try --no-cache") from err
    status = "rebuilt" if reason else "built"
    return dataclasses.replace(ds, cache=D.CacheInfo(path, status, reason)), fp


def cached_folder(
    root: str | os.PathLike,
    image_size: int = D.DEFAULT_IMAGE_SIZE,
    channels: int | None = None,
    progress: D.Progress | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_pixels: int = D.MAX_IMAGE_PIXELS,
    workers: int | None = None,
    listing: tuple | None = None,
) -> D.ImageDataset:
    """The folder (or image file) ``root`` decoded as by :func:`data.load_folder`, via a cache file.

    The local leader (every process outside torchrun, local rank 0 under it) checks the
    cache and decodes it again when it is missing, stale or damaged; the other ranks
    wait for it and map the same file (see the module docstring).
    """
    image_size = D._check_size_channels(image_size, channels)
    root = Path(root)
    if not root.exists():  # the usual mistake: say it before touching the cache directory
        D.list_files(root)
    folder = ensure_dir(default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser())
    path = cache_path(folder, root, image_size, channels)
    launch = launch_id()
    leader = launch is None or int(os.environ.get("LOCAL_RANK", "0")) == 0
    if leader:
        with _locked(path):
            try:
                ds, fp = _check_or_build(path, root, image_size, channels, progress, max_pixels, workers, listing)
            except Exception as err:
                if launch is not None:  # let the waiting ranks stop with the same message
                    msg = (
                        str(err) if isinstance(err, DataError | OutputError) else "local rank 0 failed to read the data"
                    )
                    with contextlib.suppress(OutputError):
                        note = {"launch": launch, "time": time.time(), "error": msg}
                        atomic_write_text(_note_path(path), json.dumps(note))
                raise
            if launch is not None:
                atomic_write_text(
                    _note_path(path), json.dumps({"launch": launch, "time": time.time(), "fingerprint": fp})
                )
        return ds
    # Not the leader: wait for its note for this launch (torchrun stops us if it dies). A note left by an
    # earlier launch with the same id (a fixed --rdzv-id and port) is older than this process: not ours.
    started = process_start_time()
    while True:
        with _locked(path):
            note = _read_note(path)
            written = note.get("time")
            fresh = started is None or (isinstance(written, int | float) and written >= started)
            if note.get("launch") == launch and fresh:
                if "error" in note:
                    raise DataError(str(note["error"]))
                try:
                    return open_cache(path, note.get("fingerprint"), source=D.display_path(root))
                except CacheInvalid as why:
                    raise DataError(f"the data cache {path} changed while this run started ({why}); "
                                    "start it again") from why  # fmt: skip
        time.sleep(WAIT_POLL_S)
