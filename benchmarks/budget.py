"""Which model for a CPU time budget: sample quality against training steps for a few U-Net sizes (issue 25).

For a fixed budget of minutes there is a best model size: a bigger network learns more per step but
takes fewer steps (the compute-optimal trade-off of scaling studies, e.g. Hoffmann et al. 2022 for
language models, Kaplan et al. 2020). This benchmark measures it on the built-in digits at a given
size (16 or 28 px, what a user's folder of small greyscale pictures looks like):

* ``--speed``: each candidate's training speed (img/s, batch 32, fp32 and bf16 autocast) on this
  machine with the threads given, after a few warm-up steps. Run it on an idle machine.
* the sweep: each candidate trained through the engine's training step (AdamW, warmup, EMA: what
  ``diffuse train`` runs) for a number of steps, and at each ``--at`` step its EMA model draws
  ``--num`` samples (the default sampler, fp32, fixed seeds) scored by the digit judge
  (``_digits_quality.score``: a Frechet distance to held-out digits). Quality against *steps* does
  not depend on the machine's load, so the sweep may run beside other work; a budget of B minutes
  is then ``B * 60 * img/s / batch`` steps, with img/s from ``--speed``.

    python -m benchmarks.budget --speed --size 28 --json /tmp/speed28.json
    python -m benchmarks.budget --size 28 --models cpu,rb1-noattn --at 500,1000,2000 --json /tmp/sweep28.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffuse_cli.engine import samplers
from diffuse_cli.engine.config import DiffusionConfig, TrainConfig, UNetConfig
from diffuse_cli.engine.data import from_model_range, load_builtin
from diffuse_cli.engine.generate import generate
from diffuse_cli.engine.step import make_train_step
from diffuse_cli.engine.unet import count_parameters

from ._digits_quality import score

#: Candidate models: overrides of the ``cpu`` preset (32/64/64 wide, 2 blocks per level, attention at
#: the second level and in the bottleneck).
CANDIDATES: dict[str, dict] = {
    "cpu": {},
    "cpu-noattn": dict(attention_resolutions=()),
    "rb1": dict(num_res_blocks=1),
    "rb1-noattn": dict(num_res_blocks=1, attention_resolutions=()),
    "w24-rb1-noattn": dict(base_channels=24, num_res_blocks=1, attention_resolutions=()),
    "w16-rb1-noattn": dict(base_channels=16, num_res_blocks=1, attention_resolutions=()),
}


def model_config(name: str, size: int) -> UNetConfig:
    if name in CANDIDATES:
        return UNetConfig.preset("cpu", size, 1, "cpu", **CANDIDATES[name])
    return UNetConfig.preset(name, size, 1, "cpu")


def speed(name: str, size: int, amp: torch.dtype | None, batch: int = 32, steps: int = 10) -> float:
    """Training img/s of candidate ``name`` (random data: the speed does not depend on it)."""
    images = torch.randint(0, 256, (256, 1, size, size), dtype=torch.uint8)
    ts = make_train_step(
        model_config(name, size), DiffusionConfig(), TrainConfig(batch_size=batch), images, torch.device("cpu"), amp=amp
    )
    for k in range(3):
        ts(k)
    t0 = time.perf_counter()
    for k in range(steps):
        ts(3 + k)
    return batch * steps / (time.perf_counter() - t0)


def sweep(name: str, size: int, at: list[int], *, amp, num: int, seed: int, lr: float, batch: int, emit) -> None:
    """Train candidate ``name`` on all 1,797 digits at ``size``, scoring the EMA model at each step in ``at``."""
    cfg = model_config(name, size)
    data = load_builtin("digits", image_size=size)
    train = TrainConfig(batch_size=batch, lr=lr, seed=seed)
    ts = make_train_step(cfg, DiffusionConfig(), train, data.images, torch.device("cpu"), amp=amp)
    t0, step = time.process_time(), 0
    for target in sorted(at):
        while step < target:
            ts(step)
            step += 1
        cpu_train = time.process_time() - t0
        x = generate(ts.ema.model, ts.diffusion, num, tuple(data.images.shape[1:]), seed=1, batch_size=128)
        q = score(from_model_range(x))
        emit(
            dict(
                model=name,
                size=size,
                precision="bf16" if amp else "fp32",
                seed=seed,
                lr=lr,
                batch=batch,
                params=count_parameters(ts.model),
                step=step,
                fd=q["fd"],
                confident=q["confident"],
                cpu_s=round(cpu_train, 1),
                sampler=samplers.DEFAULT_SAMPLER,
                num=num,
            )
        )
        t0 = time.process_time() - cpu_train  # the scoring's CPU time does not count as training


def fd_at(points: list[tuple[int, float]], step: float) -> float | None:
    """FD at ``step``, interpolated linearly in log(step) between the measured points; None outside them."""
    import math

    points = sorted(points)
    for (s0, f0), (s1, f1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            w = (math.log(step) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return f0 + w * (f1 - f0)
    return points[-1][1] if points and abs(step - points[-1][0]) < 1 else None


def report(speeds: list[dict], rows: list[dict], budgets: list[float], share: float) -> str:
    """The markdown tables: speed and FD per step for each candidate, then FD per budget (steps = budget x speed)."""
    speed = {(r["size"], r["model"], r["precision"]): r["img_s"] for r in speeds}
    curves: dict[tuple, list[tuple[int, float]]] = {}
    params: dict[str, int] = {}
    for r in rows:
        if r.get("seed", 0) == 0:
            curves.setdefault((r["size"], r["model"], r["precision"]), []).append((r["step"], r["fd"]))
            params[r["model"]] = r["params"]
    steps = sorted({s for c in curves.values() for s, _ in c})
    out = ["| size | model | params | precision | img/s | " + " | ".join(f"FD @{s}" for s in steps) + " |",
           "|---|---|---:|---|---:|" + "---:|" * len(steps)]  # fmt: skip
    for key, c in sorted(curves.items()):
        fd = dict(c)
        cells = " | ".join(f"{fd[s]:.1f}" if s in fd else "" for s in steps)
        out.append(
            f"| {key[0]} | {key[1]} | {params[key[1]] / 1e6:.2f}M | {key[2]} | {speed.get(key, 0):.0f} | {cells} |"
        )
    out += ["", "| size | model | precision | " + " | ".join(f"{b:g} min: steps, FD" for b in budgets) + " |",
            "|---|---|---|" + "---|" * len(budgets)]  # fmt: skip
    for key, c in sorted(curves.items()):
        cells = []
        for b in budgets:
            n = b * 60 * share * speed.get(key, 0) / 32
            f = fd_at(c, n)
            cells.append(f"{n:,.0f}, " + (f"{f:.1f}" if f is not None else "not measured"))
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--models", default=",".join(CANDIDATES))
    p.add_argument("--speed", action="store_true", help="measure img/s (fp32 and bf16) instead of the sweep")
    p.add_argument("--at", default="250,500,1000,2000,4000", help="steps at which the EMA model is scored")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="append one JSON line per result")
    p.add_argument(
        "--report", nargs=2, type=Path, metavar=("SPEEDS", "SWEEP"), help="print the tables of two JSONL files"
    )
    p.add_argument("--budgets", default="2,5,10", help="minutes, for --report")
    a = p.parse_args(argv)
    if a.report:
        from diffuse_cli.engine.budget import TRAINING_SHARE

        speeds, rows = ([json.loads(line) for line in f.read_text().splitlines() if line] for f in a.report)
        print(report(speeds, rows, [float(b) for b in a.budgets.split(",")], TRAINING_SHARE))
        return
    if a.threads:
        torch.set_num_threads(a.threads)

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(row) + "\n")

    for name in a.models.split(","):
        if a.speed:
            for amp in (None, torch.bfloat16):
                img_s = speed(name, a.size, amp, a.batch)
                emit(
                    dict(
                        model=name,
                        size=a.size,
                        precision="bf16" if amp else "fp32",
                        threads=torch.get_num_threads(),
                        img_s=round(img_s, 1),
                    )
                )
        else:
            amp = torch.bfloat16 if a.precision == "bf16" else None
            at = [int(s) for s in a.at.split(",")]
            sweep(name, a.size, at, amp=amp, num=a.num, seed=a.seed, lr=a.lr, batch=a.batch, emit=emit)


if __name__ == "__main__":
    main()
