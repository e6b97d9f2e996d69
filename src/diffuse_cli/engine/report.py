"""The training report: one picture of a run (or several, overlaid) from its log.jsonl and preview grids.

Panels, each against the optimizer step unless said otherwise: the loss (DDPM's simple loss,
Ho et al. 2020 eq. 14, smoothed, log scale) against step and against time, the learning rate,
the training speed (img/s), the in-training Frechet distance with its real-vs-real floor, the
KID (Binkowski et al. 2018) with its floor, and the share of samples that are near-copies of
a training image (:mod:`.memorisation`, Carlini et al. 2023) with the real images' own share;
under them the preview grids along the way (the first run's). Drawn with Pillow by the same
line plots as ``diffuse schedule --plot`` (:func:`images.line_plot`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

from PIL import Image, ImageDraw

from .errors import ConfigError

SMOOTH = 0.2  # weight of a new log point in the loss's exponential moving average
PREVIEWS = 6  # preview grids shown, spread over the run


def read_log(run: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of ``run``'s log.jsonl; a ConfigError when there is none."""
    path = Path(run) / "log.jsonl"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError as err:
        raise ConfigError(f"{run} is not a run folder (no log.jsonl); give the --out of a diffuse train run") from err
    except OSError as err:
        from .fileio import describe_os_error

        raise ConfigError(describe_os_error(err, path)) from err
    train, evals = [], []
    for line in lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                if "loss" in rec:
                    train.append(rec)
                elif "fd" in rec:
                    evals.append(rec)
    return train, evals


def smooth(values: list[float], weight: float = SMOOTH) -> list[float]:
    """Exponential moving average (debiased like Adam's moments, so the first points are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = (1 - weight) * avg + weight * v
        out.append(avg / (1 - (1 - weight) ** i))
    return out


def _series(runs: list[tuple[str, list[dict], list[dict]]], which: str, key: str, x: str = "step", scale: float = 1.0):
    """One (name, xs, ys) per run that has ``key`` in its ``which`` ("train" or "eval") records."""
    out = []
    for name, train, evals in runs:
        recs = [r for r in (train if which == "train" else evals) if isinstance(r.get(key), int | float)]
        if recs:
            out.append((name, [r[x] * (1 / 60 if x == "elapsed" else 1) for r in recs], [r[key] * scale for r in recs]))
    return out


def _panel(series, title: str, xlabel: str, ylabel: str, **kw) -> Image.Image:
    from .images import line_plot

    if not series:  # nothing logged yet (no evaluation so far): an empty frame that says so
        return line_plot([("", [0.0, 1.0], [math.nan, math.nan])], title=f"{title} (none yet)", xlabel=xlabel,
                         ylabel=ylabel)  # fmt: skip
    return line_plot(series, title=title, xlabel=xlabel, ylabel=ylabel, **kw)


def _with_floor(runs, key: str, floor: str, label: str, scale: float = 1.0):
    """The metric and its floor, one pair of series per run (names carry the run only when overlaid)."""
    out = []
    for name, xs, ys in _series(runs, "eval", key, scale=scale):
        _, fx, fy = next(iter(_series([r for r in runs if r[0] == name], "eval", floor, scale=scale)), (0, [], []))
        prefix = f"{name}: " if len(runs) > 1 else ""
        out.append((f"{prefix}{key.replace('_', '-')}", xs, ys))
        if fy:
            out.append((f"{prefix}{label}", fx, fy))
    return out


def _previews(run: Path, width: int) -> Image.Image | None:
    from .images import labelled_strip

    files = sorted((run / "samples").glob("step-*.png"))
    if not files:
        return None
    count = min(PREVIEWS, len(files))
    pick = [files[round(i * (len(files) - 1) / max(1, count - 1))] for i in range(count)]
    size = min(200, (width - 8) // len(pick) - 8)  # the strip fits the width of the plots
    panels = []
    for p in pick:
        with Image.open(p) as im:
            panel = im.convert("RGB")
        panel.thumbnail((size, size), Image.NEAREST)  # previews are saved at 256 px or more: shrink them
        panels.append(panel)
    labels = [f"step {int(re.sub(r'[^0-9]', '', p.stem))}" for p in pick]
    return labelled_strip(panels, labels, panel_size=size)


def draw_report(runs: list[str | os.PathLike], path: str | os.PathLike | None = None) -> Image.Image:
    """The report of one run, or of several overlaid (one colour per run); saved to ``path`` if given."""
    from .images import BG, FG, font, grid_of_plots, save_image

    if not runs:
        raise ConfigError("give at least one run folder")
    loaded = [(Path(r).name or str(r), *read_log(r)) for r in runs]
    if len({name for name, _, _ in loaded}) < len(loaded):  # same folder names: tell them apart by path
        loaded = [(str(r), t, e) for r, (_, t, e) in zip(runs, loaded, strict=True)]
    loss = [(n, xs, smooth(ys)) for n, xs, ys in _series(loaded, "train", "loss")]
    loss_t = [(n, xs, smooth(ys)) for n, xs, ys in _series(loaded, "train", "loss", x="elapsed")]
    panels = [
        _panel(loss, "loss (smoothed)", "step", "loss", logy=True),
        _panel(loss_t, "loss (smoothed) against time", "minutes", "loss", logy=True),
        _panel(_series(loaded, "train", "lr"), "learning rate", "step", "learning rate"),
        _panel(_series(loaded, "train", "img_per_s"), "training speed", "step", "img/s"),
        _panel(
            _with_floor(loaded, "fd", "fd_floor", "floor (real vs real)"),
            "Frechet distance of EMA samples",
            "step",
            "FD (randconv)",
            logy=True,
        ),  # fmt: skip
        _panel(_with_floor(loaded, "kid", "kid_floor", "floor (real vs real)", scale=1e3), "KID x 1000", "step", "KID"),
        _panel(
            _with_floor(loaded, "near_copy", "near_copy_ref", "real images", scale=100),
            "near-copies of training images",
            "step",
            "% of samples",
            ylim=(0.0, 100.0),
        ),  # fmt: skip
        _panel(
            _with_floor(loaded, "pixel_nn", "pixel_nn_ref", "real images"),
            "distance to the nearest training image",
            "step",
            "RMS pixel difference (0-255)",
        ),  # fmt: skip
    ]
    plots = grid_of_plots(panels, ncol=2)
    title = ", ".join(_headline(n, t, e) for n, t, e in loaded)
    strip = _previews(Path(runs[0]), plots.width)
    f = font(16)
    head = 34
    height = head + plots.height + (strip.height + 8 if strip else 0)
    out = Image.new("RGB", (plots.width, height), BG)
    ImageDraw.Draw(out).text((10, 8), title, fill=FG, font=f)
    out.paste(plots, (0, head))
    if strip:
        out.paste(strip, (max(0, (plots.width - strip.width) // 2), head + plots.height + 8))
    if path is not None:
        save_image(out, path)
    return out


def _headline(name: str, train: list[dict], evals: list[dict]) -> str:
    last = train[-1] if train else {}
    text = f"{name}: {last.get('step', 0)} steps"
    if evals:
        best = min(evals, key=lambda r: r["fd"])
        text += f", best FD {best['fd']:.3g} at step {best['step']} (floor {best.get('fd_floor', math.nan):.3g})"
        text += f", near-copies {evals[-1].get('near_copy', 0):.0%}"
    return text


def write_report(runs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> dict:
    """``diffuse report``: draw the report of ``runs`` into ``out`` (default: RUN/report.png for one run,
    ./report.png for several); returns the path and a headline per run."""
    if not runs:
        raise ConfigError("give at least one run folder")
    path = Path(out) if out is not None else (Path(runs[0]) / "report.png" if len(runs) == 1 else Path("report.png"))
    image = draw_report(runs, path)
    return {"path": str(path), "size": image.size, "runs": [_headline(str(r), *read_log(r)) for r in runs]}
