"""`diffuse train FOLDER --time B` with today's CPU defaults against the new ones (issue 25), one after the other.

The data: the 1,797 built-in digits as a folder of PNGs at ``--size`` px (bicubic from 8x8; 28x28 stands in for
a folder of small greyscale pictures such as MNIST's). Each variant is a real ``diffuse train`` command given
the same wall-clock budget on this machine, then ``diffuse sample RUN --num N --seed 1`` (the default sampler),
scored by the digit judge (``_digits_quality.score``: Frechet distance in a digit classifier's features to
held-out digits; lower is better). Variants (``--variants``):

* ``today``: the defaults before issue 25, ``--preset cpu --precision fp32`` (what ``auto`` meant on a CPU);
* ``bf16``: today's model under bf16 autocast, ``--preset cpu --precision bf16`` (precision alone);
* ``new``: no option at all: ``--precision auto`` measures bf16 against fp32 and ``--time`` sizes the model
  (``engine/budget.py``).

Run it on an otherwise idle machine: the budget is wall-clock time.

    python -m benchmarks.cpu_budgets --size 28 --budget 10m --markdown benchmarks/RESULTS.md
    python -m benchmarks.cpu_budgets --size 16 --budget 5m --variants today,bf16,new --markdown benchmarks/RESULTS.md
    python -m benchmarks.cpu_budgets --size 16 --budget 20s --num 16          # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

from ._common import cpu_name, replace_section
from ._digits_quality import score
from ._trained import cache_dir
from .defaults import diffuse, digit_folder, read_pngs, save_grid

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "today": ("today's defaults (`--preset cpu --precision fp32`)", ["--preset", "cpu", "--precision", "fp32"]),
    "bf16": ("today's model in bf16 (`--preset cpu --precision bf16`)", ["--preset", "cpu", "--precision", "bf16"]),
    "new": ("new defaults (no option)", []),
}


def run_variant(name: str, folder: Path, work: Path, budget: str, num: int, seed: int, threads: int) -> dict:
    label, extra = VARIANTS[name]
    extra = [*extra, *(["--threads", threads] if threads else [])]
    run = work / f"{name}-s{seed}"
    log = diffuse("train", folder, "--time", budget, "--out", run, "--overwrite", "--seed", seed, *extra)
    (work / f"{name}-s{seed}.txt").write_text(log)
    out = work / f"{name}-s{seed}-samples"
    diffuse("sample", run, "--num", num, "--seed", 1, "--out", out, "--overwrite")
    images = read_pngs(out)
    grid = work / f"{name}-s{seed}-grid.png"
    save_grid(images, grid)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    lines = [line.strip() for line in log.splitlines()]
    i = next(k for k, line in enumerate(lines) if line.startswith("model"))
    q = score(images)
    return dict(
        name=name, label=label, seed=seed, steps=train[-1]["step"], elapsed=train[-1]["elapsed"],
        img_s=train[-1]["step"] * 32 / max(train[-1]["elapsed"], 1e-9), model=lines[i], device=lines[i + 1],
        fd=q["fd"], confident=q["confident"], grid=str(grid),
    )  # fmt: skip


def markdown(rows: list[dict], size: int, budget: str, num: int, command: str, load: str) -> str:
    start, end = f"<!-- cpu_budgets_{size}:start -->", f"<!-- cpu_budgets_{size}:end -->"
    out = [
        start,
        f"## `diffuse train` on {size}x{size} digits for {budget}: today's CPU defaults and the new ones (issue 25)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M}; CPU: {cpu_name()}, {os.cpu_count()} cores, otherwise "
        f"idle; load average after: {load}",
        f"- data: the 1,797 digits as {size}x{size} PNGs; {num} samples each (`--seed 1`, default sampler); FD: "
        "digit-classifier Frechet distance to held-out digits (`benchmarks/_digits_quality.py`), lower is better",
        "",
        "| variant | seed | model line | steps | img/s (whole run) | FD | confident |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['seed']} | {r['model'].removeprefix('model ')}; {r['device']} | {r['steps']:,} | "
            f"{r['img_s']:.0f} | {r['fd']:.2f} | {r['confident']:.0%} |"
        )
    return "\n".join(out + ["", end]), start, end


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--budget", default="10m")
    p.add_argument("--variants", default="today,new")
    p.add_argument("--seeds", default="0")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--threads", type=int, default=0, help="--threads for every train command (0: not given)")
    p.add_argument("--docs", action="store_true", help="copy the seed-0 grids to docs/budget-SIZE-VARIANT.png")
    a = p.parse_args(argv)
    folder = digit_folder(a.size)
    work = cache_dir() / f"cpu-budgets-{a.size}-{a.budget}"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in a.variants.split(","):
            rows.append(run_variant(name, folder, work, a.budget, a.num, seed, a.threads))
            print(json.dumps(rows[-1]), flush=True)
            with (work / "results.jsonl").open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            if a.docs and seed == 0:
                shutil.copy(rows[-1]["grid"], ROOT / "docs" / f"budget-{a.size}-{name}.png")
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    command = "python -m benchmarks.cpu_budgets " + " ".join(argv if argv is not None else sys.argv[1:])
    section, start, end = markdown(rows, a.size, a.budget, a.num, command, load)
    print(section)
    if a.markdown:
        replace_section(a.markdown, section, start, end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
