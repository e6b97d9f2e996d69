"""Sampler accuracy: sliced Wasserstein-2 to exact samples of a 2-D Gaussian mixture.

The data is a 2-D Gaussian mixture whose noise predictor is exact (closed form, see
``diffuse_cli.engine.analytic``), so the only error left is the sampler's. Each sampler
(ours and diffusers' schedulers, driven by the same model from the same x_T ~ N(0, I)) draws
N points with 10, 20 and 50 model evaluations; the metric is the sliced W2 distance to N
exact data samples over a fixed set of random directions (sort-based 1-D W2). The floor is
the same distance between two independent exact sample sets: a perfect sampler scores
about the floor.

    python benchmarks/samplers.py                     # full run, prints the table
    python benchmarks/samplers.py --quick             # seconds: smoke test
    python benchmarks/samplers.py --markdown benchmarks/RESULTS.md
    python benchmarks/samplers.py --variants --schedules linear quadratic cosine sigmoid   # tuning view
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffuse_cli.engine import samplers as S  # noqa: E402
from diffuse_cli.engine.analytic import GaussianMixture  # noqa: E402
from diffuse_cli.engine.diffusion import Diffusion, DiffusionConfig  # noqa: E402

MARK_START, MARK_END = "<!-- samplers:start -->", "<!-- samplers:end -->"
TARGET_RATIO_10 = 0.8  # our defaults at 10 NFE: at most 0.8x the best diffusers configuration
FLOOR_SLACK = 1.1  # "within the noise floor": SW2 <= 1.1 x floor


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


def sliced_w2(x: torch.Tensor, y: torch.Tensor, proj: torch.Tensor) -> float:
    """sqrt(mean over directions of W2^2 between the 1-D projections); equal sample sizes."""
    px = torch.sort(x.to(torch.float64) @ proj, dim=0).values
    py = torch.sort(y.to(torch.float64) @ proj, dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


# --- samplers under test ----------------------------------------------------------------
Runner = Callable[[Callable, Diffusion, torch.Tensor, int, torch.Generator], torch.Tensor]


def ours(name: str, **opts) -> Runner:
    def run(model, diffusion, x_T, nfe, gen):
        return S.sample(model, diffusion, x_T, sampler=name, steps=nfe, generator=gen, **opts)

    return run


def diffusers_runner(kind: str, **config) -> Runner:
    def run(model, diffusion, x_T, nfe, gen):
        import diffusers

        cls = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler,
               "unipc": diffusers.UniPCMultistepScheduler}[kind]  # fmt: skip
        extra = {"clip_sample": False, "set_alpha_to_one": True} if kind == "ddim" else {}
        sched = cls(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas.numpy(),
                    prediction_type="epsilon", **extra, **config)  # fmt: skip
        sched.set_timesteps(nfe)
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            t_vec = torch.full((x.shape[0],), int(t), dtype=torch.int64)
            out = model(sched.scale_model_input(x, t), t_vec)
            x = sched.step(out, t, x).prev_sample
        assert len(sched.timesteps) == nfe
        return x

    return run


def our_defaults() -> dict[str, Runner]:
    return {
        "ours ddpm": ours("ddpm"),
        "ours ddim": ours("ddim"),
        f"ours dpmpp (2M, {S.DEFAULT_SPACING['dpmpp']})": ours("dpmpp"),
    }


def our_variants() -> dict[str, Runner]:
    v = {}
    v["ours ddpm variance=beta"] = ours("ddpm", variance="beta")
    for sp in S.SPACINGS:
        v[f"ours ddpm {sp}"] = ours("ddpm", spacing=sp)
        v[f"ours ddim {sp}"] = ours("ddim", spacing=sp)
        for order in (2, 3):
            v[f"ours dpmpp {order}M {sp}"] = ours("dpmpp", order=order, spacing=sp)
    return v


def diffusers_configs() -> dict[str, Runner]:
    c = {"diffusers DDIM trailing": diffusers_runner("ddim", timestep_spacing="trailing")}
    for order in (2, 3):
        c[f"diffusers DPM++ {order}M trailing"] = diffusers_runner("dpm", solver_order=order, timestep_spacing="trailing")
        c[f"diffusers DPM++ {order}M karras"] = diffusers_runner("dpm", solver_order=order, use_karras_sigmas=True)
        c[f"diffusers DPM++ {order}M lu"] = diffusers_runner("dpm", solver_order=order, use_lu_lambdas=True)
    c["diffusers UniPC-3 trailing"] = diffusers_runner("unipc", solver_order=3, timestep_spacing="trailing")
    c["diffusers UniPC-3 karras"] = diffusers_runner("unipc", solver_order=3, use_karras_sigmas=True)
    return c


def have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


# --- the run ------------------------------------------------------------------------------
def run_benchmark(n: int, nfes: list[int], schedules: list[str], variants: bool, n_proj: int = 128,
                  seed: int = 0, log=print) -> dict:
    """SW2 per (config, schedule, nfe), plus the floor per schedule."""
    mix = mixture()
    proj = projections(n_proj)
    exact = mix.sample(n, torch.Generator().manual_seed(seed + 1))
    floor = sliced_w2(exact, mix.sample(n, torch.Generator().manual_seed(seed + 2)), proj)
    configs = {**our_defaults(), **(our_variants() if variants else {})}
    if have_diffusers():
        configs.update(diffusers_configs())
    results: dict = {"floor": floor, "sw2": {}, "n": n, "nfes": nfes, "schedules": schedules, "configs": list(configs)}
    for schedule in schedules:
        diffusion = Diffusion(DiffusionConfig(schedule=schedule, timesteps=1000))
        model = mix.model(diffusion, "eps")  # the same exact model for everyone
        x_T = S.noise_like((n, 2), torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
        for name, runner in configs.items():
            for nfe in nfes:
                calls = 0

                def counted(x, t):
                    nonlocal calls
                    calls += 1
                    return model(x, t)

                t0 = time.perf_counter()
                out = runner(counted, diffusion, x_T, nfe, torch.Generator().manual_seed(seed + 4))
                assert calls == nfe, f"{name}: {calls} model calls for {nfe} NFE"
                val = sliced_w2(out, exact, proj) if torch.isfinite(out).all() else float("nan")
                results["sw2"][(name, schedule, nfe)] = val
                log(f"  {schedule:9s} {name:34s} nfe={nfe:3d} sw2={val:.5f} ({time.perf_counter() - t0:.1f}s)")
    return results


def summarize(results: dict) -> tuple[str, list[str], bool]:
    """The table (markdown), the verdict lines and whether every target holds."""
    nfes, schedules, sw2, floor = results["nfes"], results["schedules"], results["sw2"], results["floor"]
    head = "| sampler | " + " | ".join(f"{s} {k}" for s in schedules for k in nfes) + " |"
    rows = [head, "|" + "---|" * (1 + len(schedules) * len(nfes))]
    rows.append("| floor (two exact sets) | " + " | ".join(f"{floor:.4f}" for _ in schedules for _ in nfes) + " |")
    for name in results["configs"]:
        cells = [sw2.get((name, s, k), float("nan")) for s in schedules for k in nfes]
        rows.append(f"| {name} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    default = next(name for name in results["configs"] if name.startswith("ours dpmpp ("))
    lines, ok = [], True
    for s in schedules:
        diff = {name: sw2[(name, s, k)] for name in results["configs"] for k in nfes if name.startswith("diffusers")
                and k == nfes[0]}  # fmt: skip
        if diff:
            best_name = min(diff, key=lambda k: diff[k] if math.isfinite(diff[k]) else math.inf)
            ratio = sw2[(default, s, nfes[0])] / diff[best_name]
            good = ratio <= TARGET_RATIO_10
            ok &= good
            lines.append(f"{s}: {nfes[0]} NFE: ours {sw2[(default, s, nfes[0])]:.4f} / best diffusers "
                         f"{diff[best_name]:.4f} ({best_name}) = {ratio:.2f}x "
                         f"(target <= {TARGET_RATIO_10}) {'OK' if good else 'MISSED'}")  # fmt: skip
        if len(nfes) > 1:
            k = nfes[1]
            val = sw2[(default, s, k)]
            good = val <= FLOOR_SLACK * floor
            ok &= good
            best20 = [sw2[(n_, s, k)] for n_ in results["configs"] if n_.startswith("diffusers")]
            extra = f"; best diffusers {min(best20):.4f}" if best20 else ""
            lines.append(f"{s}: {k} NFE: ours {val:.4f} = {val / floor:.2f}x floor {floor:.4f} "
                         f"(target <= {FLOOR_SLACK}x){extra} {'OK' if good else 'MISSED'}")  # fmt: skip
    return "\n".join(rows), lines, ok


def write_markdown(path: Path, table: str, lines: list[str], command: str, n: int, elapsed: float) -> None:
    import diffusers

    section = "\n".join([
        MARK_START,
        "## Sampler accuracy (`benchmarks/samplers.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} CPUs, {platform.system()}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
        f"{elapsed:.0f} s",
        f"- 2-D Gaussian mixture (7 components) with an exact eps predictor; T = 1000; {n} samples per cell; "
        "x_T ~ N(0, I) shared by all samplers; metric: sliced W2 over 128 fixed random directions to "
        f"{n} exact samples (lower is better; the floor is the distance between two exact sample sets).",
        "- columns: schedule and number of model evaluations (NFE).",
        "",
        table,
        "",
        *[f"- {line}" for line in lines],
        MARK_END,
    ])  # fmt: skip
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if MARK_START in old and MARK_END in old:
        pre, rest = old.split(MARK_START, 1)
        post = rest.split(MARK_END, 1)[1]
        new = pre + section + post
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="samples per cell (default 50000)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50], help="model evaluations (default 10 20 50)")
    p.add_argument("--schedules", nargs="+", default=["linear", "cosine"])
    p.add_argument("--variants", action="store_true", help="also run our non-default spacings and orders")
    p.add_argument("--quick", action="store_true", help="a few seconds: 2000 samples, 10 NFE, linear only")
    p.add_argument("--markdown", type=Path, help="write/replace the samplers section of this markdown file")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.nfe, args.schedules = 2000, [10, 20], ["linear"]
    if not have_diffusers():
        print("diffusers is not installed: only our samplers run (pip install diffusers)")
    t0 = time.perf_counter()
    results = run_benchmark(args.n, args.nfe, args.schedules, args.variants)
    elapsed = time.perf_counter() - t0
    table, lines, ok = summarize(results)
    print()
    print(table)
    print()
    print("\n".join(lines))
    if args.markdown:
        command = "python benchmarks/samplers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_markdown(args.markdown, table, lines, command.strip(), args.n, elapsed)
        print(f"wrote {args.markdown}")
    if args.quick:
        return 0  # too few samples to judge the targets
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
