"""CPU sampling speed: `diffuse sample` against diffusers' DDIMPipeline on the same exported model (issue 25).

The model (a run folder or model file of ``diffuse train``) is exported with ``diffuse export``'s engine
call, and diffusers' ``DDIMPipeline`` is built from that folder (its UNet2DModel and a DDIMScheduler from
the exported scheduler config). Both draw ``--num`` images in batches of ``--batch`` with DDIM, 50 steps
(eta 0); ours also with bf16 autocast and with its default sampler (DPM-Solver++, 20 steps). Rounds
alternate between the variants, so a change in the machine's load hits all alike; the median round's
img/s is reported. With ``--score`` (a model trained on the built-in digits) each variant's images are
also scored by the digit judge (``_digits_quality.score``): bf16 must keep the quality, not just the speed.

    python -m benchmarks.sample_cpu RUN --num 64 --rounds 3
    python -m benchmarks.sample_cpu RUN --score --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffuse_cli.engine import models
from diffuse_cli.engine.data import from_model_range
from diffuse_cli.engine.generate import generate

from ._common import cpu_name, diffusers_version, replace_section

MARK_START, MARK_END = "<!-- sample_cpu:start -->", "<!-- sample_cpu:end -->"


def variants(run: Path, folder: Path, batch: int) -> dict:
    """name -> fn(num, seed) returning uint8 images (N, C, H, W)."""
    import diffusers

    model, diffusion, _ = models.load_for_sampling(run, "cpu")
    shape = (model.config.in_channels, *model.config.hw)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)

    def ours(sampler: str, steps: int, amp):
        return lambda num, seed: from_model_range(generate(
            model, diffusion, num, shape, sampler=sampler, steps=steps, seed=seed, batch_size=batch, amp=amp))  # fmt: skip

    def theirs(num: int, seed: int) -> torch.Tensor:
        out = []
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for start in range(0, num, batch):
                b = min(batch, num - start)
                x = pipe(batch_size=b, generator=gen, num_inference_steps=50, eta=0.0, output_type="np").images
                out.append(torch.from_numpy(x).permute(0, 3, 1, 2))
        return (torch.cat(out) * 255).round().clamp(0, 255).to(torch.uint8)

    return {
        "diffusers DDIMPipeline, 50 steps, fp32": theirs,
        "diffuse ddim, 50 steps, fp32": ours("ddim", 50, None),
        "diffuse ddim, 50 steps, bf16 autocast": ours("ddim", 50, torch.bfloat16),
        "diffuse dpmpp (default), 20 steps, fp32": ours("dpmpp", 20, None),
        "diffuse dpmpp (default), 20 steps, bf16 autocast": ours("dpmpp", 20, torch.bfloat16),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a diffuse run folder or model file")
    p.add_argument("--num", type=int, default=64, help="images per variant per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--score", action="store_true", help="score the images with the digit judge (digits models)")
    p.add_argument("--markdown", type=Path)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if diffusers_version() is None:
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        models.export(a.run, Path(tmp) / "pipe")
        fns = variants(a.run, Path(tmp) / "pipe", a.batch)
        for fn in fns.values():
            fn(min(a.batch, 4), 0)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in fns}
        images: dict[str, torch.Tensor] = {}
        for r in range(a.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                images[name] = fn(a.num, r)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(fns))])
    rows = ["| variant | img/s | vs diffusers |" + (" FD (digit judge) | confident |" if a.score else ""),
            "|---|---:|---:|" + ("---:|---:|" if a.score else "")]  # fmt: skip
    for name in fns:
        med = statistics.median(times[name])
        row = f"| {name} | {a.num / med:.1f} | {base / med:.2f}x |"
        if a.score:
            from ._digits_quality import score

            q = score(images[name])
            row += f" {q['fd']:.2f} | {q['confident']:.0%} |"
        rows.append(row)
    table = "\n".join(rows)
    print(table)
    if a.markdown:
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
        section = "\n".join([
            MARK_START, "## CPU sampling speed against diffusers' DDIMPipeline (`benchmarks/sample_cpu.py`, issue 25)", "",
            f"- command: `python -m benchmarks.sample_cpu {' '.join(argv or sys.argv[1:])}`",
            f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; CPU: {cpu_name()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads; load average after: {load}",
            f"- {a.num} images per variant per round, batch {a.batch}, median of {a.rounds} alternating rounds; "
            "the same exported model on both sides", "", table, MARK_END,
        ])  # fmt: skip
        replace_section(a.markdown, section, MARK_START, MARK_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
