"""The Typer app and what every command shares: consoles, choices, options, engine errors -> exit codes.

torch is imported lazily inside the commands so that `diffuse --help` stays fast. Engine errors
(DiffuseError) become one red line on stderr and exit code 1 (130 for Ctrl-C); usage errors exit 2
(Click); anything unexpected is reported in one line too, with the traceback only when DIFFUSE_DEBUG=1.
"""

from __future__ import annotations

import math
import os
import sys
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console

from .. import __version__
from ..engine.config import SCHEDULE_NAMES  # no torch

# Off a terminal (a pipe, a log file) rich would squeeze tables to 80 columns; 120 reads better.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False)
EXIT_CODES = (
    "Exit codes: 0 done, 1 could not do it (data, checkpoint, disk), 2 bad usage or option value, 130 Ctrl-C, "
    "143 SIGTERM."
)


def _calm_typer() -> None:
    """Two changes to Typer's output, so every message looks the same:

    * a usage error (unknown option, bad choice, value out of range) is one line on stderr,
      ``error: ...``, exit 2 -- the same line as the engine's own errors;
    * flags show no ``<bool>`` value in --help (``--resume``, not ``--resume <bool>``).
    """
    from typer import core, rich_utils

    def one_line(err) -> None:
        if type(err).__name__ == "NoArgsIsHelpError":  # help was printed already
            return
        ctx = getattr(err, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        message = err.format_message().replace("Value error, ", "")
        err_console.print(f"[bold red]error:[/] {message}{hint}", soft_wrap=True, markup=True, highlight=False)

    rich_utils.rich_format_error = one_line
    plain = core.TyperOption.display_type_rich
    core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else plain(self, ctx)


_calm_typer()

app = typer.Typer(
    name="diffuse",
    help="Train and sample denoising diffusion probabilistic models (DDPM, Ho et al. 2020).\n\n"
    "The forward process adds Gaussian noise in T fixed steps; a U-Net learns to predict that noise; "
    "sampling runs the learned reverse process from pure noise.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EXIT_CODES,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


def choices(name: str, values) -> type[Enum]:
    """A str Enum of the engine's own names, so the CLI's choices cannot drift from what the engine accepts."""
    return Enum(name, {v: v for v in values}, type=str)


Schedule = choices("Schedule", SCHEDULE_NAMES)


def _version(value: bool) -> None:
    if value:
        console.print(f"diffuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Train and sample denoising diffusion probabilistic models."""


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def stopped(message: str, code: int) -> None:
    """An intended stop (Ctrl-C, SIGTERM) is not an error: say what happened, in yellow."""
    err_console.print(f"[bold yellow]stopped:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup (finally blocks, temporary files) runs; exits 143 = 128 + 15."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupt_exit(err: KeyboardInterrupt) -> tuple[str, int]:
    """Message and exit code (128 + signal number, as shells report it) for a Ctrl-C or a SIGTERM."""
    return ("terminated", 143) if isinstance(err, Terminated) else ("interrupted", 130)


def run(fn, *args, **kwargs):
    """Call into the engine, turning its errors into one line and an exit code."""
    from ..engine.errors import DiffuseError, Interrupted, out_of_memory_reason

    try:
        return fn(*args, **kwargs)
    except Interrupted as err:
        stopped(str(err), err.exit_code)
    except DiffuseError as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt as err:
        stopped(*_interrupt_exit(err))
    except (MemoryError, RuntimeError) as err:
        reason = out_of_memory_reason(err)
        if reason is None:
            raise
        fail(reason)


# --- options shared by several commands ------------------------------------------------------
KindOpt = Annotated[Schedule, typer.Option("--kind", "-k", help="Beta schedule.")]
TOpt = Annotated[int, typer.Option("--timesteps", "-T", help="Number of diffusion steps T.")]
BStartOpt = Annotated[float, typer.Option("--beta-start", help="beta at the first step (linear/quadratic/sigmoid).")]
BEndOpt = Annotated[float, typer.Option("--beta-end", help="beta at the last step (linear/quadratic/sigmoid).")]
ZtsnrOpt = Annotated[
    bool, typer.Option("--zero-terminal-snr", help="Rescale so x_T is exactly pure noise (Lin et al. 2024).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (0 or more): same seed, same result.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for torch, fixed (a setting of this machine: --resume does not keep it). "
        "[default: the cores no other process keeps busy, re-checked as the run goes]",
    ),
]


def d(value) -> str:
    """A default shown in a help text, read from the engine's configs."""
    return f"[default: {value}]"


def fmt_snr_db(snr: float) -> str:
    return "-inf" if snr <= 0 else f"{10 * math.log10(snr):+.1f}"


def duration(seconds: float) -> str:
    """3 s, 4 min, 2.5 h: the unit a person would use."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        minutes = seconds / 60
        return f"{minutes:.0f} min" if abs(minutes - round(minutes)) < 0.05 or minutes >= 10 else f"{minutes:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    """Entry point: run the app; never show a traceback unless DIFFUSE_DEBUG=1."""
    import signal

    # SIGTERM (kill, a scheduler, a container stop) unwinds like Ctrl-C, so temporary files are
    # removed and training saves its state; the training loop installs its own handler for that.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt as err:
        message, code = _interrupt_exit(err)
        err_console.print(f"[bold yellow]stopped:[/] {message}")
        sys.exit(code)
    except Exception as err:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("DIFFUSE_DEBUG"):
            raise
        msg = str(err).splitlines()[0] if str(err) else ""
        err_console.print(
            f"[bold red]error:[/] unexpected {type(err).__name__}: {msg} "
            "(please report it; DIFFUSE_DEBUG=1 shows the traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
