"""Atomic file writes: a crash at any moment leaves either the old file or the new one.

Each write goes to a hidden temporary file in the same folder, is flushed and
fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX and
Windows); the folder is fsync'ed so the rename itself survives a power cut.
OS errors become :class:`OutputError` with a one-line reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

TMP_PREFIX = ".diffuse-tmp-"


def describe_os_error(err: OSError, path: str | os.PathLike) -> str:
    """A one-line, actionable description of an OS error while writing ``path``."""
    if err.errno == errno.ENOSPC:
        return f"no space left on device while writing {path}"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: cannot write {path}"
    if err.errno == errno.EROFS:
        return f"read-only file system: cannot write {path}"
    if err.errno == errno.ENOTDIR:
        return f"not a directory: a parent of {path} is a file"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {path}"
    if err.errno == errno.EFBIG:
        return f"file too large for the file system (or the process's file size limit): cannot write {path}"
    if err.errno == errno.EISDIR:
        return f"{path} is a directory, expected a file path"
    return f"cannot write {path}: {err.strerror or err}"


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) as a directory, or raise OutputError."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise OutputError(f"{p} exists and is not a directory") from err
    except OSError as err:
        raise OutputError(describe_os_error(err, p)) from err
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"permission denied: cannot write into {p}")
    return p


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"{target} is a directory, expected a file path")
    ensure_dir(folder)
    tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{target.name}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(folder)
    except OSError as err:
        raise OutputError(describe_os_error(err, target)) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries left by a killed process in ``folder``; return how many."""
    n = 0
    with contextlib.suppress(OSError):
        for p in Path(folder).glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


def check_appendable(path: Path) -> Path:
    """``path`` if a JSON-lines record can be appended to it (its folder is created); OutputError otherwise."""
    ensure_dir(path.parent if str(path.parent) else Path("."))
    if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot append to {path}; choose another file with --log")
    return path


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line."""
    import json

    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise OutputError(describe_os_error(err, path)) from err


def safe_name(name: str) -> str:
    """A name (e.g. a class's) as a piece of a file name."""
    import re

    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "class"
