"""Tensors to pictures: PNGs, grids, labelled strips, GIFs and simple line plots, drawn with Pillow.

Model-space images are float tensors in [-1, 1] of shape (C, H, W) or (B, C, H, W)
with C = 1 or 3. Every file is written atomically (see :mod:`.fileio`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import from_model_range
from .fileio import atomic_path, atomic_write_bytes

BG = (255, 255, 255)
FG = (30, 30, 30)
GRID_COLOUR = (225, 225, 225)
MARKED_POINTS = 40  # line_plot marks every point of a series this short
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


# [-1, 1] float -> uint8 0..255: clip, then map linearly (round to nearest).
to_uint8 = from_model_range


def to_pil(x: torch.Tensor) -> Image.Image:
    """One image, (C, H, W) float in [-1, 1] or uint8, to a PIL image (L or RGB)."""
    if x.dtype != torch.uint8:
        x = to_uint8(x)
    arr = x.cpu().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def upscale(img: Image.Image, min_size: int) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor so the short side is at least ``min_size`` (keeps pixels crisp)."""
    f = max(1, math.ceil(min_size / min(img.size)))
    return img if f == 1 else img.resize((img.width * f, img.height * f), Image.NEAREST)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 0) -> Image.Image:
    """(B, C, H, W) images -> one PIL grid, ``nrow`` per row (default: near-square)."""
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    u8 = images if images.dtype == torch.uint8 else to_uint8(images)
    canvas = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y : y + h, x : x + w] = u8[i].cpu()
    return to_pil(canvas)


def save_image(img: Image.Image, path: str | os.PathLike, format: str = "PNG") -> None:
    """Save a PIL image atomically."""
    buf = io.BytesIO()
    img.save(buf, format=format)
    atomic_write_bytes(path, buf.getvalue())


def save_gif(frames: Sequence[Image.Image], path: str | os.PathLike, duration_ms: int = 250, loop: int = 0) -> None:
    """Save frames as an animated GIF, atomically. The last frame is held longer so the result can be seen."""
    frames = [f.convert("RGB") for f in frames]
    durations = [duration_ms] * len(frames)
    durations[-1] = max(duration_ms, 1500)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=loop)


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` (scalable since Pillow 10.1), no system fonts needed."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def labelled_strip(panels: Sequence[Image.Image], labels: Sequence[str], panel_size: int = 128) -> Image.Image:
    """Panels side by side, each with a caption underneath."""
    f = font(max(10, panel_size // 10))
    panels = [upscale(p, panel_size).convert("RGB") for p in panels]
    pw = max(p.width for p in panels)
    ph = max(p.height for p in panels)
    caption = f.size + 10 if hasattr(f, "size") else 20
    gap = 6
    out = Image.new("RGB", (len(panels) * (pw + gap) + gap, ph + caption + 2 * gap), BG)
    d = ImageDraw.Draw(out)
    for i, (p, label) in enumerate(zip(panels, labels, strict=True)):
        x = gap + i * (pw + gap)
        out.paste(p, (x, gap))
        tw = d.textlength(label, font=f)
        d.text((x + (pw - tw) / 2, gap + ph + 4), label, fill=FG, font=f)
    return out


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], about ``target`` of them."""
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        return [lo]
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v: float, step: float) -> str:
    return f"{v:.0f}" if step >= 1 else f"{v:.{max(0, -math.floor(math.log10(step)))}f}"


def line_plot(
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (520, 340),
    ylim: tuple[float, float] | None = None,
    logy: bool = False,
) -> Image.Image:
    """A minimal line plot: axes with round ticks, one coloured line per (name, xs, ys), and a legend
    in a row under the axes (so it never covers a curve).

    Non-finite values break the line (e.g. log-SNR = -inf at zero terminal SNR). ``logy``: a log-scale
    y axis (values <= 0 break the line too).
    """
    if logy:
        series = [(n, xs, [math.log10(y) if y > 0 else math.nan for y in ys]) for n, xs, ys in series]
        ylim = (math.log10(ylim[0]), math.log10(ylim[1])) if ylim else None
    w, h = size
    f = font(12)
    ft = font(14)
    legend_h = 20 if len(series) > 1 else 0
    h += legend_h
    left, right, top, bottom = 62, 16, 30, 44 + legend_h
    img = Image.new("RGB", (w, h), BG)
    d = ImageDraw.Draw(img)
    finite = [y for _, _, ys in series for y in ys if math.isfinite(y)]
    xs_all = [x for _, xs, _ in series for x in xs]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = ylim if ylim else (min(finite), max(finite)) if finite else (0.0, 1.0)  # all inf: axes only
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    if x1 - x0 < 1e-12:
        x1 = x0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    yt, xt = nice_ticks(y0, y1), nice_ticks(x0, x1)
    for yv in yt:
        _, yp = px(x0, yv)
        d.line([(left, yp), (w - right, yp)], fill=GRID_COLOUR)
        label = f"{10**yv:.3g}" if logy else _tick_label(yv, yt[1] - yt[0] if len(yt) > 1 else 1)
        d.text((left - 6 - d.textlength(label, font=f), yp - 7), label, fill=FG, font=f)
    for xv in xt:
        xp, _ = px(xv, y0)
        d.line([(xp, top), (xp, h - bottom)], fill=GRID_COLOUR)
        label = _tick_label(xv, xt[1] - xt[0] if len(xt) > 1 else 1)
        d.text((xp - d.textlength(label, font=f) / 2, h - bottom + 5), label, fill=FG, font=f)
    d.rectangle([left, top, w - right, h - bottom], outline=FG)
    lx = left
    for k, (name, xs, ys) in enumerate(series):
        colour = PALETTE[k % len(PALETTE)]
        seg: list[tuple[float, float]] = []
        for x, y in zip(xs, ys, strict=True):
            if math.isfinite(y):
                seg.append(px(x, min(max(y, y0), y1)))
            else:
                if len(seg) > 1:
                    d.line(seg, fill=colour, width=2)
                seg = []
        if len(seg) > 1:
            d.line(seg, fill=colour, width=2)
        if len(xs) <= MARKED_POINTS:  # few points (an evaluation curve): mark each, so a single one shows
            for x, y in zip(xs, ys, strict=True):
                if math.isfinite(y):
                    cx, cy = px(x, min(max(y, y0), y1))
                    d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        if legend_h:  # legend: one row under the x label
            ly = h - legend_h + 2
            d.line([(lx, ly + 7), (lx + 20, ly + 7)], fill=colour, width=3)
            d.text((lx + 24, ly), name, fill=FG, font=f)
            lx += 24 + d.textlength(name, font=f) + 18
    d.text(((w - d.textlength(title, font=ft)) / 2, 8), title, fill=FG, font=ft)
    d.text(((w - d.textlength(xlabel, font=f)) / 2, h - bottom + 24), xlabel, fill=FG, font=f)
    # vertical y label: draw on a small image and rotate
    lw = int(d.textlength(ylabel, font=f)) + 4
    lab = Image.new("RGB", (lw, 16), BG)
    ImageDraw.Draw(lab).text((2, 1), ylabel, fill=FG, font=f)
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (4, top + (h - top - bottom - lab.height) // 2))
    return img


def grid_of_plots(plots: Sequence[Image.Image], ncol: int = 2, gap: int = 8) -> Image.Image:
    rows = math.ceil(len(plots) / ncol)
    pw = max(p.width for p in plots)
    ph = max(p.height for p in plots)
    out = Image.new("RGB", (ncol * pw + (ncol - 1) * gap, rows * ph + (rows - 1) * gap), BG)
    for i, p in enumerate(plots):
        r, c = divmod(i, ncol)
        out.paste(p, (c * (pw + gap), r * (ph + gap)))
    return out


def schedule_plot(diffusions: dict, path) -> None:
    """Four panels (alpha_bar, its square roots, log-SNR) against t, one curve per named schedule."""
    specs = [
        ("alpha_bar_t", lambda d: d.alphas_cumprod, (0.0, 1.0)),
        ("sqrt(alpha_bar_t): signal scale", lambda d: d.sqrt_alphas_cumprod, (0.0, 1.0)),
        ("sqrt(1 - alpha_bar_t): noise scale", lambda d: d.sqrt_one_minus_alphas_cumprod, (0.0, 1.0)),
        ("log SNR_t = log(alpha_bar / (1 - alpha_bar))", lambda d: d.log_snr, None),
    ]
    panels = []
    for title, fn, ylim in specs:
        series = [(n, list(range(d.num_timesteps)), fn(d).tolist()) for n, d in diffusions.items()]
        panels.append(line_plot(series, title=title, xlabel="t", ylabel=title.split(":")[0].split(" =")[0], ylim=ylim))
    save_image(grid_of_plots(panels, ncol=2), path)


def trajectory_frames(frames: Sequence[tuple[torch.Tensor, torch.Tensor]], max_frames: int = 40) -> list[Image.Image]:
    """GIF frames of a denoising run: x_t on top, predicted x_0 below; at most ``max_frames``, always the last."""
    keep = max(1, math.ceil(len(frames) / max_frames))
    frames = list(frames)[::-1][::keep][::-1]
    return [upscale(make_grid(torch.cat([x_t, x0]), nrow=x_t.shape[0]), 256) for x_t, x0 in frames]
