"""`diffuse train FOLDER --time 5m` with no other option, against diffusers trained for the same minutes.

The data: the 1,797 built-in digits as a folder of 16x16 grayscale PNGs (bicubic from 8x8), what a
new user brings. Two runs, one after the other on this machine, each given the same wall-clock budget:

* ours: ``diffuse train FOLDER --time 5m --out RUN`` (every default: image size from the folder,
  preset, batch, threads), then ``diffuse sample RUN --num 500 --seed 1`` (the default sampler);
* the reference: diffusers' ``UNet2DModel`` (16x16, block widths 32/64/64 with attention at the
  middle level, 2 blocks per level), batch 32, AdamW at 2e-4, an EMA of the weights (0.999), DDPM's
  linear schedule with 1000 steps, trained for the same minutes; 500 samples with ``DDIMScheduler``,
  50 steps.

Both sets are scored by ``benchmarks/_digits_quality.py``: a Frechet distance in the features of a
small digit classifier trained on the other half of the digits, and the fraction it classifies
confidently. ``--threads-check`` also times ``diffuse train`` for a minute while another process keeps
one core busy, with the default thread count and with ``--threads 2``.

    python -m benchmarks.defaults                                   # about 13 minutes on 2 cores
    python -m benchmarks.defaults --budget 5m --threads-check --markdown benchmarks/RESULTS.md
    python -m benchmarks.defaults --budget 20s --num 16             # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffuse_cli.engine.config import parse_duration
from diffuse_cli.engine.data import load_builtin
from diffuse_cli.engine.unet import count_parameters

from ._common import cpu_name, replace_section
from ._digits_quality import score
from ._trained import cache_dir

ROOT = Path(__file__).resolve().parents[1]

MARK_START, MARK_END = "<!-- defaults:start -->", "<!-- defaults:end -->"


def digit_folder(size: int = 16) -> Path:
    """The built-in digits as PNG files of ``size`` px, written once into the benchmark cache."""
    folder = cache_dir() / f"digits-{size}px"
    if len(list(folder.glob("*.png"))) == 1797:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(load_builtin("digits", image_size=size).images):
        Image.fromarray(im[0].numpy(), "L").save(folder / f"{i:04d}.png")
    return folder


def read_pngs(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("L")) for p in files]))[:, None]


def save_grid(images: torch.Tensor, path: Path) -> None:
    """The first 64 samples as an 8x8 grid."""
    from diffuse_cli.engine import images as img

    img.save_image(img.upscale(img.make_grid(images[:64]), 512), path)


def diffuse(*args: str) -> str:
    cmd = [sys.executable, "-m", "diffuse_cli", *map(str, args)]
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def ours(folder: Path, work: Path, budget: str, num: int, reuse: bool = False) -> dict:
    run = work / "ours"
    if reuse and (run / "train.txt").exists():  # the run of an earlier call (same budget), e.g. to redo the reference
        log = (run / "train.txt").read_text()
    else:
        log = diffuse("train", folder, "--time", budget, "--out", run, "--overwrite")
        (run / "train.txt").write_text(log)
    diffuse("sample", run, "--num", num, "--seed", 1, "--out", work / "ours-samples", "--overwrite")
    images = read_pngs(work / "ours-samples")
    save_grid(images, work / "ours-grid.png")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    model_line = next((line for line in log.splitlines() if line.startswith("model")), "")
    return {"name": "ours: `diffuse train FOLDER --time " + budget + "`, default sampler", "images": images,
            "steps": records[-1]["step"], "train_s": records[-1]["elapsed"], "setup": model_line.strip(), "grid": work / "ours-grid.png"}  # fmt: skip


def reference(folder: Path, work: Path, budget_s: float, num: int) -> dict:
    """diffusers' UNet2DModel trained the usual way for ``budget_s`` seconds, sampled with DDIM 50."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    data = read_pngs(folder).float().div(127.5).sub(1.0)
    model = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2)  # fmt: skip
    from diffusers.training_utils import EMAModel

    ema = EMAModel(model.parameters(), decay=0.999)  # diffusers' own EMA (decay warmup (1 + k) / (10 + k), as ours)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    g = torch.Generator().manual_seed(0)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget_s:
        x0 = data[torch.randint(0, len(data), (32,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(model.parameters())
        steps += 1
    train_s = time.perf_counter() - t0
    ema.copy_to(model.parameters())
    model.eval()
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(50)
    out = []
    with torch.no_grad():
        for start in range(0, num, 100):
            x = torch.randn((min(100, num - start), 1, 16, 16), generator=torch.Generator().manual_seed(1 + start))
            for t in ddim.timesteps:
                x = ddim.step(model(x, t).sample, t, x).prev_sample
            out.append(x)
    images = torch.cat(out).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    save_grid(images, work / "diffusers-grid.png")
    params = count_parameters(model)
    return {"name": "diffusers UNet2DModel, same minutes, DDIM 50", "images": images, "steps": steps, "train_s": train_s,
            "setup": f"{params / 1e6:.2f}M parameters, batch 32, {torch.get_num_threads()} threads", "grid": work / "diffusers-grid.png"}  # fmt: skip


def threads_check(folder: Path, work: Path) -> list[tuple[str, float]]:
    """img/s of a one-minute `diffuse train` while another process keeps one core busy."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(20)  # let the load average see it
        rows = []
        for label, extra in (("default threads", []), ("--threads 2", ["--threads", "2"])):
            run = work / f"threads-{len(extra)}"
            diffuse("train", folder, "--time", "60s", "--out", run, "--overwrite", "--sample-every", "0", *extra)
            rec = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            rows.append((label, rec[-1]["step"] * 32 / rec[-1]["elapsed"]))
        return rows
    finally:
        busy.kill()


def markdown(results: list[dict], budget: str, threads: list | None, command: str, load: float) -> str:
    lines = [MARK_START, "## Defaults on a user's folder (`benchmarks/defaults.py`)", "",
             f"- command: `{command}`",
             f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; CPU: {cpu_name()}, {os.cpu_count()} cores; "
             f"torch {torch.__version__}; load average at the start: {load:.1f}",
             "- data: the 1,797 built-in digits as 16x16 grayscale PNGs; each model trained for the same wall-clock "
             f"budget ({budget}) on this machine, one after the other; 500 samples each",
             "- FD: Frechet distance in the features of a small digit classifier trained on the other half of the "
             "digits (lower is better; not FID); confident: share of samples it classifies with p > 0.9", "",
             "| model | setup | steps | FD | confident | speckled |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        s = r["score"]
        lines.append(
            f"| {r['name']} | {r['setup']} | {r['steps']} | {s['fd']:.1f} | {s['confident']:.0%} | {s['speckled']:.0%} |"
        )
    if len(results) == 2:
        a, b = results[0]["score"]["fd"], results[1]["score"]["fd"]
        lines += ["", f"- ours / diffusers FD = {a / b:.2f} ({'ours better' if a < b else 'diffusers better'})"]
    if threads:
        lines += ["", "Training speed with another process keeping one core busy (1 minute each):", ""]
        lines += [f"- {label}: {ips:.0f} img/s" for label, ips in threads]
    lines += ["", "Grids (first 64 samples): `docs/defaults-ours.png`, `docs/defaults-diffusers.png`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--threads-check", action="store_true")
    ap.add_argument("--reuse-ours", action="store_true", help="reuse our trained run from the last call (same budget)")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    folder = digit_folder(16)
    work = cache_dir() / "defaults-run"
    work.mkdir(parents=True, exist_ok=True)
    results = [
        ours(folder, work, args.budget, args.num, args.reuse_ours),
        reference(folder, work, parse_duration(args.budget), args.num),
    ]
    for r in results:
        r["score"] = score(r["images"])
        print(
            f"{r['name']}: {r['steps']} steps in {r['train_s']:.0f} s; {r['setup']}; "
            f"FD {r['score']['fd']:.1f}, confident {r['score']['confident']:.0%}, speckled {r['score']['speckled']:.0%}"
        )
    threads = threads_check(folder, work) if args.threads_check else None
    for label, ips in threads or []:
        print(f"one core busy, {label}: {ips:.0f} img/s")
    text = markdown(results, args.budget, threads, "python -m benchmarks.defaults " + " ".join(sys.argv[1:]), load)
    if args.markdown:
        import shutil

        args.docs.mkdir(exist_ok=True)
        shutil.copy(results[0]["grid"], args.docs / "defaults-ours.png")
        shutil.copy(results[1]["grid"], args.docs / "defaults-diffusers.png")
        replace_section(args.markdown, text, MARK_START, MARK_END)
    print(text)


if __name__ == "__main__":
    main()
