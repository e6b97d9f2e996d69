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

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="diffuse",
    help="Train and sample denoising diffusion probabilistic models (DDPM, Ho et al. 2020).\n\n"
    "The forward process adds Gaussian noise in T fixed steps; a U-Net learns to predict that noise; "
    "sampling runs the learned reverse process from pure noise.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


class Kind(str, Enum):
    linear = "linear"
    quadratic = "quadratic"
    cosine = "cosine"
    sigmoid = "sigmoid"


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class Prediction(str, Enum):
    eps = "eps"
    x0 = "x0"
    v = "v"


class SamplerName(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    dpmpp = "dpmpp"


class Weighting(str, Enum):
    uniform = "uniform"
    min_snr = "min-snr"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Preset(str, Enum):
    auto = "auto"
    tiny = "tiny"
    small = "small"
    ddpm_cifar10 = "ddpm-cifar10"


def _version(value: bool) -> None:
    if value:
        console.print(f"diffuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Train and sample denoising diffusion probabilistic models."""


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that cleanup (finally blocks, temporary files) runs; exits 143 = 128 + 15."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupt_exit(err: KeyboardInterrupt) -> tuple[str, int]:
    """Message and exit code (128 + signal number, as shells report it) for a Ctrl-C or a SIGTERM."""
    return ("terminated", 143) if isinstance(err, Terminated) else ("interrupted", 130)


def _out_of_memory(err: BaseException) -> str | None:
    """A one-line reason if ``err`` is an allocation failure (CPU or GPU), else None."""
    import re

    text = str(err)
    if not (isinstance(err, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text
            or "Storage size calculation overflowed" in text):
        return None
    size = re.search(r"allocate ([\d.]+ ?[KMGTP]?i?B|\d+ bytes)", text)
    return (f"out of memory{f' (tried to allocate {size.group(1)})' if size else ''}; "
            "try a smaller --batch-size, --image-size or model")


def _run(fn, *args, **kwargs):
    """Call into the engine, turning its errors into one line and an exit code."""
    from .engine.errors import DiffuseError

    try:
        return fn(*args, **kwargs)
    except DiffuseError as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt as err:
        fail(*_interrupt_exit(err))
    except (MemoryError, RuntimeError) as err:
        reason = _out_of_memory(err)
        if reason is None:
            raise
        fail(reason)


# --- shared options -----------------------------------------------------------------------
KindOpt = Annotated[Kind, typer.Option("--kind", "-k", help="Beta schedule.")]
TOpt = Annotated[int, typer.Option("--timesteps", "-T", help="Number of diffusion steps T.")]
BStartOpt = Annotated[float, typer.Option("--beta-start", help="beta at the first step (linear/quadratic/sigmoid).")]
BEndOpt = Annotated[float, typer.Option("--beta-end", help="beta at the last step (linear/quadratic/sigmoid).")]
ZtsnrOpt = Annotated[bool, typer.Option("--zero-terminal-snr", help="Rescale so x_T is exactly pure noise (Lin et al. 2024).")]
MAX_IMAGE_SIZE = 4096  # as for `noise --size`: beyond it a data set no longer fits in memory, let alone trains
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; previews add a small offset to the seed
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same seed, same result.", min=0, max=MAX_SEED)]
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
    kind: Annotated[list[Kind], typer.Option("--kind", "-k", help="Beta schedule; repeat to compare several.")] = [Kind.linear],  # noqa: B006
    timesteps: TOpt = 1000,
    beta_start: BStartOpt = 1e-4,
    beta_end: BEndOpt = 0.02,
    zero_terminal_snr: ZtsnrOpt = False,
    format: Annotated[Format, typer.Option("--format", "-f", help="table for people; json/csv with every t.")] = Format.table,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot of alpha_bar, sqrt forms and log-SNR.")] = None,
    rows: Annotated[int, typer.Option("--rows", help="How many timesteps the table shows.", min=2)] = 11,
) -> None:
    """Show a beta schedule: beta_t, alpha_bar_t and the signal-to-noise ratio.

    alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s; then
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, and SNR_t = alpha_bar_t / (1 - alpha_bar_t).
    t is 0-based: t = 0 is the first noisy step (the seed's x_1), t = T-1 is x_T.

    **Examples**

        diffuse schedule --kind cosine

        diffuse schedule -k linear -k cosine --plot schedules.png

        diffuse schedule --kind sigmoid -T 500 --format json > sigmoid.json
    """
    kinds = list(dict.fromkeys(k.value for k in kind))
    diffs = {k: _run(_diffusion, k, timesteps, beta_start, beta_end, zero_terminal_snr) for k in kinds}
    if plot is not None:
        _run(_schedule_plot, diffs, plot)
    if format is Format.json:
        objs = [_schedule_json(k, d) for k, d in diffs.items()]
        sys.stdout.write(json.dumps(objs[0] if len(objs) == 1 else objs) + "\n")
    elif format is Format.csv:
        multi = len(diffs) > 1
        lines = [("kind," if multi else "") + "t,beta,alpha_bar,snr"]
        for k, d in diffs.items():
            for t in range(d.num_timesteps):
                lines.append((f"{k}," if multi else "") + f"{t},{float(d.betas[t])!r},{float(d.alphas_cumprod[t])!r},{float(d.snr[t])!r}")
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        for k, d in diffs.items():
            _schedule_table(k, d, rows, zero_terminal_snr)
    if plot is not None and format is Format.table:
        console.print(f"plot written to [bold]{plot}[/]")


def _schedule_json(kind: str, d) -> dict:
    return {
        "kind": kind,
        "timesteps": d.num_timesteps,
        "zero_terminal_snr": d.config.zero_terminal_snr,
        "t": list(range(d.num_timesteps)),
        "beta": d.betas.tolist(),
        "alpha_bar": d.alphas_cumprod.tolist(),
        "snr": d.snr.tolist(),
    }


def _schedule_table(kind: str, d, rows: int, ztsnr: bool) -> None:
    T = d.num_timesteps
    rows = min(rows, max(T, 2))  # --rows 100000000 must not loop for minutes to show T rows
    ts = sorted({round(i * (T - 1) / (rows - 1)) for i in range(rows)})
    title = f"{kind} schedule, T = {T}" + (", zero terminal SNR" if ztsnr else "")
    table = Table(title=title, title_justify="left")
    for col in ("t", "beta_t", "abar_t", "sqrt(abar_t)", "sqrt(1-abar_t)", "SNR", "SNR dB"):
        table.add_column(col, justify="right")
    for t in ts:
        snr = float(d.snr[t])
        table.add_row(str(t), f"{float(d.betas[t]):.6f}", f"{float(d.alphas_cumprod[t]):.4g}",
                      f"{float(d.sqrt_alphas_cumprod[t]):.4f}", f"{float(d.sqrt_one_minus_alphas_cumprod[t]):.4f}",
                      f"{snr:.4g}", _fmt_snr_db(snr))
    console.print(table)
    console.print("abar = alpha_bar = prod of (1 - beta); t is 0-based (t = 0 is the seed's x_1, t = T-1 its x_T)")
    snr_T = float(d.snr[-1])
    console.print(f"signal left in x_T: sqrt(alpha_bar) = {float(d.sqrt_alphas_cumprod[-1]):.3g};  "
                  f"alpha_bar_T = {float(d.alphas_cumprod[-1]):.3g};  SNR(T) = {snr_T:.3g} ({_fmt_snr_db(snr_T)} dB)")
    if snr_T > 1e-3:
        console.print(f"[bold yellow]warning:[/] x_T is not close to pure noise (SNR(T) = {snr_T:.3g} > 1e-3): "
                      "sampling starts from N(0, I) but training never saw that; use more steps, a larger --beta-end "
                      "or --zero-terminal-snr.")
    else:
        console.print("[green]x_T is close to pure noise[/] (SNR(T) <= 1e-3), as the reverse process assumes.")


def _schedule_plot(diffs: dict, path: Path) -> None:
    from .engine import images as img

    names = list(diffs)
    multi = len(names) > 1
    panels = []
    specs = [
        ("alpha_bar_t", lambda d: d.alphas_cumprod, (0.0, 1.0)),
        ("sqrt(alpha_bar_t): signal scale", lambda d: d.sqrt_alphas_cumprod, (0.0, 1.0)),
        ("sqrt(1 - alpha_bar_t): noise scale", lambda d: d.sqrt_one_minus_alphas_cumprod, (0.0, 1.0)),
        ("log SNR_t = log(alpha_bar / (1 - alpha_bar))", lambda d: d.log_snr, None),
    ]
    for title, fn, ylim in specs:
        series = [(n, list(range(diffs[n].num_timesteps)), fn(diffs[n]).tolist()) for n in names]
        panels.append(img.line_plot(series, title=title, xlabel="t", ylabel=title.split(":")[0].split(" =")[0], ylim=ylim))
    if not multi:
        pass
    img.save_image(img.grid_of_plots(panels, ncol=2), path)


# --- noise ----------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
def noise(
    image: Annotated[Path, typer.Argument(help="An image file (png, jpg, webp, bmp, gif, tif).", show_default=False)],
    t: Annotated[str | None, typer.Option("--t", help="Comma-separated timesteps in [0, T), e.g. 0,100,500,999. Default: a spread.")] = None,
    kind: KindOpt = Kind.linear,
    timesteps: TOpt = 1000,
    beta_start: BStartOpt = 1e-4,
    beta_end: BEndOpt = 0.02,
    zero_terminal_snr: ZtsnrOpt = False,
    size: Annotated[int, typer.Option("--size", help="Resize + center-crop to this many pixels.", min=1, max=4096)] = 128,
    seed: SeedOpt = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Labelled PNG strip. Default: <image>-noise.png here.")] = None,
    frames: Annotated[Path | None, typer.Option("--frames", help="Also write each panel as DIR/t0123.png.")] = None,
    gif: Annotated[Path | None, typer.Option("--gif", help="Also write an animation through t.")] = None,
    iterative: Annotated[bool, typer.Option("--iterative", help="Apply the one-step kernel t+1 times instead of the closed form.")] = False,
) -> None:
    """Watch the fixed forward process destroy a real image.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I), with pixels scaled to [-1, 1].
    With --iterative the image is noised step by step, x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps:
    a different draw, but the same distribution (the seed's "nice property").

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
    import torch

    from .engine import data as data_mod
    from .engine import images as img
    from .engine.errors import ConfigError, DataError
    from .engine.fileio import ensure_dir

    d = _diffusion(kind, timesteps, beta_start, beta_end, ztsnr)
    T = d.num_timesteps
    ts = _parse_ints(t_text, "--t") if t_text else sorted({0, T // 20, T // 10, T // 4, T // 2, (3 * T) // 4, T - 1})
    bad = [x for x in ts if not 0 <= x < T]
    if bad:
        raise ConfigError(f"--t values must be in [0, {T - 1}] (t is 0-based; got {bad[0]})")
    if not image.exists():
        raise DataError(f"no such file: {image}")
    if image.is_dir():
        raise DataError(f"{image} is a folder; give one image file")
    x0_u8 = data_mod.decode_image(image, size)  # (C, H, W) uint8; raises DataError
    out = out or Path(f"{image.stem}-noise.png")
    x0 = data_mod.to_model_range(x0_u8, torch.float64)[None]
    gen = torch.Generator().manual_seed(seed)
    panels, labels, rows = [img.to_pil(x0_u8)], ["original x_0"], []
    frame_imgs = []
    for tt in ts:
        tb = torch.tensor([tt])
        if iterative:
            x_t = d.q_sample_iterative(x0, tt, generator=gen)
        else:
            x_t = d.q_sample(x0, tb, generator=gen)
        u8 = img.to_uint8(x_t[0])
        mse = (u8.float() - x0_u8.float()).pow(2).mean().item()
        psnr = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
        rows.append((tt, float(d.sqrt_alphas_cumprod[tt]), float(d.sqrt_one_minus_alphas_cumprod[tt]), float(d.snr[tt]), psnr))
        pil = img.to_pil(u8)
        panels.append(pil)
        labels.append(f"t = {tt}")
        frame_imgs.append(pil)
        if frames_dir is not None:
            ensure_dir(frames_dir)
            img.save_image(pil, Path(frames_dir) / f"t{tt:04d}.png")
    img.save_image(img.labelled_strip(panels, labels, panel_size=max(96, min(size, 192))), out)
    if gif is not None:
        gif_frames = [img.labelled_strip([p], [lab], panel_size=max(128, size)) for p, lab in zip(panels, labels, strict=True)]
        img.save_gif(gif_frames, gif, duration_ms=400)

    table = Table(title=f"forward process on {image.name} ({kind}, T = {T}, {'iterative' if iterative else 'closed form'})",
                  title_justify="left")
    for col in ("t", "sqrt(alpha_bar_t)", "sqrt(1-alpha_bar_t)", "SNR (dB)", "PSNR vs x_0 (dB)"):
        table.add_column(col, justify="right")
    for tt, sa, sn, snr, psnr in rows:
        table.add_row(str(tt), f"{sa:.4f}", f"{sn:.4f}", _fmt_snr_db(snr), "inf" if math.isinf(psnr) else f"{psnr:.1f}")
    console.print(table)
    console.print(f"strip written to [bold]{out}[/]")
    if frames_dir is not None:
        console.print(f"frames written to [bold]{frames_dir}/[/] (t0000.png ...)")
    if gif is not None:
        console.print(f"animation written to [bold]{gif}[/]")


# --- train ----------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
def train(
    data: Annotated[str, typer.Argument(help="A folder of images (searched recursively) or builtin:digits.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder for checkpoints, samples and logs. Default: runs/<data name>.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps to train (total, also when resuming). [default: 5000]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="GLOBAL batch size, split over all torchrun processes. [default: 64]")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate. [default: 2e-4]")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="Linear learning-rate warmup steps. [default: 200]")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Resize + center-crop to this size. [default: 8 for digits, 32 for folders]")] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="1 (grayscale) or 3 (RGB). [default: from the data]")] = None,
    preset: Annotated[Preset, typer.Option("--preset", help="Model size; auto picks by image size.")] = Preset.auto,
    base_channels: Annotated[int | None, typer.Option("--base-channels", help="Width of the first U-Net level.")] = None,
    channel_mults: Annotated[str | None, typer.Option("--channel-mults", help="Width multiplier per level, e.g. 1,2,2,2.")] = None,
    num_res_blocks: Annotated[int | None, typer.Option("--num-res-blocks", help="Residual blocks per level.")] = None,
    attention_res: Annotated[str | None, typer.Option("--attention-res", help="Resolutions with self-attention, e.g. 16 or 16,8 ('' for none).")] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", help="Dropout in residual blocks.")] = None,
    kind: Annotated[Kind | None, typer.Option("--kind", "-k", help="Beta schedule. [default: linear]")] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", "-T", help="Diffusion steps T. [default: 1000]")] = None,
    beta_start: Annotated[float | None, typer.Option("--beta-start", help="[default: 1e-4]")] = None,
    beta_end: Annotated[float | None, typer.Option("--beta-end", help="[default: 0.02]")] = None,
    zero_terminal_snr: ZtsnrOpt = False,
    prediction: Annotated[Prediction | None, typer.Option("--prediction", help="What the network predicts: eps (the seed's), x0 or v. [default: eps]")] = None,
    loss_weighting: Annotated[Weighting | None, typer.Option("--loss-weighting", help="uniform (the seed's) or min-snr (Hang et al. 2023).")] = None,
    ema_decay: Annotated[float | None, typer.Option("--ema-decay", help="EMA decay of the weights used for samples. [default: 0.999]")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="Random horizontal flips. [default: on for folders, off for digits]")] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Save a resumable state every N steps. [default: 1000]")] = None,
    sample_every: Annotated[int | None, typer.Option("--sample-every", help="Write a preview grid every N steps and at the end (0: never). [default: 1000]")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="How many periodic states to keep. [default: 3]")] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[Precision, typer.Option("--precision", help="auto = bf16 autocast on CUDA, fp32 elsewhere.")] = Precision.auto,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model (faster on GPU after a warm-up).")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed: same seed, same run. [default: 0]", min=0, max=MAX_SEED)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest state.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an --out that holds another run.")] = False,
) -> None:
    """Train a U-Net to predict the noise eps in x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Each step draws images x_0, timesteps t ~ Uniform{0..T-1} and noise eps ~ N(0, I), and minimises
    ||eps - eps_theta(x_t, t)||^2 (DDPM Algorithm 1). The folder --out receives model.safetensors (EMA
    weights + config: all `diffuse sample` needs), resumable states in checkpoints/, preview grids in
    samples/, log.jsonl and config.json. Multi-GPU: launch the same command with torchrun.

    **Examples**

        diffuse train builtin:digits --out runs/digits --steps 3000

        diffuse train ~/pictures/faces --image-size 32 --out runs/faces

        diffuse train builtin:digits --out runs/digits --steps 6000 --resume

        torchrun --nproc_per_node 4 -m diffuse_cli train data/ --out runs/big --batch-size 256
    """
    opts = dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, save_every=save_every,
                sample_every=sample_every, keep=keep, seed=seed, loss_weighting=loss_weighting.value if loss_weighting else None,
                hflip=flip)
    model_opts = dict(base_channels=base_channels, channel_mults=channel_mults, num_res_blocks=num_res_blocks,
                      attention_res=attention_res, dropout=dropout, preset=preset.value)
    diff_opts = dict(schedule=kind.value if kind else None, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end,
                     zero_terminal_snr=zero_terminal_snr, prediction=prediction.value if prediction else None)
    _run(_train, data, out, image_size, channels, opts, model_opts, diff_opts, device, precision.value, compile, resume, overwrite)


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


def preset_kwargs(name: str, image_size: int) -> dict:
    """Model options of a preset; ``auto`` picks by image size (tiny <= 16 px, small up to 32, deeper above)."""
    from .engine.unet import PRESETS

    if name != "auto":
        return dict(PRESETS[name])
    if image_size <= 16:
        return dict(PRESETS["tiny"])
    kw = dict(PRESETS["small"])
    if image_size >= 64:  # one more level per doubling keeps the bottleneck at 8x8 or below
        extra = max(0, (image_size // 64).bit_length())
        kw["channel_mults"] = tuple(kw["channel_mults"]) + (2,) * extra
    return kw


def _train(data_spec, out, image_size, channels, opts, model_opts, diff_opts, device, precision, compile_, resume, overwrite):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .engine import checkpoint as ckpt
    from .engine import data as data_mod
    from .engine import training
    from .engine.diffusion import DiffusionConfig
    from .engine.errors import ConfigError
    from .engine.unet import UNetConfig

    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"--channels must be 1 or 3 (got {channels})")
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"--image-size must be between 1 and {MAX_IMAGE_SIZE} (got {image_size})")
    out = out or Path("runs") / (data_spec.split(":", 1)[1] if data_spec.startswith("builtin:") else (Path(data_spec).name or "run"))
    given = {k: v for k, v in opts.items() if v is not None}
    stored_train: dict = {}
    stored_model: dict | None = None
    if resume:
        st = training.newest_state(out)
        stored_train, stored_model = st.train, st.model
        image_size = image_size or stored_model.get("image_size")
        channels = channels or stored_model.get("in_channels")
    is_main = int(os.environ.get("RANK", "0")) == 0
    say = console.print if is_main else (lambda *a, **k: None)

    # --- data ----------------------------------------------------------------------------
    t_load = time.perf_counter()
    ds = data_mod.load_dataset(data_spec, image_size, channels)
    n, c, s = ds.images.shape[0], ds.images.shape[1], ds.images.shape[-1]
    say(f"[bold]data[/]  {ds.summary.source}: {n} images used, {c}x{s}x{s}, decoded in {time.perf_counter() - t_load:.1f}s")
    for line in ds.summary.lines():
        say(f"  [yellow]{line}[/]")

    # --- configs -------------------------------------------------------------------------
    if resume:
        model_cfg = UNetConfig.from_dict(stored_model)
        base = TrainConfig_from(stored_train)
        diff_cfg = None  # taken from the state by the engine
    else:
        kw = preset_kwargs(model_opts["preset"], s)
        for key, val in (("base_channels", model_opts["base_channels"]), ("num_res_blocks", model_opts["num_res_blocks"]),
                         ("dropout", model_opts["dropout"])):
            if val is not None:
                kw[key] = val
        cm = _csv_ints(model_opts["channel_mults"], "--channel-mults")
        if cm is not None:
            kw["channel_mults"] = cm
        ar = _csv_ints(model_opts["attention_res"], "--attention-res", allow_empty=True)
        if ar is not None:
            kw["attention_resolutions"] = ar
        elif s % 2 ** (len(kw["channel_mults"]) - 1) == 0:
            # A preset's attention levels are a suggestion: keep those this image size has.
            levels = {s // 2**i for i in range(len(kw["channel_mults"]))}
            kw["attention_resolutions"] = tuple(r for r in kw["attention_resolutions"] if r in levels)
        model_cfg = UNetConfig(**kw, image_size=s, in_channels=c)
        dkw = {k: v for k, v in diff_opts.items() if v is not None and k != "zero_terminal_snr"}
        diff_cfg = DiffusionConfig(**dkw, zero_terminal_snr=diff_opts["zero_terminal_snr"])
        base = {}
    if "hflip" not in given and not resume:
        given["hflip"] = not data_spec.startswith("builtin:")
    cfg = training.TrainConfig(**{**base, **given, "precision": precision, "compile": compile_})

    # --- run -------------------------------------------------------------------------------
    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=not is_main, transient=False,
    )
    task = None
    smooth = None

    def on_event(e: dict) -> None:
        nonlocal task, smooth
        kind = e["event"]
        if kind == "start":
            say(f"[bold]model[/] U-Net {e['parameters'] / 1e6:.2f}M parameters; device {e['device']}, "
                f"precision {e['precision']}, {e['world_size']} process(es), global batch {cfg.batch_size}")
            dcfg = diff_cfg
            if dcfg is not None:
                say(f"[bold]noise[/] {dcfg.schedule} schedule, T = {dcfg.timesteps}, predicting {dcfg.prediction}")
            if e["resumed"]:
                say(f"resuming at step {e['step']}")
            task = progress.add_task("train", total=e["steps"], completed=e["step"], loss="…", ips="…")
            progress.start()
        elif kind == "step":
            progress.update(task, completed=e["step"])
        elif kind == "log":
            smooth = e["loss"] if smooth is None else 0.8 * smooth + 0.2 * e["loss"]
            progress.update(task, loss=f"{smooth:.4f}", ips=f"{e['img_per_s']:.0f}")
            if not console.is_terminal and is_main:  # logs and CI: a plain line every ~10%
                tenth = max(1, cfg.steps // 10)
                if e["step"] // tenth != (e["step"] - cfg.log_every) // tenth or e["step"] == cfg.steps:
                    say(f"  step {e['step']}/{cfg.steps}  loss {smooth:.4f}  {e['img_per_s']:.0f} img/s  "
                        f"{e['elapsed']:.0f}s")
        elif kind == "warning":
            progress.console.print(f"[yellow]warning:[/] {e['message']}")
        elif kind == "preview":
            progress.console.print(f"  step {e['step']}: samples -> {e['path']}")

    try:
        result = training.train(ds, out, model_cfg, diff_cfg, cfg, device=device, resume=resume, overwrite=overwrite,
                                 callback=on_event)
    finally:
        progress.stop()
    if is_main:
        say(f"[bold green]done[/] {result['step']} steps in {result['elapsed']:.0f}s, final loss {result['loss']:.4f}")
        say(f"  model    {result['model']}")
        say(f"  previews {result['samples']}/")
        say(f"  next:    diffuse sample {result['model']} --num 16 --grid grid.png")
    _ = ckpt


def TrainConfig_from(d: dict) -> dict:  # noqa: N802
    """The stored training options that a resumed run keeps unless given again."""
    keep = ("steps", "batch_size", "lr", "warmup", "weight_decay", "grad_clip", "ema_decay", "loss_weighting", "hflip",
            "save_every", "sample_every", "keep", "log_every", "num_preview", "preview_steps", "seed")
    return {k: d[k] for k in keep if k in d}


# --- sample ---------------------------------------------------------------------------------
@app.command(no_args_is_help=True)
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="A model .safetensors file, a run folder or a diffusers DDPM folder.", show_default=False)],
    num: Annotated[int, typer.Option("--num", "-n", help="How many images.")] = 16,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for one PNG per image (0000.png ...).")] = Path("samples"),
    grid: Annotated[Path | None, typer.Option("--grid", help="Also write all images as one grid PNG.")] = None,
    sampler: Annotated[SamplerName, typer.Option("--sampler", help="dpmpp (fast, default), ddim, or ddpm (the seed's ancestral sampler).")] = SamplerName.dpmpp,
    steps: Annotated[int | None, typer.Option("--steps", help="Model evaluations. [default: 20 dpmpp, 50 ddim, T ddpm]")] = None,
    eta: Annotated[float, typer.Option("--eta", help="DDIM noise: 0 deterministic, 1 DDPM-like.")] = 0.0,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per model call.")] = 64,
    device: DeviceOpt = "auto",
    gif: Annotated[Path | None, typer.Option("--gif", help="Animate the denoising of the first few images: x_t beside predicted x_0.")] = None,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Clip predicted x_0 to [-1, 1] at each step.")] = True,
) -> None:
    """Generate images by running the learned reverse process from pure noise x_T ~ N(0, I).

    `--sampler ddpm --steps T` is the seed's algorithm exactly (DDPM Algorithm 2); ddim (Song et al.
    2021) and dpmpp (DPM-Solver++, Lu et al. 2022) reach similar quality in 10-50 model calls.

    **Examples**

        diffuse sample runs/digits --num 64 --grid grid.png

        diffuse sample runs/digits/model.safetensors --sampler ddim --steps 50 --eta 0 --out imgs/

        diffuse sample runs/digits --sampler ddpm --num 8 --gif denoise.gif
    """
    _run(_sample, checkpoint, num, out, grid, sampler.value, steps, eta, seed, batch_size, device, gif, clip)


def _sample(checkpoint, num, out, grid, sampler_name, steps, eta, seed, batch_size, device, gif, clip) -> None:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine import checkpoint as ckpt
    from .engine import images as img
    from .engine import samplers
    from .engine.errors import ConfigError
    from .engine.fileio import ensure_dir
    from .engine.training import autocast_dtype, resolve_device

    if num < 1:
        raise ConfigError(f"--num must be at least 1 (got {num})")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"--eta must be in [0, 1] (got {eta})")
    if out is None and grid is None and gif is None:
        raise ConfigError("nothing to write: give --out, --grid or --gif")
    dev = resolve_device(device)
    model, diffusion, ck = ckpt.load_for_sampling(checkpoint, dev)
    T = diffusion.num_timesteps
    steps = steps if steps is not None else samplers.default_steps(sampler_name, T)
    if not 1 <= steps <= T:
        raise ConfigError(f"--steps must be between 1 and T = {T} (got {steps})")
    # Check outputs before spending time sampling.
    if out is not None:
        ensure_dir(out)
    for p in (grid, gif):
        if p is not None:
            ensure_dir(Path(p).parent if str(Path(p).parent) else Path("."))
    mc = ck.model
    c, s = mc["in_channels"], mc["image_size"]
    amp = autocast_dtype("auto", dev)

    def net(x_t, t):
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return model(x_t, t).float()

    opts = {"clip_x0": clip}
    if sampler_name == "ddim":
        opts["eta"] = eta
    console.print(f"[bold]sample[/] {ck.path} (step {ck.step}, {ck.diffusion.get('schedule')} schedule, T = {T}, "
                  f"predicts {ck.diffusion.get('prediction')}); {sampler_name}, {steps} steps, device {dev}")
    gen = torch.Generator(device=dev).manual_seed(seed)
    results = []
    trajectory = []
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]sample[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[ips]} img/s"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("sample", total=num, ips="…")
        done = 0
        while done < num:
            b = min(batch_size, num - done)
            x_T = torch.randn((b, c, s, s), generator=gen, device=dev)
            cb = None
            if gif is not None and done == 0:
                k = min(b, 4)

                def cb(state, k=k):
                    trajectory.append((state["x_t"][:k].float().cpu(), state["x0_pred"][:k].float().cpu()))

            with torch.no_grad():
                x0 = samplers.sample(net, diffusion, x_T, sampler=sampler_name, steps=steps, generator=gen, callback=cb, **opts)
            results.append(x0.float().cpu())
            done += b
            progress.update(task, completed=done, ips=f"{done / (time.perf_counter() - t0):.1f}")
    images = torch.cat(results)
    if out is not None:
        width = max(4, len(str(num - 1)))
        for i, im in enumerate(images):
            img.save_image(img.to_pil(im), Path(out) / f"{i:0{width}d}.png")
        console.print(f"{num} images written to [bold]{out}/[/]")
    if grid is not None:
        g = img.make_grid(images)
        img.save_image(img.upscale(g, 512), grid)
        console.print(f"grid written to [bold]{grid}[/]")
    if gif is not None:
        frames = []
        keep = max(1, math.ceil(len(trajectory) / 40))  # at most ~40 frames, always the last one
        trajectory = trajectory[::-1][::keep][::-1]
        for x_t, x0p in trajectory:
            pair = torch.cat([x_t, x0p])  # top row x_t, bottom row predicted x_0
            frames.append(img.upscale(img.make_grid(pair, nrow=x_t.shape[0]), 256))
        if trajectory:
            img.save_gif(frames, gif, duration_ms=120)
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

        diffuse export runs/digits digits-diffusers

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
    from .engine.errors import ConfigError, OutputError
    from .engine.training import resolve_device

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
        if not 1 <= steps <= T:
            raise ConfigError(f"--steps must be between 1 and T = {T} (got {steps})")
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
            fake = evaluate.generate(model, diffusion, n, (c, s, s), sampler=sampler_name, steps=steps,
                                     batch_size=batch_size, generator=torch.Generator(device=dev).manual_seed(seed),
                                     device=dev, callback=lambda e: progress.update(task, completed=e["done"]))
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
        err_console.print(f"[bold red]error:[/] {message}")
        sys.exit(code)
    except Exception as err:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("DIFFUSE_DEBUG"):
            raise
        msg = str(err).splitlines()[0] if str(err) else ""
        err_console.print(f"[bold red]error:[/] unexpected {type(err).__name__}: {msg} "
                          "(please report it; DIFFUSE_DEBUG=1 shows the traceback)", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
