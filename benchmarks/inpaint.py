"""Inpainting held-out digits (issue #21): RePaint settings, no resampling, and diffusers' RePaintPipeline.

The model (``digits16-eps-half`` of ``_trained.py``) is trained on the even-indexed built-in digits only;
the odd-indexed ones, which it never saw, are masked (the lower half, or a random half of the pixels)
and inpainted. The judge is ``_digits_quality``'s classifier (trained on the even half too): how often
it reads the inpainted digit as the original digit, against the masked input (the hole left black,
the background) and the unmasked original, and the Frechet distance of its features to real digits.

diffusers' ``RePaintPipeline`` runs on the same network, exported with ``diffuse export``, with the
same mask, steps, jump length and resamplings. Timing: both sides on the same batch, interleaved, one
thread each, under ``flock /tmp/diffuse-timing.lock`` on a shared machine, so the ratio is the claim.

    python -m benchmarks.inpaint --num 100 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffuse_cli.engine import editing, models
from diffuse_cli.engine.data import from_model_range, to_model_range
from diffuse_cli.engine.generate import image_generators
from diffuse_cli.engine.samplers import noise_like

from ._common import cpu_name, replace_section
from ._digits_quality import digits, score
from ._trained import SPECS, cache_dir, trained_model

MODEL = "digits16-eps-half"
MASKS = ("lower-half", "random-50%")
# (steps, jump length j, resamplings r): r = 1 is plain replacement; 250 x 1 costs what 50 x 5 x 5 costs
SETTINGS = [(50, 1, 1), (250, 1, 1), (50, 5, 5)]
START, END = "<!-- inpaint:start -->", "<!-- inpaint:end -->"


def keep_mask(kind: str, n: int, size: int) -> torch.Tensor:
    """(n, 1, S, S) bool, True = known pixel."""
    if kind == "lower-half":
        keep = torch.ones(n, 1, size, size, dtype=torch.bool)
        keep[..., size // 2 :, :] = False
        return keep
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(21)) >= 0.5


def ours(model, diffusion, x0, keep, steps, jump, r, seed=0, **kw) -> torch.Tensor:
    gens = image_generators(seed, 0, x0.shape[0], "cpu")
    x_T = noise_like(x0.shape, gens)
    out = editing.repaint(model, diffusion, x0, keep, x_T, steps=steps, jump_length=jump, resamplings=r,
                          generator=gens, **kw)  # fmt: skip
    return from_model_range(out)


def theirs(pipe, x0, keep, steps, jump, r, eta, seed=0) -> torch.Tensor:
    out = pipe(image=x0, mask_image=keep.float(), num_inference_steps=steps, eta=eta, jump_length=jump,
               jump_n_sample=r, generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip
    return torch.from_numpy(out).permute(0, 3, 1, 2).mul(255).round().clamp(0, 255).to(torch.uint8)


def diffusers_pipe(ck_path: Path, folder: Path):
    from diffusers import RePaintPipeline, RePaintScheduler, UNet2DModel

    models.export(ck_path, folder, overwrite=True)
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = RePaintScheduler.from_config(RePaintScheduler.load_config(folder / "scheduler"))
    pipe = RePaintPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def row(name: str, u8: torch.Tensor, labels: torch.Tensor, calls, x0=None, keep=None) -> dict:
    s = score(u8, labels)
    exact = float("nan")
    if keep is not None:  # share of the known pixels returned exactly (8-bit)
        k = keep.expand_as(u8)
        exact = float((u8[k] == from_model_range(x0)[k]).float().mean())
    return {"name": name, "accuracy": s["accuracy"], "fd": s["fd"], "confident": s["confident"], "calls": calls,
            "exact": exact}  # fmt: skip


def quality(model, diffusion, pipe, x0, labels, n, log, masks=MASKS) -> list[dict]:
    rows = []
    for kind in masks:
        keep = keep_mask(kind, n, x0.shape[-1])
        log(f"[{kind}]")
        rows.append({**row("original (not masked)", from_model_range(x0), labels, 0), "mask": kind})
        holed = torch.where(keep, x0, torch.full_like(x0, -1.0))
        rows.append({**row("masked input (hole black)", from_model_range(holed), labels, 0), "mask": kind})
        for steps, j, r in SETTINGS:
            t = time.perf_counter()
            u8 = ours(model, diffusion, x0, keep, steps, j, r)
            name = f"ours {steps} steps, j {j}, r {r}" + (" (no resampling)" if r == 1 else "")
            rows.append({**row(name, u8, labels, editing.repaint_calls(steps, j, r), x0, keep), "mask": kind})
            log(f"  {name}: acc {rows[-1]['accuracy']:.3f} FD {rows[-1]['fd']:.1f} ({time.perf_counter() - t:.0f} s)")
        if pipe is not None:
            s, j, r = editing.DEFAULT_REPAINT_STEPS, editing.DEFAULT_JUMP_LENGTH, editing.DEFAULT_RESAMPLINGS
            for eta in (1.0,):  # eta 1: DDPM's ancestral step, as RePaint (the pipeline's default 0 is DDIM's)
                t = time.perf_counter()
                u8 = theirs(pipe, x0, keep, s, j, r, eta)
                name = f"diffusers RePaintPipeline {s} steps, j {j}, r {r}, eta {eta:g}"
                rows.append({**row(name, u8, labels, editing.repaint_calls(s, j, r), x0, keep), "mask": kind})
                log(
                    f"  {name}: acc {rows[-1]['accuracy']:.3f} FD {rows[-1]['fd']:.1f} ({time.perf_counter() - t:.0f} s)"
                )
    return rows


def timing(model, diffusion, pipe, x0, rounds: int, log) -> dict:
    """Seconds per image, ours (defaults) and diffusers (same settings, eta 1), interleaved; the median of rounds."""
    keep = keep_mask("lower-half", x0.shape[0], x0.shape[-1])
    s, j, r = editing.DEFAULT_REPAINT_STEPS, editing.DEFAULT_JUMP_LENGTH, editing.DEFAULT_RESAMPLINGS
    times = {"ours": [], "diffusers": []}
    for _ in range(rounds):
        for side in ("ours", "diffusers"):
            t = time.perf_counter()
            if side == "ours":
                ours(model, diffusion, x0, keep, s, j, r)
            else:
                theirs(pipe, x0, keep, s, j, r, 1.0)
            times[side].append((time.perf_counter() - t) / x0.shape[0])
            log(f"  {side}: {times[side][-1] * 1e3:.1f} ms/image")
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def write_markdown(
    path: Path, rows: list[dict], times: dict | None, command: str, n: int, batch: int, rounds: int
) -> None:
    lines = [
        START,
        "## Inpainting held-out digits (`benchmarks/inpaint.py`, issue #21)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today()}; CPU: {cpu_name()}, 2 cores shared with other engineers' jobs "
        f"(quality numbers do not depend on load; times are ratios); torch {torch.__version__}, Python "
        f"{platform.python_version()}; one thread",
        f"- model: `{MODEL}` of `benchmarks/_trained.py`: the 16x16 digits U-Net of issue #16 (eps, linear, T = 1000)"
        f" trained {SPECS[MODEL].steps} steps on the even-indexed digits only; the images are the first {n} "
        "odd-indexed (held-out) digits",
        "- judge: `_digits_quality`'s classifier (trained on the even half): accuracy = share read as the original "
        "digit; FD = Frechet distance of its features to the held-out digits (lower is better)",
        "- masks: the lower half of the image, or a random half of the pixels (fixed); the hole of the masked input "
        "is left black (the background); every inpainted result keeps the known pixels exactly",
        "",
        "| mask | method | model calls / image | accuracy | FD | confident | known pixels kept exactly |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['name']} | {r['calls']} | {r['accuracy']:.1%} | {r['fd']:.1f} | "
                     f"{r['confident']:.0%} | {'' if r['exact'] != r['exact'] else format(r['exact'], '.1%')} |")  # fmt: skip
    if times:
        ratio = times["diffusers"] / times["ours"]
        lines += [
            "",
            f"Time per image, lower-half mask, the defaults ({editing.DEFAULT_REPAINT_STEPS} steps, j "
            f"{editing.DEFAULT_JUMP_LENGTH}, r {editing.DEFAULT_RESAMPLINGS}) on both sides, a batch of {batch}, "
            f"interleaved, median of {rounds} rounds, `torch.set_num_threads(1)`, under "
            "`flock /tmp/diffuse-timing.lock`:",
            "",
            f"- ours: {times['ours'] * 1e3:.1f} ms/image; diffusers RePaintPipeline: {times['diffusers'] * 1e3:.1f} "
            f"ms/image; diffusers / ours = {ratio:.2f}",
        ]
    lines.append(END)
    replace_section(path, "\n".join(lines) + "\n", START, END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=100, help="held-out digits to inpaint per mask")
    p.add_argument("--time-batch", type=int, default=16, help="images in the timed batch")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--masks", nargs="*", default=list(MASKS), choices=MASKS, help="none: timing only")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (each: ours, then diffusers)")
    p.add_argument("--model", default=MODEL, choices=sorted(SPECS), help="a model of _trained.py")
    p.add_argument("--markdown", type=Path, help="write/replace the inpainting section of this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, diffusion, ck = trained_model(SPECS[args.model])
    images, labels = digits(16, "heldout")
    x0, labels = to_model_range(images[: args.num]), labels[: args.num]
    pipe = None
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        if not args.no_diffusers:
            pipe = diffusers_pipe(ck.path, Path(tmp) / "export")
        with torch.no_grad():
            rows = quality(model, diffusion, pipe, x0, labels, args.num, print, args.masks)
            times = None
            if pipe is not None and args.rounds > 0:
                times = timing(model, diffusion, pipe, x0[: args.time_batch], args.rounds, print)
    for r in rows:
        print(r)
    print(times)
    (cache_dir() / "inpaint-last.json").write_text(json.dumps({"rows": rows, "times": times}))
    if args.markdown:
        command = "flock /tmp/diffuse-timing.lock python -m benchmarks.inpaint " + " ".join(argv or sys.argv[1:])
        write_markdown(args.markdown, rows, times, command, args.num, args.time_batch, args.rounds)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
