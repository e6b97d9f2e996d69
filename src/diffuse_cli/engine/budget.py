"""CPU budgets: the precision and the model size for the time a run has (issue 25).

Two choices are made here, both by timing the real network on this machine for a moment before training:

* **Precision.** ``--precision auto`` on a CPU trains under bf16 autocast (weights, optimizer and loss stay
  fp32; convolutions and matrix products run in bf16) when oneDNN has bf16 kernels for this CPU and they
  make a training step at least :data:`BF16_MIN_SPEEDUP` times faster than fp32; otherwise fp32. On a CPU
  without native bf16 (AVX2 only) autocast emulates it and is slower, so the check has to be made at run
  time. Sample quality per step was measured to be the same in both (``benchmarks/budget.py``, the table
  in ``benchmarks/RESULTS.md``), so the faster one wins at any budget.
* **Model size.** With ``--time`` and ``--preset auto`` on a CPU, the network is chosen for the budget:
  for a fixed amount of compute there is a best model size (the compute-optimal trade-off of scaling
  studies: Kaplan et al. 2020, Hoffmann et al. 2022; for diffusion models e.g. Mei et al. 2024). A larger
  U-Net learns more per step but takes fewer steps in the minutes it has. :data:`LADDER` lists the
  candidates from the largest (the ``cpu`` preset, today's default) down; :func:`size_for_budget` takes the
  largest that still gets :data:`MIN_STEPS_PER_SIDE` steps per pixel of the image side in the budget at its
  measured speed, else the smallest. The threshold comes from a sweep of sizes x steps on the digits at
  16x16 and 28x28 (``benchmarks/budget.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass

import torch

from . import device as devices
from .config import UNetConfig

#: bf16 must make a training step at least this much faster than fp32 to be chosen by ``--precision auto``.
BF16_MIN_SPEEDUP = 1.1
#: A run shorter than this (steps, or seconds of --time) keeps fp32: measuring would cost more than it saves.
MIN_STEPS_TO_MEASURE = 200
MIN_SECONDS_TO_MEASURE = 60
#: The cpu preset's candidates for a budget, largest first: overrides of the preset (see the module docstring).
#: A width-16 rung was measured too (0.27M parameters, 3.6x the speed at 28x28) and dropped: per step it learns
#: so much less that it lost at every budget (FD 235 after 2,500 steps at 28x28, against 25 and 53 for these).
LADDER: tuple[tuple[str, dict], ...] = (
    ("the cpu preset", {}),
    ("the cpu preset, 1 block per level, attention in the bottleneck only",
     dict(num_res_blocks=1, attention_resolutions=())),
)  # fmt: skip
#: The larger model is chosen when it gets at least this many steps (at batch 32) per pixel of the images'
#: shorter side. Its Frechet distance falls steeply until about 1,700 steps at 16x16 and 3,000 at 28x28, then
#: slowly (``benchmarks/budget.py``, RESULTS.md): short of that, the cheaper model's extra steps win.
MIN_STEPS_PER_SIDE = 110
#: A --time budget shorter than this keeps the preset's model (a minute is too short to learn much with any).
MIN_SIZED_SECONDS = 60
#: Share of a --time budget that goes to training steps (the rest: in-training evaluations, previews, saves).
TRAINING_SHARE = 0.85


@dataclass(frozen=True)
class Sized:
    """The model chosen for a budget, and why (the model line shows ``note``)."""

    model: UNetConfig
    img_per_s: float  # measured training speed of this model
    note: str  # "sized for 10 min at ~250 img/s: ..."


def bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels for this CPU (AVX-512 BF16, AMX, or the like)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_speed(model_config: UNetConfig, batch: int, device: torch.device, amp: torch.dtype | None,
                   reps: int = 2) -> float:  # fmt: skip
    """Images per second of a forward + backward pass of ``model_config`` at ``batch`` (random weights and data).

    A fresh model on random inputs: the run's own model, data and random streams are untouched (the global
    torch random state is restored), so a measured run trains exactly as an unmeasured one would.
    """
    from .unet import UNet

    state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        model = devices.optimize_for_device(UNet(model_config), device, amp)
        gen = torch.Generator(device=device).manual_seed(0)
        c, (h, w) = model_config.in_channels, model_config.hw
        x = torch.randn((batch, c, h, w), generator=gen, device=device)
        x = x.contiguous(memory_format=devices.memory_format(device, amp))
        t = torch.randint(0, 1000, (batch,), generator=gen, device=device)

        def step() -> None:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(x, t)
            out.float().square().mean().backward()

        step()  # the first pass builds oneDNN's kernels
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        return batch * reps / (time.perf_counter() - t0)
    finally:
        torch.set_rng_state(state)


@functools.lru_cache(maxsize=16)
def _cpu_speed(model_config: UNetConfig, batch: int, amp: torch.dtype | None) -> float:
    """:func:`training_speed` on the CPU, measured once per model, batch and precision in a process: the
    precision check and the model sizing both need the cpu preset's speed in the chosen precision."""
    return training_speed(model_config, batch, torch.device("cpu"), amp)


@functools.lru_cache(maxsize=8)
def _cpu_precision(model_config: UNetConfig, batch: int) -> tuple[torch.dtype | None, str]:
    if not bf16_supported():
        return None, "auto: this CPU has no native bf16"
    fp32 = _cpu_speed(model_config, batch, None)
    bf16 = _cpu_speed(model_config, batch, torch.bfloat16)
    ratio = bf16 / fp32
    if ratio >= BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"auto: bf16 autocast measured {ratio:.2f}x faster than fp32 on this CPU"
    return None, f"auto: bf16 measured {ratio:.2f}x the speed of fp32 on this CPU, so fp32"


def worth_measuring(steps: int, time_limit: float | None) -> bool:
    """Whether a run is long enough for ``--precision auto`` to time fp32 against bf16 (a few seconds)."""
    return steps >= MIN_STEPS_TO_MEASURE and (time_limit is None or time_limit >= MIN_SECONDS_TO_MEASURE)


def training_precision(precision: str, model_config: UNetConfig, batch: int, device: torch.device,
                       long_run: bool = True, processes: int = 1) -> tuple[torch.dtype | None, str]:  # fmt: skip
    """The autocast dtype to train with (None: fp32) and why, for ``--precision``.

    ``auto`` on a CPU measures both (see the module docstring) unless the run is short (``long_run``
    False) or has several processes (each would measure for itself and could decide differently).
    """
    if precision != "auto" or device.type != "cpu":
        return devices.autocast_dtype(precision, device), ""
    if processes > 1:
        return None, "auto: fp32 with several processes"
    if not long_run:
        return None, ""
    return _cpu_precision(model_config, batch)


def wants_sizing(time_limit: float | None, preset: str, device_type: str, chose_model: bool, resume: bool) -> bool:
    """Whether :func:`size_for_budget` chooses the model: a new run on a CPU with --time (a minute or more),
    --preset auto and no model option given (``chose_model``: a model option given means the user chose it)."""
    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    timed = time_limit is not None and time_limit >= MIN_SIZED_SECONDS
    return timed and preset == "auto" and device_type == "cpu" and not chose_model and not resume and single


def size_for_budget(base: UNetConfig, seconds: float, batch: int, precision: str = "auto") -> Sized:
    """The model of :data:`LADDER` (built on ``base``, the cpu preset for this data) for ``seconds`` of training."""
    cpu = torch.device("cpu")
    amp, _ = training_precision(precision, base, batch, cpu)
    minutes = seconds / 60
    wanted = MIN_STEPS_PER_SIDE * min(base.hw) * 32 / batch
    chosen = None
    for name, overrides in LADDER:
        cfg = dataclasses.replace(base, **overrides)
        ips = _cpu_speed(cfg, batch, amp)
        steps = seconds * TRAINING_SHARE * ips / batch
        chosen = (name, cfg, ips, steps)
        if steps >= wanted:
            break
    name, cfg, ips, steps = chosen
    budget = f"{minutes:.0f} min" if minutes >= 1.5 else f"{seconds:.0f} s"
    return Sized(cfg, ips, f"sized for {budget} at ~{ips:.0f} img/s (~{steps:,.0f} steps): {name}")
