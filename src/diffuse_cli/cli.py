"""The `diffuse` command line: parse, validate, call the engine, print with rich.

torch is imported lazily inside the commands so that `diffuse --help` stays fast.
Engine errors (DiffuseError) become one red line on stderr and exit code 1
(130 for Ctrl-C); usage errors exit 2 (Click); anything unexpected is reported
in one line too, with the traceback only when DIFFUSE_DEBUG=1.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .engine.config import (  # no torch
    DEFAULT_GUIDANCE,
    KINDS,
    PRECISIONS,
    PREDICTIONS,
    PRESETS,
    SAMPLER_NAMES,
    UNLIMITED_STEPS,
    WEIGHTINGS,
    DiffusionConfig,
    TrainConfig,
)

# Off a terminal (a pipe, a log file) rich would squeeze tables to 80 columns; 120 reads better.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False)
EXIT_CODES = "Exit codes: 0 done, 1 could not do it (data, checkpoint, disk), 2 bad usage or option value, 130 Ctrl-C, 143 SIGTERM."


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
        err_console.print(f"[bold red]error:[/] {err.format_message().replace('Value error, ', '')}{hint}", soft_wrap=True, markup=True, highlight=False)

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


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of the engine's own names, so the CLI's choices cannot drift from what the engine accepts."""
    return Enum(name, {v: v for v in values}, type=str)


Kind = _choices("Kind", KINDS)
Format = _choices("Format", ("table", "json", "csv"))
Prediction = _choices("Prediction", PREDICTIONS)
SamplerName = _choices("SamplerName", SAMPLER_NAMES)
Weighting = _choices("Weighting", WEIGHTINGS)
Precision = _choices("Precision", PRECISIONS)
Preset = _choices("Preset", ("auto", *PRESETS))
Classes = _choices("Classes", ("auto", "none"))
MIN_CLASS_IMAGES = 10  # a class with fewer training images gets a warning


def _version(value: bool) -> None:
    if value:
        console.print(f"diffuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False) -> None:
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


def _run(fn, *args, **kwargs):
    """Call into the engine, turning its errors into one line and an exit code."""
    from .engine.errors import DiffuseError, Interrupted, out_of_memory_reason

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


# --- shared options -----------------------------------------------------------------------
KindOpt = Annotated[Kind, typer.Option("--kind", "-k", help="Beta schedule.")]
TOpt = Annotated[int, typer.Option("--timesteps", "-T", help="Number of diffusion steps T.")]
BStartOpt = Annotated[float, typer.Option("--beta-start", help="beta at the first step (linear/quadratic/sigmoid).")]
BEndOpt = Annotated[float, typer.Option("--beta-end", help="beta at the last step (linear/quadratic/sigmoid).")]
ZtsnrOpt = Annotated[bool, typer.Option("--zero-terminal-snr", help="Rescale so x_T is exactly pure noise (Lin et al. 2024).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (0 or more): same seed, same result.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]


def _diffusion(kind: str, timesteps: int, beta_start: float, beta_end: float, zero_terminal_snr: bool, prediction: str = "eps"):
    from .engine.diffusion import Diffusion, DiffusionConfig

    return Diffusion(DiffusionConfig(kind, timesteps, beta_start, beta_end, zero_terminal_snr, prediction))


def _fmt_snr_db(snr: float) -> str:
    if snr <= 0:
        return "-inf"
    return f"{10 * math.log10(snr):+.1f}"


# --- schedule -------------------------------------------------------------------------------
@app.command(no_args_is_help=False)
def schedule(
    kind: Annotated[list[Kind], typer.Option("--kind", "-k", help="Beta schedule; repeat to compare several.")] = [Kind("linear")],  # noqa: B006
    timesteps: TOpt = 1000,
    beta_start: BStartOpt = 1e-4,
    beta_end: BEndOpt = 0.02,
    zero_terminal_snr: ZtsnrOpt = False,
    format: Annotated[Format, typer.Option("--format", "-f", help="table for people; json/csv with every t.")] = Format("table"),
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot of alpha_bar, sqrt forms and log-SNR.")] = None,
    rows: Annotated[int, typer.Option("--rows", help="How many timesteps the table shows.", min=2)] = 11,
) -> None:
    """Show a beta schedule: beta_t, alpha_bar_t and the signal-to-noise ratio.

    alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s; then
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, and SNR_t = alpha_bar_t / (1 - alpha_bar_t).
    t is 0-based: t = 0 is the first noisy step (x_1 in Ho et al. 2020), t = T-1 is x_T.

    **Examples**

        diffuse schedule --kind cosine

        diffuse schedule -k linear -k cosine --plot schedules.png

        diffuse schedule --kind sigmoid -T 500 --format json > sigmoid.json
    """
    kinds = list(dict.fromkeys(k.value for k in kind))
    diffs = {k: _run(_diffusion, k, timesteps, beta_start, beta_end, zero_terminal_snr) for k in kinds}
    if plot is not None:
        from .engine.images import schedule_plot

        _run(schedule_plot, diffs, plot)
    if format is Format("json"):
        objs = [d.schedule_record(k) for k, d in diffs.items()]
        sys.stdout.write(json.dumps(objs[0] if len(objs) == 1 else objs) + "\n")
    elif format is Format("csv"):
        rows_ = [d.schedule_record(k) for k, d in diffs.items()]
        lead = len(rows_) > 1  # a leading kind column only when several schedules are compared
        lines = [("kind," if lead else "") + "t,beta,alpha_bar,snr"]
        lines += [
            (f"{r['kind']}," if lead else "") + ",".join(map(repr, v)) for r in rows_ for v in zip(r["t"], r["beta"], r["alpha_bar"], r["snr"], strict=True)
        ]
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        for k, d in diffs.items():
            _schedule_table(k, d, rows, zero_terminal_snr)
    if plot is not None and format is Format("table"):
        console.print(f"plot written to [bold]{plot}[/]")


def _schedule_table(kind: str, d, rows: int, ztsnr: bool) -> None:
    T = d.num_timesteps
    rows = min(rows, max(T, 2))  # --rows 100000000 must not loop for minutes to show T rows
    ts = sorted({min(round(i * T / (rows - 1)), T - 1) for i in range(rows)})  # 0, 100, ..., 900, 999 for T = 1000
    title = f"{kind} schedule, T = {T}" + (", zero terminal SNR" if ztsnr else "")
    table = Table(title=title, title_justify="left")
    for col in ("t", "beta_t", "abar_t", "sqrt(abar_t)", "sqrt(1-abar_t)", "SNR", "SNR dB"):
        table.add_column(col, justify="right")
    for t in ts:
        snr = float(d.snr[t])
        row = (d.betas[t], d.alphas_cumprod[t], d.sqrt_alphas_cumprod[t], d.sqrt_one_minus_alphas_cumprod[t])
        table.add_row(str(t), *(f"{float(v):{f}}" for v, f in zip(row, (".6f", ".4g", ".4f", ".4f"), strict=True)), f"{snr:.4g}", _fmt_snr_db(snr))
    console.print(table)
    console.print("abar = alpha_bar = prod of (1 - beta); t is 0-based (t = 0 is x_1 in Ho et al. 2020, t = T-1 is x_T)")
    snr_T = float(d.snr[-1])
    console.print(
        f"signal left in x_T: sqrt(alpha_bar) = {float(d.sqrt_alphas_cumprod[-1]):.3g};  alpha_bar_T = {float(d.alphas_cumprod[-1]):.3g};  SNR(T) = {snr_T:.3g} ({_fmt_snr_db(snr_T)} dB)"
    )
    if snr_T > 1e-3:
        console.print(
            f"[bold yellow]warning:[/] x_T is not close to pure noise (SNR(T) = {snr_T:.3g} > 1e-3): "
            "sampling starts from N(0, I) but training never saw that; use more steps, a larger --beta-end "
            "or --zero-terminal-snr."
        )
    elif snr_T == 0:
        console.print("[green]x_T is pure noise[/] (SNR(T) = 0), as the reverse process assumes.")
    else:
        console.print("[green]x_T is close to pure noise[/] (SNR(T) <= 1e-3), as the reverse process assumes.")


# --- noise ----------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
def noise(
    image: Annotated[Path, typer.Argument(help="An image file (png, jpg, webp, bmp, gif, tif).", show_default=False)],
    t: Annotated[str | None, typer.Option("--t", help="Comma-separated timesteps in [0, T), e.g. 0,100,500,999. Default: a spread.")] = None,
    kind: KindOpt = Kind("linear"),
    timesteps: TOpt = 1000,
    beta_start: BStartOpt = 1e-4,
    beta_end: BEndOpt = 0.02,
    zero_terminal_snr: ZtsnrOpt = False,
    size: Annotated[int, typer.Option("--size", help="Resize + center-crop to this many pixels.", min=1, max=4096)] = 128,
    seed: SeedOpt = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Labelled PNG strip. Default: `<image>-noise.png` in the current folder.")] = None,
    frames: Annotated[Path | None, typer.Option("--frames", help="Also write each panel as DIR/t0123.png.")] = None,
    gif: Annotated[Path | None, typer.Option("--gif", help="Also write an animation through t.")] = None,
    iterative: Annotated[bool, typer.Option("--iterative", help="Apply the one-step kernel t+1 times instead of the closed form.")] = False,
) -> None:
    """Watch the fixed forward process destroy a real image.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I), with pixels scaled to [-1, 1].
    With --iterative the image is noised step by step, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps:
    a different draw, but the same distribution (Ho et al. 2020, eq. 4: q(x_t | x_0) in closed form).

    **Examples**

        diffuse noise photo.jpg

        diffuse noise photo.jpg --t 0,50,200,999 --kind cosine --out strip.png --gif noise.gif

        diffuse noise photo.jpg --iterative --frames frames/
    """
    _run(_noise, image, t, kind.value, timesteps, beta_start, beta_end, zero_terminal_snr, size, seed, out, frames, gif, iterative)


def _parse_ints(text: str, name: str) -> list[int]:
    from .engine.errors import ConfigError

    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers (got {text!r})") from None
    if not vals:
        raise ConfigError(f"{name} is empty")
    return vals


def _noise(image, t_text, kind, timesteps, beta_start, beta_end, ztsnr, size, seed, out, frames_dir, gif, iterative) -> None:
    from .engine import images as img
    from .engine.fileio import ensure_dir
    from .engine.forward import noise_image

    d = _diffusion(kind, timesteps, beta_start, beta_end, ztsnr)
    T = d.num_timesteps
    x0_u8, shown = noise_image(image, d, _parse_ints(t_text, "--t") if t_text else None, size, seed, iterative)
    out = out or Path(f"{image.stem}-noise.png")
    panels = [img.to_pil(x0_u8)] + [img.to_pil(p.image) for p in shown]
    labels = ["original x_0"] + [f"t = {p.t}" for p in shown]
    if frames_dir is not None:
        ensure_dir(frames_dir)
        for p, pil in zip(shown, panels[1:], strict=True):
            img.save_image(pil, Path(frames_dir) / f"t{p.t:04d}.png")
    img.save_image(img.labelled_strip(panels, labels, panel_size=max(96, min(size, 192))), out)
    if gif is not None:
        gif_frames = [img.labelled_strip([p], [lab], panel_size=max(128, size)) for p, lab in zip(panels, labels, strict=True)]
        img.save_gif(gif_frames, gif, duration_ms=400)

    table = Table(title=f"forward process on {image.name} ({kind}, T = {T}, {'iterative' if iterative else 'closed form'})", title_justify="left")
    for col in ("t", "sqrt(alpha_bar_t)", "sqrt(1-alpha_bar_t)", "SNR (dB)", "PSNR vs x_0 (dB)"):
        table.add_column(col, justify="right")
    for p in shown:
        table.add_row(str(p.t), f"{p.signal:.4f}", f"{p.noise:.4f}", _fmt_snr_db(p.snr), "inf" if math.isinf(p.psnr) else f"{p.psnr:.1f}")
    console.print(table)
    console.print(f"strip written to [bold]{out}[/]")
    if frames_dir is not None:
        console.print(f"frames written to [bold]{frames_dir}/[/] (t0000.png ...)")
    if gif is not None:
        console.print(f"animation written to [bold]{gif}[/]")


# --- train ----------------------------------------------------------------------------------
_T, _D = TrainConfig(), DiffusionConfig()  # help texts read their defaults from the engine's configs


def _d(value) -> str:
    return f"[default: {value}]"


@app.command(no_args_is_help=True)
def train(
    data: Annotated[str, typer.Argument(help="A folder of images (searched recursively) or builtin:digits.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder for checkpoints, samples and logs. Default: `runs/<data name>`.")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help=f"Optimizer steps to train (total, also when resuming). {_d(_T.steps)}, none with --time")
    ] = None,
    time: Annotated[
        str | None,
        typer.Option("--time", help="Train for this long (90s, 5m, 2h; or until --steps, whichever comes first), then save as a normal finish does."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="GLOBAL batch size, split over all torchrun processes. [default: 32 on a CPU, 128 on a GPU]")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help=f"AdamW learning rate. {_d(_T.lr)}")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help=f"Linear learning-rate warmup steps. {_d(_T.warmup)}")] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Resize + center-crop to this size. [default: the images' own size, at most 64; 8 for digits]")
    ] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="1 (grayscale) or 3 (RGB). [default: from the data]")] = None,
    preset: Annotated[Preset, typer.Option("--preset", help="Model size; auto picks by image size.")] = Preset("auto"),
    base_channels: Annotated[int | None, typer.Option("--base-channels", help="Width of the first U-Net level.")] = None,
    channel_mults: Annotated[str | None, typer.Option("--channel-mults", help="Width multiplier per level, e.g. 1,2,2,2.")] = None,
    num_res_blocks: Annotated[int | None, typer.Option("--num-res-blocks", help="Residual blocks per level.")] = None,
    attention_res: Annotated[str | None, typer.Option("--attention-res", help="Resolutions with self-attention, e.g. 16 or 16,8 ('' for none).")] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", help="Dropout in residual blocks.")] = None,
    kind: Annotated[Kind | None, typer.Option("--kind", "-k", help=f"Beta schedule. {_d(_D.schedule)}")] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", "-T", help=f"Diffusion steps T. {_d(_D.timesteps)}")] = None,
    beta_start: Annotated[float | None, typer.Option("--beta-start", help=_d(_D.beta_start))] = None,
    beta_end: Annotated[float | None, typer.Option("--beta-end", help=_d(_D.beta_end))] = None,
    zero_terminal_snr: ZtsnrOpt = False,
    prediction: Annotated[
        Prediction | None, typer.Option("--prediction", help=f"What the network predicts: eps (as in DDPM), x0 or v. {_d(_D.prediction)}")
    ] = None,
    loss_weighting: Annotated[
        Weighting | None, typer.Option("--loss-weighting", help=f"uniform (DDPM's L_simple) or min-snr (Hang et al. 2023). {_d(_T.loss_weighting)}")
    ] = None,
    ema_decay: Annotated[float | None, typer.Option("--ema-decay", help=f"EMA decay of the weights used for samples. {_d(_T.ema_decay)}")] = None,
    flip: Annotated[
        bool | None,
        typer.Option("--flip/--no-flip", help="Random horizontal flips, for pictures that mean the same mirrored (not digits or text). [default: off]"),
    ] = None,
    classes: Annotated[
        Classes,
        typer.Option("--classes", help="auto: learn classes from the labels (one sub-folder per class, or the digit of builtin:digits), "
                     "so `diffuse sample --class` can choose; none: unconditional."),
    ] = Classes("auto"),
    cond_drop: Annotated[
        float | None,
        typer.Option("--cond-drop", help=f"With classes: how often a label is replaced by 'no class', so one network also learns the "
                     f"unconditional model that guidance needs (Ho & Salimans 2022). {_d(_T.cond_drop)}"),
    ] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help=f"Save a resumable state every N steps. {_d(_T.save_every)}")] = None,
    sample_every: Annotated[
        int | None, typer.Option("--sample-every", help=f"Write a preview grid every N steps and at the end (0: never). {_d(_T.sample_every)}")
    ] = None,
    keep: Annotated[int | None, typer.Option("--keep", help=f"How many periodic states to keep. {_d(_T.keep)}")] = None,
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch. [default: the cores no other process keeps busy]")] = None,
    precision: Annotated[Precision, typer.Option("--precision", help="auto = bf16 autocast on CUDA, fp32 elsewhere.")] = Precision("auto"),
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the forward pass and loss (faster on GPU after a warm-up).")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help=f"Random seed (0 or more): same seed, same run. {_d(_T.seed)}")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest state.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an --out that holds another run.")] = False,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where decoded folders are cached (one uint8 file per folder, size and channels). [default: $DIFFUSE_CACHE_DIR, else ~/.cache/diffuse]")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Decode the folder into memory in every process; read and write no cache file.")] = False,
) -> None:
    """Train a U-Net to predict the noise eps in x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Each step draws images x_0, timesteps t ~ Uniform{0..T-1} and noise eps ~ N(0, I), and minimises
    ||eps - eps_theta(x_t, t)||^2 (DDPM Algorithm 1). The folder --out receives model.safetensors (EMA
    weights + config: all `diffuse sample` needs), resumable states in checkpoints/, preview grids in
    samples/, log.jsonl and config.json. Multi-GPU: launch the same command with torchrun.

    **Examples**

        diffuse train builtin:digits --out runs/digits --steps 3000

        diffuse train ~/pictures/pets --image-size 32 --out runs/pets    (pets/cat/*.jpg, pets/dog/*.jpg: 2 classes)

        diffuse train ~/pictures/faces --image-size 32 --out runs/faces --classes none

        diffuse train builtin:digits --out runs/digits --steps 6000 --resume

        torchrun --nproc_per_node 4 -m diffuse_cli train data/ --out runs/big --batch-size 256
    """
    train_opts = dict(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ema_decay=ema_decay,
        cond_drop=cond_drop,
        save_every=save_every,
        sample_every=sample_every,
        keep=keep,
        seed=seed,
        hflip=flip,
        loss_weighting=loss_weighting.value if loss_weighting else None,
        precision=precision.value,
        compile=compile,
        time_limit=time,
        threads=threads,
    )
    model_opts = dict(
        base_channels=base_channels, channel_mults=channel_mults, num_res_blocks=num_res_blocks, attention_resolutions=attention_res, dropout=dropout
    )
    diff_opts = dict(
        schedule=kind.value if kind else None,
        timesteps=timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        zero_terminal_snr=zero_terminal_snr,
        prediction=prediction.value if prediction else None,
    )
    _run(_train, data, out, image_size, channels, preset.value, train_opts, model_opts, diff_opts, device, resume, overwrite, cache_dir, no_cache,
         classes.value)


def _csv_ints(text: str | None, name: str, allow_empty: bool = False) -> tuple[int, ...] | None:
    from .engine.errors import ConfigError

    if text is None:
        return None
    if text.strip() in ("", "none"):
        if allow_empty:
            return ()
        raise ConfigError(f"{name} must not be empty")
    vals = _parse_ints(text, name)
    if any(v < 1 for v in vals):
        raise ConfigError(f"{name} values must be positive (got {text!r})")
    return tuple(vals)


def _class_lines(ds) -> list[tuple[str, str]]:
    """(style, text) lines about the data's classes: their count and images per class, and warnings."""
    import torch

    if ds.labels is None:
        return [("yellow", note) for note in ds.notes]
    counts = torch.bincount(ds.labels, minlength=len(ds.classes)).tolist()
    per = ", ".join(f"{name} {n}" for name, n in zip(ds.classes, counts, strict=True))
    lines = [("", f"{len(ds.classes)} classes, images per class: {per}")]
    few = [f"{name} ({n})" for name, n in zip(ds.classes, counts, strict=True) if n < MIN_CLASS_IMAGES]
    if few:
        lines.append(("yellow", f"warning: {'these classes have' if len(few) > 1 else 'this class has'} fewer than "
                      f"{MIN_CLASS_IMAGES} images and may not be learned: {', '.join(few)}"))
    return lines


def _train(data_spec, out, image_size, channels, preset, train_opts, model_opts, diff_opts, device, resume, overwrite, cache_dir, no_cache,
           classes="auto"):
    import dataclasses

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .engine import datacache, rundir, training
    from .engine.config import UNetConfig, default_batch_size, parse_duration
    from .engine.device import resolve_device
    from .engine.distributed import launched_rank

    rundir.check_mode(resume, overwrite)
    out = out or rundir.default_out(data_spec)
    stored = rundir.newest_state(out, tensors=False) if resume else None  # metadata only: the engine reads the tensors
    if stored is not None:
        image_size = image_size or stored.model.get("image_size")
        channels = channels or stored.model.get("in_channels")
    is_main = launched_rank() == 0
    say = console.print if is_main else (lambda *a, **k: None)

    t_load = time.perf_counter()
    with Progress(TextColumn("[bold]decode[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, disable=not is_main, transient=True) as bar:  # fmt: skip
        decoding = bar.add_task("decode", total=None)

        def advance(done: int, total: int) -> None:
            bar.update(decoding, completed=done, total=total)

        ds = datacache.load_dataset(data_spec, image_size, channels, advance, cache=not no_cache, cache_dir=cache_dir)
    n, c, s = ds.images.shape[0], ds.images.shape[1], ds.images.shape[-1]
    note = f" ({ds.summary.size_note})" if ds.summary.size_note else ""
    say(f"[bold]data[/]  {ds.summary.source}: {n} images used, {c}x{s}x{s}{note}, {datacache.describe(ds)} in {time.perf_counter() - t_load:.1f}s")
    for line in ds.summary.lines():
        say(f"  [yellow]{line}[/]")
    if (stored is None and classes == "none") or (stored is not None and not stored.model.get("num_classes")):
        ds = dataclasses.replace(ds, labels=None, classes=(), notes=())  # unconditional, as asked (or as the run was)
    if stored is not None and classes == "none" and stored.model.get("num_classes"):
        say("  [yellow]--classes none does not apply to --resume: the run keeps the classes it was started with[/]")
    for style, line in _class_lines(ds):
        say(f"  [{style}]{line}[/]" if style else f"  {line}")

    dev_type = resolve_device(device).type
    if train_opts["time_limit"] is not None:
        train_opts = {**train_opts, "time_limit": parse_duration(train_opts["time_limit"])}
        if train_opts["steps"] is None and stored is None:
            train_opts["steps"] = UNLIMITED_STEPS
    if stored is not None:
        model_cfg, diff_cfg = UNetConfig.from_dict(stored.model), None  # the engine takes both from the state
        cfg = TrainConfig.from_dict(stored.train).resumed(**train_opts)
    else:
        model_opts = {
            **model_opts,
            "channel_mults": _csv_ints(model_opts["channel_mults"], "--channel-mults"),
            "attention_resolutions": _csv_ints(model_opts["attention_resolutions"], "--attention-res", allow_empty=True),
        }
        model_cfg = UNetConfig.preset(preset, s, c, dev_type, num_classes=len(ds.classes), **model_opts)
        diff_cfg = DiffusionConfig(**{k: v for k, v in diff_opts.items() if v is not None})
        batch = train_opts["batch_size"] or default_batch_size(dev_type)
        cfg = TrainConfig(**{k: v for k, v in {**train_opts, "batch_size": batch}.items() if v is not None})

    progress = _TrainProgress(cfg, diff_cfg, say, is_main)
    try:
        result = training.train(ds, out, model_cfg, diff_cfg, cfg, device=device, resume=resume, overwrite=overwrite, callback=progress.on_event)
    finally:
        progress.bar.stop()
    if result["is_main"]:
        why = " (the --time budget is spent; continue with --resume)" if result.get("out_of_time") else ""
        say(f"[bold green]done[/] {result['step']} steps in {_duration(result['elapsed'])}{why}, final loss {result['loss']:.4f}")
        say(f"  model    {result['model']}")
        say(f"  previews {result['samples']}/")
        say(f"  next:    diffuse sample {result['model']} --num 16 --grid grid.png")


def _duration(seconds: float) -> str:
    """3 s, 4 min, 2.5 h: the unit a person would use."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _TrainProgress:
    """Draws the training events: a header, a progress bar (plain lines every ~10% off a terminal), notes.

    With --time the bar measures the time budget, not steps."""

    def __init__(self, cfg, diff_cfg, say, is_main: bool):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.cfg, self.diff_cfg, self.say, self.is_main = cfg, diff_cfg, say, is_main
        self.timed = cfg.time_limit is not None
        count = TextColumn("step {task.fields[step]}") if self.timed else MofNCompleteColumn()
        self.bar = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), count, TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s, data {task.fields[data]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not is_main, transient=False,
        )  # fmt: skip
        self.task, self.estimated, self.last_plain = None, False, -1

    def on_event(self, e: dict) -> None:
        kind, cfg, say = e["event"], self.cfg, self.say
        if kind == "start":
            threads = f", {e['threads']} CPU threads" if e["device"] == "cpu" else ""
            say(f"[bold]model[/] U-Net {e['parameters'] / 1e6:.2f}M parameters; device {e['device']}{threads}, precision {e['precision']}, "
                f"{e['world_size']} process(es), global batch {cfg.batch_size}")  # fmt: skip
            if self.diff_cfg is not None:
                d = self.diff_cfg
                say(f"[bold]noise[/] {d.schedule} schedule, T = {d.timesteps}, predicting {d.prediction}")
            if e["resumed"]:
                say(f"resuming at step {e['step']}")
            if self.timed:
                say(
                    f"[bold]time[/]  training for {_duration(cfg.time_limit)}"
                    + ("" if cfg.steps >= UNLIMITED_STEPS else f" or {cfg.steps} steps, whichever comes first")
                )
            say(f"[dim]loss = mean of ||target - prediction||^2 over the last {cfg.log_every} steps (as in log.jsonl)[/]")
            total, done = (cfg.time_limit, 0) if self.timed else (e["steps"], e["step"])
            say(f"[bold]data[/]  {e['data']}")
            self.task = self.bar.add_task("train", total=total, completed=done, loss="…", ips="…", step=e["step"], data="…")
            self.bar.start()
        elif kind == "step":
            self.bar.update(self.task, completed=min(e["elapsed"], cfg.time_limit) if self.timed else e["step"], step=e["step"])
        elif kind == "log":
            data_share = f"{e['data_ms'] / max(e['step_ms'], 1e-9):.0%} of {e['step_ms']:.0f} ms/step"
            self.bar.update(self.task, loss=f"{e['loss']:.4f}", ips=f"{e['img_per_s']:.0f}", data=data_share)
            if not self.estimated and e["step"] < cfg.steps:  # the first measured speed: say what the run will cost
                self.estimated = True
                per_1000 = 1000 * cfg.batch_size / max(e["img_per_s"], 1e-9)
                left = "" if self.timed else f"; the remaining {cfg.steps - e['step']} take ~{_duration(per_1000 * (cfg.steps - e['step']) / 1000)}"
                self.bar.console.print(f"  ~{e['img_per_s']:.0f} img/s: 1,000 steps take ~{_duration(per_1000)}{left}")
            if not console.is_terminal and self.is_main:  # logs and CI: a plain line every ~10%
                tenth = int(e["elapsed"] * 10 / cfg.time_limit) if self.timed else e["step"] * 10 // cfg.steps
                if tenth != self.last_plain:
                    self.last_plain = tenth
                    say(f"  step {e['step']}{'' if self.timed else f'/{cfg.steps}'}  loss {e['loss']:.4f}  {e['img_per_s']:.0f} img/s  data {data_share}  {e['elapsed']:.0f}s")
        elif kind == "warning":
            self.bar.console.print(f"[yellow]warning:[/] {e['message']}")
        elif kind == "preview":
            self.bar.console.print(f"  step {e['step']}: samples -> {e['path']}")


# --- sample ---------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="A model .safetensors file, a run folder or a diffusers DDPM folder.", show_default=False)],
    num: Annotated[int, typer.Option("--num", "-n", help="How many images (of each class, with --class).")] = 16,
    class_: Annotated[
        list[str] | None,
        typer.Option("--class", "-c", help="Draw images of this class: a name (e.g. a sub-folder's) or an id; repeat for several "
                     "(the grid gets one row per class). Needs a model trained with classes.", show_default=False,
                     metavar="NAME|ID"),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option("--guidance", "-w", help="Classifier-free guidance scale w with --class: 1 = the plain class-conditional model, "
                     f"0 = ignore the class, above 1 = more typical of the class, less varied. [default: {DEFAULT_GUIDANCE:g}]"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for one PNG per image (0000.png ...).")] = Path("samples"),
    grid: Annotated[Path | None, typer.Option("--grid", help="Also write all images as one grid PNG.")] = None,
    sampler: Annotated[
        SamplerName, typer.Option("--sampler", help="dpmpp (fast, default), ddim, or ddpm (DDPM's ancestral sampler, Algorithm 2).")
    ] = SamplerName("dpmpp"),
    steps: Annotated[int | None, typer.Option("--steps", help="Model evaluations. [default: 20 dpmpp, 50 ddim, T ddpm]")] = None,
    eta: Annotated[float, typer.Option("--eta", help="DDIM noise: 0 deterministic, 1 DDPM-like.")] = 0.0,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per model call (does not change the images).")] = 64,
    device: DeviceOpt = "auto",
    gif: Annotated[Path | None, typer.Option("--gif", help="Animate the denoising of the first few images: x_t beside predicted x_0.")] = None,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Clip predicted x_0 to [-1, 1] at each step.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the images an earlier run left in --out.")] = False,
) -> None:
    """Generate images by running the learned reverse process from pure noise x_T ~ N(0, I).

    `--sampler ddpm --steps T` is DDPM's Algorithm 2 exactly; ddim (Song et al. 2021) and dpmpp
    (DPM-Solver++, Lu et al. 2022) reach similar quality in 10-50 model calls. Each image has its own
    random stream, seeded from --seed and its number, so --batch-size never changes the images.

    **Classes and guidance.** A model trained with classes (`diffuse train DATA --classes auto`) is two
    models in one network: it predicts the noise eps(x_t, t, c) for class c, and, because training hid
    the label now and then, the noise eps(x_t, t) of an image of any class. Classifier-free guidance
    (Ho & Salimans 2022, eq. 6 / Algorithm 2) uses eps(x_t, t) + w (eps(x_t, t, c) - eps(x_t, t)) in
    place of DDPM's eps_theta (Ho et al. 2020, Algorithm 2): w = 1 is the conditional model, w > 1
    extrapolates past it, away from "any image" towards "an image of class c": samples look more like
    their class and less like each other. Each step costs one model call on twice the batch.

    **Examples**

        diffuse sample runs/digits --num 64 --grid grid.png

        diffuse sample runs/digits --class 7 --num 16 --grid sevens.png

        diffuse sample runs/digits --class 0 --class 1 --class 2 --num 8 --guidance 2 --grid rows.png

        diffuse sample runs/digits/model.safetensors --sampler ddim --steps 50 --eta 0 --out imgs/

        diffuse sample runs/digits --sampler ddpm --num 8 --gif denoise.gif
    """
    _run(_sample, checkpoint, num, out, grid, sampler.value, steps, eta, seed, batch_size, device, gif, clip, overwrite, class_ or [], guidance)


def _class_ids(ck, asked: list[str]) -> tuple[list[int], list[str]]:
    """The ids and names of the classes asked for by name or id; ConfigError for a model without classes
    or an unknown class (listing the known ones)."""
    from .engine import checkpoint as ckpt
    from .engine.errors import ConfigError

    names = ckpt.class_names(ck)
    if not names:
        raise ConfigError(f"{ck.path} was trained without classes, so --class cannot choose one; train on a folder with one "
                          "sub-folder per class (or builtin:digits) with --classes auto")
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


def _sample(checkpoint, num, out, grid, sampler_name, steps, eta, seed, batch_size, device, gif, clip, overwrite, asked=(), guidance=None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine import checkpoint as ckpt
    from .engine import images as img
    from .engine import rundir, samplers
    from .engine.device import autocast_dtype, resolve_device
    from .engine.errors import ConfigError
    from .engine.fileio import ensure_dir
    from .engine.generate import Trajectory, generate

    if out is None and grid is None and gif is None:
        raise ConfigError("nothing to write: give --out, --grid or --gif")
    dev = resolve_device(device)
    if guidance is not None and not asked:
        raise ConfigError("--guidance steers towards a class: give --class too")
    model, diffusion, ck = ckpt.load_for_sampling(checkpoint, dev)
    classes = None
    if asked:
        import torch

        from .engine.guidance import check_guidance

        guidance = check_guidance(DEFAULT_GUIDANCE if guidance is None else guidance)
        ids, shown = _class_ids(ck, list(asked))
        classes = torch.tensor(ids).repeat_interleave(num)  # num images of each class, classes in the order asked
        per_class, num = num, num * len(ids)
    T = diffusion.num_timesteps
    steps = steps if steps is not None else samplers.default_steps(sampler_name, T)
    if out is not None:  # outputs are checked before spending time sampling
        rundir.prepare_sample_dir(Path(out), overwrite)
    for folder in [Path(p).parent for p in (grid, gif) if p is not None]:
        ensure_dir(folder)
    opts = {"clip_x0": clip, **({"eta": eta} if sampler_name == "ddim" or eta != 0.0 else {})}  # the engine says where eta applies
    console.print(
        f"[bold]sample[/] {ck.path} (step {ck.step}, {ck.diffusion.get('schedule')} schedule, T = {T}, predicts {ck.diffusion.get('prediction')}); {sampler_name}, {steps} steps, device {dev}"
    )
    if classes is not None:
        console.print(f"[bold]class[/] {', '.join(shown)}: {per_class} image(s) each, guidance w = {guidance:g}")
    elif ckpt.class_names(ck):
        console.print(f"unconditional samples; this model knows {len(ckpt.class_names(ck))} classes: choose with --class")
    trajectory = Trajectory() if gif is not None else None
    t0 = time.perf_counter()
    with Progress(
        TextColumn("[bold]sample[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("sample", total=num, ips="…")

        def advance(done: int) -> None:
            progress.update(task, completed=done, ips=f"{done / (time.perf_counter() - t0):.1f}")

        images = generate(
            model,
            diffusion,
            num,
            (ck.model["in_channels"], ck.model["image_size"], ck.model["image_size"]),
            sampler=sampler_name,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            device=dev,
            amp=autocast_dtype("auto", dev),
            progress=advance,
            trajectory=trajectory,
            classes=classes,
            guidance=guidance if guidance is not None else 1.0,
            **opts,
        )
    if out is not None:
        width = max(4, len(str(num - 1)))
        for i, im in enumerate(images):
            tag = "" if classes is None else f"-{_safe_name(shown[i // per_class])}"  # e.g. 0012-7.png
            img.save_image(img.to_pil(im), Path(out) / f"{i:0{width}d}{tag}.png")
        console.print(f"{num} images written to [bold]{out}/[/]")
    if grid is not None:
        nrow = per_class if classes is not None and len(shown) > 1 else None  # one row per class
        img.save_image(img.upscale(img.make_grid(images, nrow=nrow), 512), grid)
        console.print(f"grid written to [bold]{grid}[/]")
    if trajectory is not None and trajectory.frames:
        img.save_gif(img.trajectory_frames(trajectory.frames), gif, duration_ms=120)
        console.print(f"trajectory written to [bold]{gif}[/] (top: x_t, bottom: predicted x_0)")


# --- export and eval (issue #12) ------------------------------------------------------------
@app.command(no_args_is_help=True)
def export(
    run: Annotated[Path, typer.Argument(help="A run folder, a model or state .safetensors file, or a diffusers folder.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="New (or empty) folder for the diffusers pipeline.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a folder that is not empty (replacing our files).")] = False,
) -> None:
    """Write a model as a diffusers DDPMPipeline folder (no diffusers needed to write it).

    OUT gets model_index.json, unet/config.json + diffusion_pytorch_model.safetensors (UNet2DModel) and
    scheduler/scheduler_config.json (DDPMScheduler with the same betas, prediction type, and variance
    beta_t as `diffuse sample --sampler ddpm`). Load it with
    `diffusers.DDPMPipeline.from_pretrained(OUT)`. Models diffusers' UNet2DModel cannot express are refused
    with the reason.

    **Examples**

        diffuse export runs/digits-plain digits-diffusers    (a run trained with --classes none)

        python -c "from diffusers import DDPMPipeline; DDPMPipeline.from_pretrained('digits-diffusers')(num_inference_steps=1000)"
    """
    _run(_export, run, out, overwrite)


def _export(run: Path, out: Path, overwrite: bool) -> None:
    from .engine import interop

    result = interop.export(run, out, overwrite=overwrite)
    u, s = result["unet"], result["scheduler"]
    console.print(f"[bold]export[/] {result['source']} (step {result['step']}) -> [bold]{result['out']}/[/]")
    for name in result["files"]:
        console.print(f"  {name}")
    console.print(f"  UNet2DModel {u['sample_size']}x{u['sample_size']}x{u['in_channels']}, widths {u['block_out_channels']}; "
                  f"DDPMScheduler {s['beta_schedule']}, T = {s['num_train_timesteps']}, {s['prediction_type']}")
    console.print(f"  next: python -c \"from diffusers import DDPMPipeline; "
                  f"DDPMPipeline.from_pretrained('{result['out']}')(num_inference_steps={s['num_train_timesteps']})\"")


class FeatureKind(str, Enum):
    randconv = "randconv"
    inception = "inception"


class Variance(str, Enum):
    beta = "beta"
    posterior = "posterior"


class EvalFormat(str, Enum):
    table = "table"
    json = "json"


@app.command("eval", no_args_is_help=True)
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A model .safetensors file, a run folder or a diffusers folder.", show_default=False)],
    data: Annotated[str, typer.Argument(help="A folder of real images or builtin:digits (resized to the model's size).", show_default=False)],
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Real images used (a random subset of DATA) and images generated.")] = 500,
    nll: Annotated[bool, typer.Option("--nll/--no-nll", help="Negative log-likelihood bound in bits/dim on the real images.")] = True,
    fd: Annotated[bool, typer.Option("--fd/--no-fd", help="Frechet distance and precision/recall, generated vs real.")] = True,
    features: Annotated[FeatureKind, typer.Option("--features", help="randconv: a fixed random-weight conv net, no download (its distance is NOT FID); inception: FID (Inception-v3 of pytorch-fid, an optional extra; weights fetched on first use).")] = FeatureKind.randconv,
    variance: Annotated[Variance, typer.Option("--variance", help="Reverse-step variance in the bound: beta (sigma_t^2 = beta_t) or posterior (beta~_t).")] = Variance.beta,
    terms: Annotated[int | None, typer.Option("--terms", help="Evaluate only this many of the T-1 KL terms (stratified, rescaled): an unbiased but noisier estimate of the same bound. [default: all]", min=1)] = None,
    sampler: Annotated[SamplerName, typer.Option("--sampler", help="Sampler for the generated images.")] = SamplerName.dpmpp,
    steps: Annotated[int | None, typer.Option("--steps", help="Model evaluations per generated image. [default: 20 dpmpp, 50 ddim, T ddpm]")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per model call.", min=1)] = 64,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    format: Annotated[EvalFormat, typer.Option("--format", "-f", help="table for people, json for programs.")] = EvalFormat.table,
    log: Annotated[Path | None, typer.Option("--log", help="Append the numbers to this JSON-lines file. [default: eval.jsonl in the run folder]")] = None,
) -> None:
    """Say how good a model is: bits/dim on real images, and a Frechet distance + precision/recall of its samples.

    - **bits/dim**: the variational bound on -log p(x) of Ho et al. 2020 (eq. 5; discretised decoder, eq. 13)
      over 8-bit pixels, averaged over images, with a 95% interval. It needs T model calls per image.
    - **Frechet distance** between features of generated and real images, and **precision/recall**
      (Kynkaanniemi et al. 2019, k = 3) in the same features. `--features randconv` (default) needs no
      download but its distance is not FID; `--features inception` is the standard FID
      (`pip install 'diffuse-cli[fid]'`). Like FID, the number depends on --num-images.

    The numbers are printed and appended to the run's eval.jsonl.

    **Examples**

        diffuse eval runs/digits builtin:digits

        diffuse eval runs/faces ~/pictures/faces --num-images 2000 --features inception --format json

        diffuse eval google-ddpm-cifar10-32/ cifar10-test/ --no-fd --terms 100
    """
    _run(_eval, checkpoint, data, num_images, nll, fd, features.value, variance.value, terms, sampler.value, steps,
         batch_size, seed, device, format.value, log)


def _eval_log_path(checkpoint: Path, log: Path | None) -> Path:
    from .engine.errors import OutputError
    from .engine.fileio import ensure_dir

    path = log if log is not None else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval.jsonl"
    ensure_dir(path.parent if str(path.parent) else Path("."))
    if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot append to {path}; choose another file with --log")
    return path


def _eval(checkpoint, data_spec, num, do_nll, do_fd, features, variance, terms, sampler_name, steps, batch_size, seed,
          device, fmt, log) -> None:
    import datetime

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine import checkpoint as ckpt
    from .engine import data as data_mod
    from .engine import evaluate, samplers
    from .engine.data import from_model_range
    from .engine.device import resolve_device
    from .engine.errors import ConfigError, OutputError
    from .engine.generate import generate

    if num < 2 or (do_fd and num <= evaluate.PR_K):
        raise ConfigError(f"--num-images must be at least {evaluate.PR_K + 1 if do_fd else 2} (got {num})")
    if not (do_nll or do_fd):
        raise ConfigError("nothing to evaluate: --no-nll and --no-fd together leave no metric")
    log_path = _eval_log_path(checkpoint, log)
    dev = resolve_device(device)
    model, diffusion, ck = ckpt.load_for_sampling(checkpoint, dev)
    T = diffusion.num_timesteps
    if do_fd:
        steps = steps if steps is not None else samplers.default_steps(sampler_name, T)
        samplers.timestep_grid(diffusion, steps)  # checks --steps before any work
    c, s = ck.model["in_channels"], ck.model["image_size"]
    ds = data_mod.load_dataset(data_spec, s, c)
    gen = torch.Generator().manual_seed(seed)
    real = ds.images
    if real.shape[0] > num:
        real = real[torch.randperm(real.shape[0], generator=gen)[:num].sort().values]
    n = real.shape[0]
    if n < 2 or (do_fd and n <= evaluate.PR_K):
        raise ConfigError(f"{data_spec} has {n} usable image(s); the metrics need at least {evaluate.PR_K + 1}")
    say = err_console.print if fmt == "json" else console.print
    say(f"[bold]eval[/] {ck.path} (step {ck.step}, T = {T}, predicts {ck.diffusion.get('prediction')}) on "
        f"{n} images of {ds.summary.source} ({c}x{s}x{s}), device {dev}")
    record: dict = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "model": str(ck.path), "step": ck.step, "data": ds.summary.source, "images": n, "seed": seed}
    progress = Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console if fmt == "json" else console)
    with progress:
        if do_nll:
            task = progress.add_task("bits/dim", total=None)
            res = evaluate.bits_per_dim(
                model, diffusion, real, batch_size=batch_size, variance=variance, terms=terms, generator=gen, device=dev,
                callback=lambda e: progress.update(task, completed=e["done"], total=e["total"]))
            record["nll"] = res.to_dict()
        if do_fd:
            task = progress.add_task("generate", total=n)
            fake = from_model_range(generate(model, diffusion, n, (c, s, s), sampler=sampler_name, steps=steps, seed=seed,
                                             batch_size=batch_size, device=dev, clip_x0=True,
                                             progress=lambda done: progress.update(task, completed=done)))  # fmt: skip
            progress.add_task(f"features ({features})", total=None)
            q = evaluate.sample_quality(real, fake, features=features, batch_size=batch_size, device=dev)
            record["fd"] = {"value": q["frechet_distance"], "features": features, "is_fid": q["is_fid"],
                            "feature_dim": q["feature_dim"], "generated": n, "sampler": sampler_name, "steps": steps}
            record["precision"], record["recall"], record["pr_k"] = q["precision"], q["recall"], q["k"]
    try:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        from .engine.fileio import describe_os_error

        raise OutputError(describe_os_error(err, log_path)) from err
    if fmt == "json":
        sys.stdout.write(json.dumps(record) + "\n")
        return
    table = Table(title=f"eval of {ck.path} on {ds.summary.source}", title_justify="left")
    for col, just in (("metric", "left"), ("value", "right"), ("notes", "left")):
        table.add_column(col, justify=just)
    if "nll" in record:
        r = record["nll"]
        lo, hi = r["ci95"]
        exact = "all" if r["terms"] == T - 1 else f"{r['terms']} of {T - 1} (estimate)"
        table.add_row("NLL bound", f"{r['bits_per_dim']:.4f} bits/dim",
                      f"95% CI [{lo:.4f}, {hi:.4f}] over {n} images; {exact} KL terms; variance {r['variance']} "
                      "(Ho et al. 2020 eq. 5, 13)")
    if "fd" in record:
        r = record["fd"]
        name = "FID" if r["is_fid"] else f"FD ({r['features']})"
        what = ("Inception-v3 pool3 features (pytorch-fid)" if r["is_fid"]
                else f"fixed random-weight conv features, {r['feature_dim']}-d: NOT FID, compare only with itself")
        table.add_row(name, f"{r['value']:.4g}", f"{what}; {n} generated ({sampler_name}, {steps} steps) vs {n} real")
        table.add_row("precision", f"{record['precision']:.3f}", f"generated inside the real manifold (k = {record['pr_k']})")
        table.add_row("recall", f"{record['recall']:.3f}", "real inside the generated manifold (Kynkaanniemi et al. 2019)")
    console.print(table)
    console.print(f"appended to [bold]{log_path}[/]")


def _safe_name(name: str) -> str:
    """A class name as a piece of a file name."""
    import re

    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "class"


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
        err_console.print(f"[bold red]error:[/] unexpected {type(err).__name__}: {msg} (please report it; DIFFUSE_DEBUG=1 shows the traceback)", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
