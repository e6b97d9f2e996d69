"""Sampler accuracy: sliced Wasserstein-2 to exact samples of a 2-D Gaussian mixture.

The data is a 2-D Gaussian mixture whose noise predictor is exact (closed form, see
``diffuse_cli.engine.analytic``), so the only error left is the sampler's. Each sampler,
ours and diffusers' schedulers, is driven by the same eps model from the same x_T ~ N(0, I)
and draws N points with 10, 20 and 50 model evaluations (NFE). Two numbers per cell:

- SW2 to exact data samples: sliced W2 over 128 fixed random directions (sort-based 1-D W2)
  against N exact draws. A perfect sampler scores about the *floor*, the same distance
  between two independent exact sample sets (shown as the mean and range over 5 pairs).
- solver error: SW2 to the exact probability-flow ODE solution from the same x_T (solved
  with 1000 log-SNR-uniform 3M steps on a continuous-time grid down to sigma = 1e-4). It
  has no sampling noise, so it separates samplers whose first numbers are within noise;
  a stochastic sampler (DDPM) is not expected to approach it.

A second part runs the samplers on small trained networks (``_samplers_trained.py``): the
built-in digits at 16x16, trained by the engine's own training loop for a fixed number of steps
(cached), sampled by our samplers and by diffusers' schedulers from the same x_T, and scored by a
Frechet distance in a digit classifier's features (``_digits_quality.py``). An exact model never
needs its x0 clipped; a trained one does, and that is where issue #16 hid.

Targets for our defaults (``sample(..., sampler="dpmpp")``): at 10 NFE an SW2 at most 0.8x
the best diffusers configuration on each schedule; at 20 NFE, within the noise floor, read as
"the solver error is below the floor", i.e. the sampler's deviation from the exact ODE is
smaller than the difference between two exact sample sets of this size.

    python -m benchmarks.samplers                        # full run (~15 minutes on 2 cores, once trained)
    python -m benchmarks.samplers --quick                # seconds: smoke test
    python -m benchmarks.samplers --part trained --models digits16-eps digits16-v
    python -m benchmarks.samplers --markdown benchmarks/RESULTS.md
    python -m benchmarks.samplers --variants --schedules linear quadratic cosine sigmoid   # tuning view
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffuse_cli.engine import samplers as S
from diffuse_cli.engine.analytic import GaussianMixture
from diffuse_cli.engine.config import DiffusionConfig
from diffuse_cli.engine.diffusion import Diffusion

from ._common import cpu_name, replace_section

MARK_START, MARK_END = "<!-- samplers:start -->", "<!-- samplers:end -->"
TRAINED_START, TRAINED_END = "<!-- samplers-trained:start -->", "<!-- samplers-trained:end -->"
TARGET_RATIO_10 = 0.8  # our default at 10 NFE: at most 0.8x the best diffusers configuration
FLOOR_PAIRS = 5
DEFAULT_LABEL = "ours dpmpp (defaults)"


def mixture() -> GaussianMixture:
    """Seven components in [-1, 1]^2: six thin, tangentially stretched blobs on a ring plus a wide core."""
    angles = torch.arange(6, dtype=torch.float64) * (math.pi / 3) + 0.3
    means = 0.75 * torch.stack([angles.cos(), angles.sin()], 1)
    rot = torch.stack([torch.stack([angles.cos(), -angles.sin()], 1), torch.stack([angles.sin(), angles.cos()], 1)], 1)
    stds = torch.tensor([0.04, 0.12], dtype=torch.float64)  # radial, tangential
    covs = rot @ torch.diag_embed(stds**2).expand(6, 2, 2) @ rot.transpose(1, 2)
    means = torch.cat([means, torch.tensor([[0.05, -0.05]], dtype=torch.float64)])
    covs = torch.cat([covs, (0.2**2 * torch.eye(2, dtype=torch.float64))[None]])
    weights = [0.1, 0.15, 0.1, 0.2, 0.1, 0.15, 0.2]
    return GaussianMixture(weights, means, covs=covs)


def projections(n: int, seed: int = 1234) -> torch.Tensor:
    """n fixed unit directions in 2-D, shape (2, n)."""
    p = torch.randn((2, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return p / p.norm(dim=0, keepdim=True)


def sorted_projections(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """The points projected on each direction and sorted: (directions, n)."""
    return torch.sort((proj.T @ x.to(torch.float64).T).contiguous(), dim=1).values


def sliced_w2(px: torch.Tensor, py: torch.Tensor) -> float:
    """Sliced W2 between two equal-size samples given by their :func:`sorted_projections`.

    In 1-D the optimal coupling of two equal-size samples pairs them in sorted order, so W2^2
    is the mean squared difference of the sorted values; the sliced distance is the square
    root of its mean over the directions.
    """
    return float(((px - py) ** 2).mean().sqrt())


def exact_ode(mix: GaussianMixture, x_T: torch.Tensor, abar_T: float, steps: int) -> torch.Tensor:
    """The probability-flow ODE from x_T at noise level abar_T to (almost) clean data.

    A continuous-time grid: ``steps`` levels uniform in log-SNR from abar_T to sigma = 1e-4,
    wrapped as a Diffusion so our 3M solver visits every level (steps = T).
    """
    lam = torch.linspace(math.log(abar_T / (1.0 - abar_T)), 2.0 * math.log(1e4), steps, dtype=torch.float64).flip(0)
    abar = torch.sigmoid(lam)  # log-SNR -> alpha_bar, t = 0 is the cleanest level
    betas = 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    fine = Diffusion(DiffusionConfig(timesteps=steps, prediction="x0"), betas=betas)
    return S.dpmpp(mix.model(fine), fine, x_T, steps=steps, order=3, spacing="logsnr")


# --- samplers under test ----------------------------------------------------------------
Runner = Callable[[Callable, Diffusion, torch.Tensor, int, torch.Generator], torch.Tensor]


def ours(name: str, **opts) -> Runner:
    def run(model, diffusion, x_T, nfe, gen):
        return S.sample(model, diffusion, x_T, sampler=name, steps=nfe, generator=gen, **opts)

    return run


# diffusers' own names for our schedules (same formulas); anything else goes in as trained_betas.
# The native name matters: for "squaredcos_cap_v2" diffusers keeps the Karras / Lu timesteps
# unrounded, and with rounded ones those grids repeat timesteps on cosine and its solvers crash.
DIFFUSERS_SCHEDULES = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def diffusers_scheduler(kind: str, diffusion: Diffusion, **config):
    """A diffusers scheduler on the same beta schedule as ``diffusion``."""
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler,
           "unipc": diffusers.UniPCMultistepScheduler}[kind]  # fmt: skip
    extra = {"clip_sample": False, "set_alpha_to_one": True} if kind == "ddim" else {}
    c = diffusion.config
    native = DIFFUSERS_SCHEDULES.get(c.schedule) if not c.zero_terminal_snr else None
    betas = {"beta_schedule": native, "beta_start": c.beta_start, "beta_end": c.beta_end} if native else \
        {"trained_betas": diffusion.betas.numpy()}  # fmt: skip
    sched = cls(num_train_timesteps=diffusion.num_timesteps, prediction_type="epsilon", **betas, **extra, **config)
    ours_abar = diffusion.alphas_cumprod.to(torch.float32)
    assert torch.allclose(sched.alphas_cumprod, ours_abar, rtol=1e-4, atol=1e-7), f"diffusers {native} != ours"
    return sched


def diffusers_runner(kind: str, **config) -> Runner:
    def run(model, diffusion, x_T, nfe, gen):
        sched = diffusers_scheduler(kind, diffusion, **config)
        sched.set_timesteps(nfe)
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            t_vec = torch.full((x.shape[0],), int(t), dtype=torch.int64)
            out = model(sched.scale_model_input(x, t), t_vec)
            x = sched.step(out, t, x).prev_sample  # deterministic: DDIM with eta = 0, DPM-Solver++, UniPC
        return x

    return run


def our_configs(variants: bool) -> dict[str, Runner]:
    c = {
        DEFAULT_LABEL: ours("dpmpp"),
        "ours ddim (defaults)": ours("ddim"),
        "ours ddpm (defaults)": ours("ddpm"),
        "ours dpmpp, clip=none": ours("dpmpp", clip_x0="none"),  # the data are in [-1, 1]: clipping must not matter
    }
    if variants:
        c["ours ddpm variance=posterior"] = ours("ddpm", variance="posterior")
        for sp in S.SPACINGS:
            for order in (2, 3):
                c[f"ours dpmpp {order}M {sp}"] = ours("dpmpp", order=order, spacing=sp)
            c[f"ours ddim {sp}"] = ours("ddim", spacing=sp)
            c[f"ours ddpm {sp}"] = ours("ddpm", spacing=sp)
    return c


def diffusers_configs(quick: bool) -> dict[str, Runner]:
    c = {"diffusers DDIM trailing": diffusers_runner("ddim", timestep_spacing="trailing")}
    for order in (2, 3):
        c[f"diffusers DPM++ {order}M trailing"] = diffusers_runner(
            "dpm", solver_order=order, timestep_spacing="trailing"
        )
        c[f"diffusers DPM++ {order}M karras"] = diffusers_runner("dpm", solver_order=order, use_karras_sigmas=True)
        c[f"diffusers DPM++ {order}M lu"] = diffusers_runner("dpm", solver_order=order, use_lu_lambdas=True)
    c["diffusers UniPC-3 trailing"] = diffusers_runner("unipc", solver_order=3, timestep_spacing="trailing")
    c["diffusers UniPC-3 karras"] = diffusers_runner("unipc", solver_order=3, use_karras_sigmas=True)
    if quick:
        c = {k: v for k, v in c.items() if k in ("diffusers DDIM trailing", "diffusers DPM++ 2M lu")}
    return c


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


# --- the run ------------------------------------------------------------------------------
def run_benchmark(
    n: int,
    nfes: list[int],
    schedules: list[str],
    variants: bool = False,
    quick: bool = False,
    n_proj: int = 128,
    seed: int = 0,
    ode_steps: int = 1000,
    log=print,
) -> dict:
    """SW2 to exact samples and to the exact ODE solution per (config, schedule, nfe), plus the floor."""
    mix = mixture()
    proj = projections(n_proj)
    exact = sorted_projections(mix.sample(n, torch.Generator().manual_seed(seed + 1)), proj)
    pairs = 2 if quick else FLOOR_PAIRS
    floors = [
        sliced_w2(exact, sorted_projections(mix.sample(n, torch.Generator().manual_seed(seed + 100 + j)), proj))
        for j in range(pairs)
    ]
    configs = our_configs(variants)
    if have_diffusers():
        configs.update(diffusers_configs(quick))
    res: dict = {"floors": floors, "sw2": {}, "ode": {}, "failed": {}, "ref": {}, "n": n, "nfes": nfes,
                 "schedules": schedules, "configs": list(configs)}  # fmt: skip
    log(f"floor: mean {sum(floors) / len(floors):.5f} over {pairs} pairs ({min(floors):.5f}..{max(floors):.5f})")
    for schedule in schedules:
        diffusion = Diffusion(DiffusionConfig(schedule=schedule, timesteps=1000))
        model = mix.model(diffusion, "eps")  # the same exact model for everyone
        x_T = S.noise_like((n, 2), torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
        t0 = time.perf_counter()
        ref = sorted_projections(exact_ode(mix, x_T, float(diffusion.alphas_cumprod[-1]), ode_steps), proj)
        res["ref"][schedule] = sliced_w2(ref, exact)
        log(f"  {schedule:9s} exact ODE from x_T: sw2={res['ref'][schedule]:.5f} ({time.perf_counter() - t0:.1f}s)")
        for name, runner in configs.items():
            for nfe in nfes:
                calls = []

                def counted(x, t, model=model, calls=calls):
                    calls.append(1)
                    return model(x, t)

                t0 = time.perf_counter()
                try:
                    out = runner(counted, diffusion, x_T, nfe, torch.Generator().manual_seed(seed + 4))
                except Exception as err:  # a scheduler that crashes is a result too
                    res["failed"][(name, schedule, nfe)] = f"{type(err).__name__}: {err}"
                    log(f"  {schedule:9s} {name:30s} nfe={nfe:3d} FAILED {type(err).__name__}: {err}")
                    continue
                assert len(calls) == nfe, f"{name}: {len(calls)} model calls for {nfe} NFE"
                finite = bool(torch.isfinite(out).all())
                out = sorted_projections(out, proj)
                res["sw2"][(name, schedule, nfe)] = sliced_w2(out, exact) if finite else math.nan
                res["ode"][(name, schedule, nfe)] = sliced_w2(out, ref) if finite else math.nan
                log(f"  {schedule:9s} {name:30s} nfe={nfe:3d} sw2={res['sw2'][(name, schedule, nfe)]:.5f} "
                    f"solver={res['ode'][(name, schedule, nfe)]:.5f} ({time.perf_counter() - t0:.1f}s)")  # fmt: skip
    return res


def _fmt(v: float | None) -> str:
    return "failed" if v is None else ("nan" if math.isnan(v) else f"{v:.4f}")


def summarize(res: dict) -> tuple[str, list[str], bool]:
    """Two markdown tables, the verdict lines and whether every target holds."""
    nfes, schedules = res["nfes"], res["schedules"]
    floors = res["floors"]
    floor = sum(floors) / len(floors)
    cols = [(s, k) for s in schedules for k in nfes]
    head = "| sampler | " + " | ".join(f"{s} {k}" for s, k in cols) + " |"
    sep = "|" + "---|" * (1 + len(cols))
    t1 = [head, sep, f"| floor: two exact sets, mean of {len(floors)} ({min(floors):.4f}..{max(floors):.4f}) | "
          + " | ".join(f"{floor:.4f}" for _ in cols) + " |",
          "| exact ODE from the same x_T | " + " | ".join(f"{res['ref'][s]:.4f}" for s, _ in cols) + " |"]  # fmt: skip
    t2 = [head, sep]
    for name in res["configs"]:
        t1.append(f"| {name} | " + " | ".join(_fmt(res["sw2"].get((name, s, k))) for s, k in cols) + " |")
        t2.append(f"| {name} | " + " | ".join(_fmt(res["ode"].get((name, s, k))) for s, k in cols) + " |")
    lines, ok = [], True
    for s in schedules:
        k = nfes[0]
        diff = {name: res["sw2"][(name, s, k)] for name in res["configs"]
                if name.startswith("diffusers") and math.isfinite(res["sw2"].get((name, s, k), math.nan))}  # fmt: skip
        ours_v, ours_e = res["sw2"][(DEFAULT_LABEL, s, k)], res["ode"][(DEFAULT_LABEL, s, k)]
        if diff:
            best = min(diff, key=diff.get)
            ratio = ours_v / diff[best]
            ratio_e = ours_e / res["ode"][(best, s, k)]
            good = ratio <= TARGET_RATIO_10
            ok &= good
            lines.append(f"{s}, {k} NFE: ours {ours_v:.4f} vs best diffusers {diff[best]:.4f} ({best}): "
                         f"{ratio:.2f}x (target <= {TARGET_RATIO_10}: {'met' if good else 'MISSED'}); "
                         f"solver error {ours_e:.4f} vs {res['ode'][(best, s, k)]:.4f}: {ratio_e:.2f}x")  # fmt: skip
        if len(nfes) > 1:
            k = nfes[1]
            v, e = res["sw2"][(DEFAULT_LABEL, s, k)], res["ode"][(DEFAULT_LABEL, s, k)]
            good = e <= floor
            ok &= good
            best20 = min((res["sw2"][(n_, s, k)] for n_ in res["configs"] if n_.startswith("diffusers")
                          and math.isfinite(res["sw2"].get((n_, s, k), math.nan))), default=math.nan)  # fmt: skip
            lines.append(f"{s}, {k} NFE: ours {v:.4f} (exact ODE {res['ref'][s]:.4f}, best diffusers {best20:.4f}); "
                         f"solver error {e:.4f} vs floor {floor:.4f}: {e / floor:.2f}x "
                         f"(target <= 1: {'met' if good else 'MISSED'})")  # fmt: skip
    for (name, s, k), msg in res["failed"].items():
        lines.append(f"{name} failed on {s} at {k} NFE: {msg.splitlines()[0][:120]}")
    return (
        "\n".join(t1) + "\n\nSolver error (SW2 to the exact ODE solution from the same x_T):\n\n" + "\n".join(t2),
        lines,
        ok,
    )


def write_markdown(path: Path, tables: str, lines: list[str], command: str, n: int, elapsed: float) -> None:
    import diffusers

    section = "\n".join([
        MARK_START,
        "## Sampler accuracy (`benchmarks/samplers.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu_name()}, {os.cpu_count()} CPUs, "
        f"{platform.system()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}; {elapsed:.0f} s",
        f"- data: 2-D Gaussian mixture (7 components) with an exact eps predictor; T = 1000; {n} samples per cell; "
        "x_T ~ N(0, I) shared by every sampler. Columns: schedule and number of model evaluations (NFE).",
        "- SW2: sliced W2 over 128 fixed random directions to exact samples (lower is better; a perfect sampler "
        "scores about the floor, and the exact ODE row is what a perfect deterministic sampler scores from this "
        "x_T). Solver error: SW2 to that exact ODE solution; no sampling noise.",
        "- the defaults were chosen with `python -m benchmarks.samplers --variants --schedules linear quadratic "
        "cosine sigmoid` and on trained networks (the next section); see \"Sampler tuning notes\" below.",
        "",
        tables,
        "",
        *[f"- {line}" for line in lines],
        MARK_END,
    ])  # fmt: skip
    replace_section(path, section, MARK_START, MARK_END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "analytic", "trained"], default="all",
                   help="the analytic solver-error tables, the trained-network tables, or both (default)")  # fmt: skip
    p.add_argument("--n", type=int, default=50_000, help="samples per cell (default 50000)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="model evaluations (default 10 20 50)")
    p.add_argument(
        "--schedules", nargs="+", default=["linear", "cosine"], choices=["linear", "quadratic", "cosine", "sigmoid"]
    )
    p.add_argument("--variants", action="store_true", help="also run our non-default spacings, orders and clippings")
    p.add_argument(
        "--models", nargs="+", default=["digits16-eps", "digits16-v"], help="trained models (see _trained.py)"
    )
    p.add_argument("--trained-n", type=int, default=250, help="samples per trained-network row (default 250)")
    p.add_argument("--quick", action="store_true", help="seconds: 2000 samples, 10 NFE, linear, two diffusers configs; "
                   "a tiny 8x8 model trained for a few steps, 32 samples")  # fmt: skip
    p.add_argument("--markdown", type=Path, help="write/replace the samplers sections of this markdown file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the tensors are small, so more threads mostly add overhead)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ode_steps = 1000
    if args.quick:
        args.n, args.nfe, args.schedules, ode_steps = 2000, [10], ["linear"], 200
    if not have_diffusers():
        print("diffusers is not installed: only our samplers run (pip install diffusers)")
    command = "python -m benchmarks.samplers " + " ".join(argv if argv is not None else sys.argv[1:])
    ok = True
    if args.part in ("all", "analytic"):
        t0 = time.perf_counter()
        res = run_benchmark(
            args.n, args.nfe, args.schedules, args.variants, args.quick, seed=args.seed, ode_steps=ode_steps
        )
        elapsed = time.perf_counter() - t0
        tables, lines, ok = summarize(res)
        print()
        print(tables)
        print()
        print("\n".join(lines))
        if args.markdown:
            write_markdown(args.markdown, tables, lines, command.strip(), args.n, elapsed)
            print(f"wrote {args.markdown}")
    if args.part in ("all", "trained"):
        from . import _samplers_trained as TR

        t0 = time.perf_counter()
        res_t = TR.run_all(args.models, args.trained_n, variants=args.variants, quick=args.quick)
        table, lines_t, ok_t = TR.summarize(res_t)
        ok &= ok_t
        print()
        print(table)
        print()
        print("\n".join(lines_t))
        if args.markdown:
            section = TR.markdown(table, lines_t, command.strip(), time.perf_counter() - t0, args.trained_n, args.quick)
            replace_section(args.markdown, f"{TRAINED_START}\n{section}\n{TRAINED_END}", TRAINED_START, TRAINED_END)
            print(f"wrote {args.markdown}")
    if args.quick:
        return 0  # too few samples to judge the targets
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
