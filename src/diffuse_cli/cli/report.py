"""`diffuse report RUN [RUN...]`: the training report picture of a run, or of several runs overlaid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import console, run


def report(
    runs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN...", help="One or more run folders (the --out of diffuse train).", show_default=False
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="The PNG to write. [default: RUN/report.png for one run, ./report.png for several]"
        ),
    ] = None,
) -> None:
    """Draw a run's training report: one picture of how the run went, from its log.jsonl and previews.

    Panels: the loss of Ho et al. 2020 eq. 14 (smoothed, log scale) against step and time, the learning rate,
    img/s, the in-training Frechet distance and KID of fixed EMA samples with the real-vs-real floor at the
    same count, the share of samples that are near-copies of a training image (Carlini et al. 2023's relative
    nearest-neighbour distance) with real images' own share, the distance to the nearest training image, and
    the preview grids along the way. `diffuse train` redraws RUN/report.png at every save; several runs are
    overlaid in one picture, one colour per run.

    **Examples**

        diffuse report runs/digits

        diffuse report runs/digits-a runs/digits-b --out compare.png
    """
    from ..engine import report as report_mod

    result = run(report_mod.write_report, runs, out)
    for line in result["runs"]:
        console.print(f"  {line}")
    w, h = result["size"]
    console.print(f"[bold]report[/] -> {result['path']} ({w}x{h})")
