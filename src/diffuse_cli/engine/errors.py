"""The engine's only way of reporting a user's mistake.

The CLI catches :class:`DiffuseError`, prints ``str(err)`` on one line and exits
with ``err.exit_code``: 2 for a bad option value (:class:`ConfigError`, like a usage error), 1 when
the work could not be done, 128 + the signal number when interrupted. Internal invariants use ``assert`` instead.
"""

from __future__ import annotations


class DiffuseError(Exception):
    """A problem the user can act on; the message says what and how."""

    exit_code = 1


class ConfigError(DiffuseError):
    """Invalid parameters (schedule, model, training or sampling options): a usage error, exit 2 as for
    an unknown option."""

    exit_code = 2


class Unsupported(DiffuseError):
    """What the input asks for cannot be expressed by the target format (e.g. an export to diffusers)."""


class DataError(DiffuseError):
    """Input images could not be found or decoded."""


class CheckpointError(DiffuseError):
    """A checkpoint is missing, corrupt, unsafe or of the wrong kind."""


class OutputError(DiffuseError):
    """An output path cannot be written (permissions, full disk, occupied folder)."""


class TrainingDiverged(DiffuseError):
    """The loss became NaN or infinite."""


class Interrupted(DiffuseError):
    """The user pressed Ctrl-C (or sent SIGTERM); state was saved.

    The exit code is 128 + the signal number, as a shell reports a process killed by it:
    130 for Ctrl-C (SIGINT), 143 for SIGTERM.
    """

    exit_code = 130

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def out_of_memory_reason(err: BaseException) -> str | None:
    """A one-line reason if ``err`` is an allocation failure (CPU or GPU), else None."""
    import re

    text = str(err)
    markers = ("out of memory", "can't allocate memory", "storage size calculation overflowed")
    if not (isinstance(err, MemoryError) or any(m in text.lower() for m in markers)):
        return None
    size = re.search(r"allocate ([\d.]+ ?[KMGTP]?i?B|\d+ bytes)", text)
    return (
        f"out of memory{f' (tried to allocate {size.group(1)})' if size else ''}; "
        "try a smaller --batch-size, --image-size or model"
    )
