"""Samplers on trained networks: sample quality of our samplers and diffusers' schedulers on one model.

The analytic benchmark in ``samplers.py`` has an exact model, whose x0 never needs clipping;
a trained network errs, most of all near pure noise, and that is where clipping and the
sampler's handling of it decide the result (issue #16). Here a model from ``_trained.py``
(trained by the engine's own ``training.train``) is sampled by every configuration from the
same x_T, and the samples are scored by ``_digits_quality.score`` (Frechet distance in a
digit classifier's features, confident and speckled fractions).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch

from diffuse_cli.engine import samplers as S
from diffuse_cli.engine.data import from_model_range
from diffuse_cli.engine.diffusion import Diffusion

from . import _digits_quality as Q
from ._trained import ModelSpec, trained_model

Run = Callable[[Callable, Diffusion, torch.Tensor], torch.Tensor]
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def ours(sampler: str, steps: int | None = None, **opts) -> Run:
    def run(model, diffusion, x_T):
        return S.sample(model, diffusion, x_T, sampler=sampler, steps=steps,
                        generator=torch.Generator().manual_seed(2), **opts)  # fmt: skip

    return run


def diffusers_run(kind: str, steps: int, **config) -> Run:
    """diffusers' DDIMScheduler ("ddim") or DPMSolverMultistepScheduler ("dpm") driving our network."""

    def run(model, diffusion, x_T):
        import diffusers

        cls = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler}[kind]
        sched = cls(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas.cpu().numpy(),
                    prediction_type=DIFFUSERS_PREDICTION[diffusion.prediction], **config)  # fmt: skip
        sched.set_timesteps(steps)
        x = x_T
        for t in sched.timesteps:
            out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.int64))
            x = sched.step(out, t, x).prev_sample
        return x

    return run


def configs(prediction: str = "eps", variants: bool = False, quick: bool = False) -> dict[str, Run]:
    """The rows: diffusers' references, then ours with each clipping mode (the default one marked)."""
    dpm = {"eps": "dpm"}.get(prediction)  # diffusers' DPM++ thresholding row is for the issue's eps model
    c: dict[str, Run] = {
        "diffusers DDIM 50, leading, clip_sample": diffusers_run(
            "ddim", 50, timestep_spacing="leading", clip_sample=True
        ),
    }
    if variants:
        c["diffusers DDIM 50, trailing, clip_sample"] = diffusers_run(
            "ddim", 50, timestep_spacing="trailing", clip_sample=True
        )
    if dpm and not quick:
        c["diffusers DPM++ 2M 20, thresholding"] = diffusers_run("dpm", 20, thresholding=True)
    modes = ["static", "dynamic", "rederive"] if not quick else [S.DEFAULT_CLIP, "rederive"]
    for sampler in ("dpmpp", "ddim"):
        steps = S.DEFAULT_STEPS[sampler]
        for mode in modes if sampler == "dpmpp" or variants else [S.DEFAULT_CLIP]:
            mark = " (default)" if mode == S.DEFAULT_CLIP else ""
            c[f"ours {sampler} {steps}, clip={mode}{mark}"] = ours(sampler, clip_x0=mode)
    if variants:
        c["ours dpmpp 10, clip=static"] = ours("dpmpp", 10, clip_x0="static")
        c["ours dpmpp 20 2M, clip=static"] = ours("dpmpp", 20, order=2, clip_x0="static")
        c["ours ddim 50, clip=none"] = ours("ddim", clip_x0="none")
        for mode in ("static", "rederive"):
            c[f"ours ddim 50 uniform (diffusers' trailing grid), clip={mode}"] = ours(
                "ddim", spacing="uniform", clip_x0=mode
            )
            c[f"ours ddpm 100, clip={mode}"] = ours("ddpm", 100, clip_x0=mode)
    return c


def run_trained(spec: ModelSpec, n: int = 500, rows: dict[str, Run] | None = None, batch: int = 250, log=print) -> dict:
    """{row: score dict + seconds} for ``spec``'s model; all rows start from the same x_T (seed 1)."""
    model, diffusion, _ = trained_model(spec, log=log)
    size = spec.image_size
    x_T = torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def net(x, t):
        return model(x.float(), t)

    res = {"floor": Q.floor(size)}
    log(f"  {spec.name}: real training half scores fd {res['floor']['fd']:.2f}, "
        f"classifier held-out accuracy {res['floor']['heldout_accuracy']:.3f}")  # fmt: skip
    for name, run in (rows or configs(spec.prediction)).items():
        t0 = time.perf_counter()
        out = torch.cat([run(net, diffusion, xb) for xb in x_T.split(batch)])
        sc = Q.score(from_model_range(out))
        sc["seconds"] = time.perf_counter() - t0
        res[name] = sc
        log(f"  {spec.name:14s} {name:42s} fd {sc['fd']:7.2f}  speckled {100 * sc['speckled']:5.1f}%  "
            f"confident {100 * sc['confident']:5.1f}%  ({sc['seconds']:.0f} s)")  # fmt: skip
    return res


QUICK = ModelSpec("digits8-quick", image_size=8, steps=40, batch_size=16,
                  unet=dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0))  # fmt: skip


def run_all(models: list[str], n: int, variants: bool = False, quick: bool = False, log=print) -> dict:
    """{model name: run_trained result}; ``quick`` swaps in a tiny 8x8 model and 32 samples."""
    from . import _trained

    specs = [QUICK] if quick else [_trained.SPECS[m] for m in models]
    out = {}
    for spec in specs:
        rows = configs(spec.prediction, variants=variants, quick=quick)
        out[spec.name] = {"spec": spec, **run_trained(spec, 32 if quick else n, rows, log=log)}
    return out


def summarize(res: dict) -> tuple[str, list[str], bool]:
    """One markdown table over every model, the verdict lines, and whether the targets hold.

    Targets (issue #16), per model: each of our default samplers (dpmpp at its default steps,
    ddim 50) has a Frechet distance at most that of diffusers' DDIM 50 (leading, clip_sample)
    and no speckled samples.
    """
    table = ["| model | sampler (same model, same x_T) | FD | speckled | confident |", "|---|---|---:|---:|---:|"]
    lines, ok = [], True
    for name, r in res.items():
        fl = r["floor"]
        table.append(f"| {name} | real digits (training half) | {fl['fd']:.1f} | {100 * fl['speckled']:.0f}% | "
                     f"{100 * fl['confident']:.0f}% |")  # fmt: skip
        rows = [k for k in r if k not in ("spec", "floor")]
        for row in rows:
            sc = r[row]
            table.append(
                f"| {name} | {row} | {sc['fd']:.1f} | {100 * sc['speckled']:.1f}% | {100 * sc['confident']:.0f}% |"
            )
        ref = r.get("diffusers DDIM 50, leading, clip_sample")
        for row in (k for k in rows if k.endswith("(default)")):
            sc = r[row]
            good = ref is not None and sc["fd"] <= ref["fd"] and sc["speckled"] == 0.0
            ok &= good
            lines.append(f"{name}: {row}: FD {sc['fd']:.1f} vs diffusers DDIM 50 {ref['fd'] if ref else float('nan'):.1f}, "
                         f"{100 * sc['speckled']:.1f}% speckled (target: FD <= diffusers', 0% speckled: "
                         f"{'met' if good else 'MISSED'})")  # fmt: skip
    return "\n".join(table), lines, ok


def markdown(table: str, lines: list[str], command: str, elapsed: float, n: int, quick: bool) -> str:
    import datetime
    import platform

    import diffusers

    return "\n".join([
        "## Samplers on trained networks (`benchmarks/samplers.py`, `_samplers_trained.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; {os.cpu_count()} CPUs, {platform.system()}; torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}; {elapsed:.0f} s (training excluded when cached)",
        "- models: the built-in digits at 16x16, `diffuse train`'s loop (`training.train`) with --base-channels 32 "
        "--channel-mults 1,2,2 --num-res-blocks 2 --attention-res 8 --batch-size 32 --warmup 0, 900 steps, linear "
        "schedule, T = 1000; `-eps` / `-v` is the prediction (see `benchmarks/_trained.py`)"
        if not quick else "- model: a tiny 8x8 smoke-test model (`--quick`); the numbers mean nothing",
        f"- {32 if quick else n} samples per row from the same x_T (seed 1) for every sampler. FD: Frechet distance "
        "to the 898 held-out digits in the 64 penultimate features of a small CNN digit classifier trained on the "
        "other half (`benchmarks/_digits_quality.py`); speckled: mean |horizontal pixel difference| > 60 of 255 "
        "(saturated noise); confident: classified with p > 0.9. Lower FD is better.",
        "- clip: `static` clamps x0 to [-1, 1] and keeps the network's eps (diffusers' DDIM `clip_sample`); "
        "`dynamic` is Imagen's dynamic thresholding (p99.5) with the network's eps; `rederive` is the pre-#16 path "
        "(clamp, then eps re-derived from the clamped x0). diffusers' DPM++ `thresholding` is dynamic thresholding "
        "of its data prediction, which for a data-prediction solver is the `rederive` semantics.",
        "",
        table,
        "",
        *[f"- {line}" for line in lines],
    ])  # fmt: skip


if __name__ == "__main__":
    from . import _trained

    torch.set_num_threads(1)
    names = sys.argv[1:] or ["digits16-eps"]
    for name in names:
        run_trained(_trained.SPECS[name])
