"""`diffuse eval CHECKPOINT DATA`: bits/dim, Frechet distance and precision/recall, as a table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..engine.config import EVAL_FEATURES, REVERSE_VARIANCES, SAMPLER_NAMES
from .app import DeviceOpt, SeedOpt, ThreadsOpt, choices, console, err_console, run

FeatureKind = choices("FeatureKind", EVAL_FEATURES)
Variance = choices("Variance", REVERSE_VARIANCES)
EvalFormat = choices("EvalFormat", ("table", "json"))
SamplerName = choices("SamplerName", SAMPLER_NAMES)

CheckpointArg = Annotated[
    Path, typer.Argument(help="A model .safetensors file, a run folder or a diffusers folder.", show_default=False)
]
DataArg = Annotated[
    str,
    typer.Argument(help="A folder of real images or builtin:digits (resized to the model's size).", show_default=False),
]
FeaturesOpt = Annotated[
    FeatureKind,
    typer.Option(
        "--features",
        help="randconv: a fixed random-weight conv net, no download (its distance is NOT FID); inception: FID "
        "(Inception-v3 of pytorch-fid, an optional extra; weights fetched on first use).",
    ),
]
VarianceOpt = Annotated[
    Variance | None,
    typer.Option(
        "--variance",
        help="Reverse-step variance in the bound: beta (sigma_t^2 = beta_t), posterior (beta~_t) or learned (a model "
        "trained with --variance learned: Nichol & Dhariwal 2021, eq. 15). [default: learned for such a model, "
        "else beta]",
        show_default=False,
    ),
]
TermsOpt = Annotated[
    int | None,
    typer.Option(
        "--terms",
        help="Evaluate only this many of the T-1 KL terms (stratified, rescaled): an unbiased but noisier estimate "
        "of the same bound. [default: all]",
        min=1,
    ),
]
LogOpt = Annotated[
    Path | None,
    typer.Option("--log", help="Append the numbers to this JSON-lines file. [default: eval.jsonl in the run folder]"),
]


def eval_(
    checkpoint: CheckpointArg,
    data: DataArg,
    num_images: Annotated[
        int,
        typer.Option("--num-images", "-n", help="Real images used (a random subset of DATA) and images generated."),
    ] = 500,
    nll: Annotated[
        bool, typer.Option("--nll/--no-nll", help="Negative log-likelihood bound in bits/dim on the real images.")
    ] = True,
    fd: Annotated[
        bool, typer.Option("--fd/--no-fd", help="Frechet distance and precision/recall, generated vs real.")
    ] = True,
    features: FeaturesOpt = FeatureKind("randconv"),
    variance: VarianceOpt = None,
    terms: TermsOpt = None,
    sampler: Annotated[SamplerName, typer.Option("--sampler", help="Sampler for the generated images.")] = SamplerName(
        "dpmpp"
    ),
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Model evaluations per generated image. [default: 20 dpmpp, 50 ddim, T ddpm]"),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per model call.", min=1)] = 64,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    format: Annotated[
        EvalFormat, typer.Option("--format", "-f", help="table for people, json for programs.")
    ] = EvalFormat("table"),
    log: LogOpt = None,
) -> None:
    """Say how good a model is: bits/dim on real images, and a Frechet distance + precision/recall of its samples.

    - **bits/dim**: the variational bound on -log p(x) of Ho et al. 2020 (eq. 5; discretised decoder, eq. 13)
      over 8-bit pixels, averaged over images, with a 95% interval. It needs T model calls per image.
    - **Frechet distance** between features of generated and real images, and **precision/recall**
      (Kynkaanniemi et al. 2019, k = 3) in the same features. `--features randconv` (default) needs no
      download but its distance is not FID; `--features inception` is the standard FID
      (`pip install 'diffuse-cli[fid]'`). Like FID, the number depends on --num-images.

    - **near-copies**: the share of samples whose nearest training image is much closer than the training
      images around it (Carlini et al. 2023's relative distance), against the same share for real images
      left out of the comparison; `nearest.png` beside eval.jsonl shows samples next to their nearest
      training images (near-copies first, framed in red).

    The numbers are printed and appended to the run's eval.jsonl.

    **Examples**

        diffuse eval runs/digits builtin:digits

        diffuse eval runs/faces ~/pictures/faces --num-images 2000 --features inception --format json

        diffuse eval google-ddpm-cifar10-32/ cifar10-test/ --no-fd --terms 100
    """
    from ..engine import evaluate

    as_json = format.value == "json"
    con = err_console if as_json else console
    bars = _Bars(con)
    with bars.progress:
        report, log_path = run(
            evaluate.run, checkpoint, data, num_images=num_images, nll=nll, fd=fd, features=features.value,
            variance=variance.value if variance else None, terms=terms, sampler=sampler.value, steps=steps, batch_size=batch_size, seed=seed,
            device=device, threads=threads, log=log, callback=bars.on_event,
        )  # fmt: skip
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    console.print(_table(report, bars.T))
    if report.get("memorisation", {}).get("copying"):
        m = report["memorisation"]
        console.print(f"[yellow]warning:[/] the model copies its training images: {m['near_copy_share']:.0%} of the "
                      f"samples are near-copies (real images: {m['reference_share']:.0%}); see {m['picture']}")  # fmt: skip
    console.print(f"appended to [bold]{log_path}[/]")


class _Bars:
    """One bar per task of the evaluation; the header line once the model and data are known."""

    def __init__(self, con):
        self.con, self.tasks, self.T = con, {}, 0
        self.progress = Progress(
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=con,
        )

    def on_event(self, e: dict) -> None:
        if e["event"] == "info":
            ck, m, self.T = e["checkpoint"], e["checkpoint"].model, e["T"]
            c, s = m["in_channels"], m["image_size"]
            self.con.print(
                f"[bold]eval[/] {ck.path} (step {ck.step}, T = {self.T}, predicts {ck.diffusion.get('prediction')}) on "
                f"{e['images']} images of {e['data']} ({c}x{s}x{s}), device {e['device']}"
            )
        elif e["event"] == "progress" and e["task"] != "decode":
            if e["task"] not in self.tasks:
                self.tasks[e["task"]] = self.progress.add_task(e["task"], total=e["total"])
            self.progress.update(self.tasks[e["task"]], completed=e["done"], total=e["total"])


def _table(report: dict, T: int) -> Table:
    n = report["images"]
    table = Table(title=f"eval of {report['model']} on {report['data']}", title_justify="left")
    for col, just in (("metric", "left"), ("value", "right"), ("notes", "left")):
        table.add_column(col, justify=just)
    if "nll" in report:
        r = report["nll"]
        lo, hi = r["ci95"]
        exact = "all" if r["terms"] == T - 1 else f"{r['terms']} of {T - 1} (estimate)"
        table.add_row(
            "NLL bound",
            f"{r['bits_per_dim']:.4f} bits/dim",
            f"95% CI [{lo:.4f}, {hi:.4f}] over {n} images; {exact} KL terms; variance {r['variance']} "
            "(Ho et al. 2020 eq. 5, 13)",
        )
    if "fd" in report:
        r = report["fd"]
        name = "FID" if r["is_fid"] else f"FD ({r['features']})"
        what = (
            "Inception-v3 pool3 features (pytorch-fid)"
            if r["is_fid"]
            else f"fixed random-weight conv features, {r['feature_dim']}-d: NOT FID, compare only with itself"
        )
        table.add_row(
            name, f"{r['value']:.4g}", f"{what}; {n} generated ({r['sampler']}, {r['steps']} steps) vs {n} real"
        )
        table.add_row(
            "precision", f"{report['precision']:.3f}", f"generated inside the real manifold (k = {report['pr_k']})"
        )
        table.add_row(
            "recall", f"{report['recall']:.3f}", "real inside the generated manifold (Kynkaanniemi et al. 2019)"
        )
    if "memorisation" in report:
        m = report["memorisation"]
        table.add_row(
            "near-copies",
            f"{m['near_copy_share']:.1%}",
            f"nearest training image < {m['threshold']:.2g} x the mean distance to the {m['k']} nearest "
            f"(Carlini et al. 2023); real images left out: {m['reference_share']:.1%}; {m['picture']}",
        )
        table.add_row(
            "nearest training image",
            f"{m['pixel_distance']:.1f}",
            f"median RMS pixel distance (0-255) of a sample; real images: {m['reference_pixel_distance']:.1f}",
        )
    return table
