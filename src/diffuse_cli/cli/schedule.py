"""`diffuse schedule`: a beta schedule as a table, JSON/CSV or a plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import BEndOpt, BStartOpt, Schedule, TOpt, ZtsnrOpt, choices, console, fmt_snr_db, run

Format = choices("Format", ("table", "json", "csv"))


def schedule(
    kind: Annotated[list[Schedule], typer.Option("--kind", "-k", help="Beta schedule; repeat to compare several.")] = [  # noqa: B006
        Schedule("linear")
    ],
    timesteps: TOpt = 1000,
    beta_start: BStartOpt = 1e-4,
    beta_end: BEndOpt = 0.02,
    zero_terminal_snr: ZtsnrOpt = False,
    format: Annotated[Format, typer.Option("--format", "-f", help="table for people; json/csv with every t.")] = Format(
        "table"
    ),
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG plot of alpha_bar, sqrt forms and log-SNR.")
    ] = None,
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
    from ..engine.diffusion import Diffusion, DiffusionConfig

    kinds = list(dict.fromkeys(k.value for k in kind))
    make = lambda k: Diffusion(DiffusionConfig(k, timesteps, beta_start, beta_end, zero_terminal_snr))  # noqa: E731
    diffs = {k: run(make, k) for k in kinds}
    if plot is not None:
        from ..engine.images import schedule_plot

        run(schedule_plot, diffs, plot)
    records = [d.schedule_record(k) for k, d in diffs.items()]
    if format is Format("json"):
        sys.stdout.write(json.dumps(records[0] if len(records) == 1 else records) + "\n")
    elif format is Format("csv"):
        sys.stdout.write(_csv(records))
    else:
        for k, d in diffs.items():
            _table(k, d, rows, zero_terminal_snr)
        if plot is not None:
            console.print(f"plot written to [bold]{plot}[/]")


def _csv(records: list[dict]) -> str:
    lead = len(records) > 1  # a leading kind column only when several schedules are compared
    lines = [("kind," if lead else "") + "t,beta,alpha_bar,snr"]
    for r in records:
        for v in zip(r["t"], r["beta"], r["alpha_bar"], r["snr"], strict=True):
            lines.append((f"{r['kind']}," if lead else "") + ",".join(map(repr, v)))
    return "\n".join(lines) + "\n"


def _table(kind: str, d, rows: int, ztsnr: bool) -> None:
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
        cells = (f"{float(v):{f}}" for v, f in zip(row, (".6f", ".4g", ".4f", ".4f"), strict=True))
        table.add_row(str(t), *cells, f"{snr:.4g}", fmt_snr_db(snr))
    console.print(table)
    console.print(
        "abar = alpha_bar = prod of (1 - beta); t is 0-based (t = 0 is x_1 in Ho et al. 2020, t = T-1 is x_T)"
    )
    snr_T = float(d.snr[-1])
    console.print(
        f"signal left in x_T: sqrt(alpha_bar) = {float(d.sqrt_alphas_cumprod[-1]):.3g};  "
        f"alpha_bar_T = {float(d.alphas_cumprod[-1]):.3g};  SNR(T) = {snr_T:.3g} ({fmt_snr_db(snr_T)} dB)"
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
