"""GPU training and sampling throughput of DDPM's CIFAR-10 model: ours against diffusers' UNet2DModel.

The model is DDPM's CIFAR-10 U-Net (35.7M parameters, 32x32 RGB) in both implementations;
they compute the same function (``tests/test_unet.py`` loads diffusers' weights into ours).
One training step is the one ``diffuse train`` runs: a batch of 128 drawn from a uint8
data set kept on the GPU, random flips, x_t = q_sample(x0, t, eps), MSE on eps, backward,
gradient clipping at 1, AdamW, EMA update. Losses stay on the device: the host waits for
the GPU only at the end of a timed chunk of steps.

Training variants, each in its own try/except and time budget:

* ``ours`` fp32 / bf16 / bf16 + ``torch.compile``: :class:`UNet` with channels_last and fused
  AdamW (:mod:`diffuse_cli.engine.device`), bf16 by autocast, built and run by the engine's own
  :func:`~diffuse_cli.engine.step.make_train_step`: the step ``diffuse train`` runs;
* ``ours`` bf16 NCHW: a control that shows what channels_last buys on this card;
* ``diffusers`` fp32 / bf16: UNet2DModel as a user gets it (NCHW, ``torch.optim.AdamW()``).

"fp32" means fp32 weights and activations with TF32 matmuls and convolutions, which
``diffuse train`` enables on CUDA. Sampling: 50 steps of our default sampler at batch 256,
eager fp32 and bf16, and bf16 with the model call replayed from a CUDA graph.

MFU = (matmul, conv and attention FLOPs of a forward + backward, counted once by
``torch.utils.flop_counter``) x steps/s / the card's dense peak for the precision.

    python -m benchmarks.gpu                                   # on a GPU: everything, < 5 minutes
    python -m benchmarks.gpu --markdown benchmarks/RESULTS.md  # ... and record it
    python -m benchmarks.gpu --tiny                            # tiny model on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffuse_cli.engine import device as perf
from diffuse_cli.engine import samplers
from diffuse_cli.engine.config import (
    DiffusionConfig,
    TrainConfig,
    UNetConfig,
)
from diffuse_cli.engine.diffusion import Diffusion
from diffuse_cli.engine.step import EMA, make_train_step
from diffuse_cli.engine.unet import UNet, count_parameters

from ._common import diffusers_model, replace_section

MARK_START, MARK_END = "<!-- gpu:start -->", "<!-- gpu:end -->"
TARGET_IMG_S = 5000  # ours in bf16 on one H100
TARGET_RATIO = 2.0  # our best over diffusers' best, same run
# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s: bf16, tf32, plain fp32.
# More specific names first: "H100 PCIe" must not match the SXM row.
PEAK_TFLOPS = [
    ("H200 NVL", 835.5, 417.5, 60.0),
    ("H200", 989.4, 494.7, 66.9),
    ("H100 NVL", 835.5, 417.5, 60.0),
    ("H100 PCIe", 756.5, 378.0, 51.2),
    ("H100", 989.4, 494.7, 66.9),  # SXM (HBM3)
    ("A100", 312.0, 156.0, 19.5),
]


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The card's dense peak FLOP/s for ``dtype`` (bf16 or fp32, the latter on TF32 cores when enabled)."""
    for key, bf16, tf32, fp32 in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            if dtype == "bf16":
                return bf16 * 1e12
            return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
    return None


@dataclass
class Setup:
    cfg: UNetConfig
    device: torch.device
    batch: int
    sample_batch: int
    sample_steps: int
    warmup: int  # untimed steps before timing (compiling happens here)
    chunk: int  # steps between host syncs while timing
    budget_s: float  # timed seconds per variant
    max_steps: int  # timed steps per variant at most
    compile_backend: str


@dataclass
class Result:
    name: str
    precision: str
    note: str
    img_s: float | None = None
    ms: float | None = None
    steps: int = 0
    flops: float | None = None  # per step (training) or per model call (sampling)
    mem_gib: float | None = None
    error: str | None = None
    warmup_s: float | None = None


# --- models --------------------------------------------------------------------------------
def ddpm_cifar10(tiny: bool) -> UNetConfig:
    if tiny:  # DDPM's layout scaled down so the CPU runs a step in milliseconds
        return UNetConfig(image_size=8, in_channels=3, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), dropout=0.1)  # fmt: skip
    return UNetConfig()  # Ho et al. 2020, appendix B: 35.7M parameters


def build(kind: str, s: Setup, channels_last: bool = True) -> tuple[torch.nn.Module, Callable, torch.optim.Optimizer]:
    """(module, callable(x_t, t) -> prediction, optimizer) for ``ours`` or ``diffusers``."""
    torch.manual_seed(0)
    if kind == "ours":
        model = UNet(s.cfg)
        model = perf.optimize_for_device(model, s.device) if channels_last else model.to(s.device)
        return model, model, perf.make_optimizer(model.parameters(), 2e-4)
    model = diffusers_model(s.cfg).to(s.device)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t).sample

    return model, call, torch.optim.AdamW(model.parameters(), lr=2e-4)


# --- timing --------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(step: Callable[[], object], s: Setup, budget_s: float) -> tuple[int, float]:
    """Run ``step`` in chunks until ``budget_s`` or ``max_steps``; (steps, seconds), host-synced per chunk."""
    n, elapsed = 0, 0.0
    while n == 0 or (n < s.max_steps and elapsed < budget_s):
        k = min(s.chunk, s.max_steps - n)
        sync(s.device)
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        sync(s.device)
        elapsed += time.perf_counter() - t0
        n += k
    return n, elapsed


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


# --- training ------------------------------------------------------------------------------
def train_step(model: torch.nn.Module, call: Callable, opt: torch.optim.Optimizer, s: Setup,
               diffusion: Diffusion, images: torch.Tensor, amp: torch.dtype | None,
               channels_last: bool) -> Callable[[], torch.Tensor]:  # fmt: skip
    """The same step for diffusers' model (the reference): the batch, loss and updates of ``engine/step.py``."""
    dev, b = s.device, s.batch
    gen = torch.Generator(device=dev).manual_seed(0)
    ema = EMA(model, 0.9999)
    fmt = perf.memory_format(dev) if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=dev)
    k = 0

    def step() -> torch.Tensor:
        nonlocal k
        idx = torch.randint(0, images.shape[0], (b,), generator=gen, device=dev)
        t = torch.randint(0, diffusion.num_timesteps, (b,), generator=gen, device=dev)
        eps = torch.randn((b, *images.shape[1:]), generator=gen, device=dev)
        flip = torch.rand((b,), generator=gen, device=dev) < 0.5
        x0 = images[idx].float().div_(127.5).sub_(1.0)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0).contiguous(memory_format=fmt)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = diffusion.training_losses(call, x0, t=t, eps=eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        ema.update(model, k)
        k += 1
        loss_sum.add_(loss.detach())  # read once, after timing: no host sync per step
        return loss_sum  # the same tensor every step

    return step


def train_flops(kind: str, s: Setup) -> float:
    """Matmul/conv/attention FLOPs of one forward + backward at the training batch size."""
    model, call, _ = build(kind, s)
    x = torch.randn(s.batch, s.cfg.in_channels, s.cfg.image_size, s.cfg.image_size, device=s.device)
    t = torch.randint(0, 1000, (s.batch,), device=s.device)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(call(x, t), torch.zeros_like(x)).backward()
    del model
    return float(counter.get_total_flops())


def ours_step(s: Setup, images: torch.Tensor, amp: torch.dtype | None, compile_: bool,
              channels_last: bool) -> Callable[[], torch.Tensor]:  # fmt: skip
    """The training step ``diffuse train`` runs (engine/step.py), on DDPM's CIFAR-10 settings."""
    cfg = TrainConfig(batch_size=s.batch, hflip=True, ema_decay=0.9999, warmup=0, compile=compile_,
                      precision="bf16" if amp is not None else "fp32")  # fmt: skip
    ts = make_train_step(s.cfg, DiffusionConfig(), cfg, images, s.device, amp=amp)
    if not channels_last:  # the NCHW control
        ts.model.to(memory_format=torch.contiguous_format)
        ts.memory_format = torch.contiguous_format
    if compile_ and ts.compile(s.compile_backend) is not None:
        raise RuntimeError("torch.compile does not work here")
    loss_sum = torch.zeros((), device=s.device)
    k = 0

    def step() -> torch.Tensor:
        nonlocal k
        loss_sum.add_(ts(k))
        k += 1
        return loss_sum

    return step


def run_train(r: Result, kind: str, s: Setup, diffusion: Diffusion, images: torch.Tensor, budget_s: float,
              amp: torch.dtype | None, compile_: bool = False, channels_last: bool = True) -> None:  # fmt: skip
    reset_memory(s.device)
    if kind == "ours":
        step = ours_step(s, images, amp, compile_, channels_last)
    else:
        model, call, opt = build(kind, s, channels_last)
        if compile_:
            call = torch.compile(model, backend=s.compile_backend)
        step = train_step(model, call, opt, s, diffusion, images, amp, channels_last)
    t0 = time.perf_counter()
    for _ in range(s.warmup):
        loss_sum = step()
    sync(s.device)
    r.warmup_s = time.perf_counter() - t0
    r.steps, sec = timed(step, s, budget_s)
    if not math.isfinite(float(loss_sum)):
        raise FloatingPointError(f"the loss became {float(loss_sum)}")
    r.ms = sec / r.steps * 1e3
    r.img_s = r.steps * s.batch / sec
    r.mem_gib = peak_memory_gib(s.device)


# --- sampling ------------------------------------------------------------------------------
class GraphedCall:
    """One model call captured as a CUDA graph and replayed: launches ~1000 kernels with one call.

    Inputs are copied into static buffers; the output is cloned so the sampler may keep it.
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, amp: torch.dtype | None):
        self.x, self.t = x.clone(), t.clone()
        ctx = dict(device_type="cuda", dtype=amp, enabled=amp is not None, cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), torch.autocast(**ctx):
            for _ in range(3):  # let cuDNN and the allocator settle before capture
                model(self.x, self.t)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph), torch.autocast(**ctx):
            self.out = model(self.x, self.t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out.clone()


def run_sample(r: Result, s: Setup, diffusion: Diffusion, budget_s: float, amp: torch.dtype | None,
               graph: bool = False) -> None:  # fmt: skip
    reset_memory(s.device)
    model, _, _ = build("ours", s)
    model.eval()
    c, size = s.cfg.in_channels, s.cfg.image_size
    gen = torch.Generator(device=s.device).manual_seed(0)
    x_T = torch.randn((s.sample_batch, c, size, size), generator=gen, device=s.device)
    call: Callable = model
    if graph:
        if s.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        call = GraphedCall(model, x_T, torch.zeros(s.sample_batch, dtype=torch.int64, device=s.device), amp)

    def once() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(s.device.type, dtype=amp, enabled=amp is not None and not graph):
            return samplers.sample(call, diffusion, x_T, sampler=samplers.DEFAULT_SAMPLER, steps=s.sample_steps,
                                   generator=gen)  # fmt: skip

    t0 = time.perf_counter()
    once()
    sync(s.device)
    r.warmup_s = time.perf_counter() - t0
    n, sec = 0, 0.0
    while n < 1 or (sec < budget_s and n < 20):
        sync(s.device)
        t0 = time.perf_counter()
        x0 = once()
        sync(s.device)
        sec += time.perf_counter() - t0
        n += 1
    if not bool(torch.isfinite(x0).all()):
        raise FloatingPointError("samples are not finite")
    r.steps = n
    r.ms = sec / n * 1e3
    r.img_s = n * s.sample_batch / sec
    r.mem_gib = peak_memory_gib(s.device)


# --- the run -------------------------------------------------------------------------------
def bench_device(name: str | None) -> torch.device:
    """``--device`` as ``diffuse train`` resolves it: none = auto (CUDA if present); ``cuda`` gets index 0."""
    return perf.resolve_device(name or "auto")


def run(args: argparse.Namespace) -> dict:
    dev = bench_device(args.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    perf.enable_tf32(dev)  # as `diffuse train` does
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    tiny = args.tiny
    backend = args.compile_backend or ("eager" if tiny and dev.type == "cpu" else "inductor")
    s = Setup(
        cfg=ddpm_cifar10(tiny), device=dev, batch=4 if tiny else args.batch,
        sample_batch=4 if tiny else args.sample_batch, sample_steps=2 if tiny else args.sample_steps,
        warmup=1 if tiny else 3, chunk=1 if tiny else 10, budget_s=0.0 if tiny else args.budget,
        max_steps=2 if tiny else 10_000, compile_backend=backend,
    )  # fmt: skip
    deadline = time.perf_counter() + args.total_budget
    diffusion = Diffusion(DiffusionConfig()).to(dev)  # DDPM: linear betas, T = 1000, eps prediction
    # A CIFAR-10-sized uint8 data set on the device (the content does not change the speed).
    n_images = 256 if tiny else 50_000
    cpu_gen = torch.Generator().manual_seed(0)
    shape = (n_images, s.cfg.in_channels, s.cfg.image_size, s.cfg.image_size)
    images = perf.to_device(torch.randint(0, 256, shape, generator=cpu_gen, dtype=torch.uint8), dev)
    bf16 = torch.bfloat16
    try:
        import diffusers  # noqa: F401

        have_diffusers = not args.no_diffusers
    except ImportError:
        have_diffusers = False
    no_diffusers = (
        "skipped: diffusers is not installed (pip install -e '.[bench]')" if not args.no_diffusers else "skipped"
    )

    R = Result
    train = {
        "ours-fp32": R("ours", "fp32", "channels_last, fused AdamW"),
        "ours-bf16": R("ours", "bf16", "channels_last, fused AdamW"),
        "ours-bf16-compile": R(
            "ours + compile", "bf16", f"torch.compile (backend={backend}), channels_last, fused AdamW"
        ),
        "ours-bf16-nchw": R("ours, NCHW (control)", "bf16", "contiguous NCHW, fused AdamW"),
        "diffusers-fp32": R("diffusers UNet2DModel", "fp32", "NCHW, torch.optim.AdamW()"),
        "diffusers-bf16": R("diffusers UNet2DModel", "bf16", "NCHW, torch.optim.AdamW()"),
    }
    sample = {
        "fp32": R("ours", "fp32", "eager"),
        "bf16": R("ours", "bf16", "eager"),
        "bf16-graph": R("ours + CUDA graph", "bf16", "model call replayed from a CUDA graph"),
    }
    sample_budget = 6.0  # each sampling run is already 50 model calls at batch 256

    def train_job(key: str, kind: str, amp: torch.dtype | None, needs: float = 5.0, **kw) -> tuple:
        job = lambda b: run_train(train[key], kind, s, diffusion, images, b, amp, **kw)  # noqa: E731
        return "train", train[key], job, needs

    def sample_job(key: str, amp: torch.dtype | None, **kw) -> tuple:
        return (
            "sample",
            sample[key],
            lambda b: run_sample(sample[key], s, diffusion, min(b, sample_budget), amp, **kw),
            5.0,
        )

    # (task, result, job(budget_s), seconds to keep in hand for it), run in this order: the required ones
    # first, then compiling (long, and it cannot be interrupted), then the optional ones.
    jobs = [train_job("ours-fp32", "ours", None), train_job("ours-bf16", "ours", bf16)]
    if have_diffusers:
        jobs += [train_job("diffusers-fp32", "diffusers", None), train_job("diffusers-bf16", "diffusers", bf16)]
    else:
        train["diffusers-fp32"].error = train["diffusers-bf16"].error = no_diffusers
    jobs.append(sample_job("bf16", bf16))
    if dev.type == "cuda":
        jobs.append(sample_job("bf16-graph", bf16, graph=True))
    else:
        sample["bf16-graph"].error = "skipped: CUDA graphs need a CUDA device"
    if args.no_compile:
        train["ours-bf16-compile"].error = "skipped (--no-compile)"
    else:
        jobs.append(train_job("ours-bf16-compile", "ours", bf16, needs=0 if tiny else 60, compile_=True))
    jobs += [train_job("ours-bf16-nchw", "ours", bf16, channels_last=False), sample_job("fp32", None)]

    flops: dict[str, float | None] = {}
    for kind in ("ours", "diffusers") if have_diffusers else ("ours",):
        try:
            flops[kind] = train_flops(kind, s)
        except Exception as err:  # noqa: BLE001 - MFU becomes n/a
            flops[kind] = None
            print(f"FLOP count for {kind} failed: {first_line(err)}", file=sys.stderr)
    for task, r, job, needs in jobs:
        left = deadline - time.perf_counter()
        if left < needs:
            r.error = f"skipped: the {args.total_budget:.0f} s time budget ran out"
            continue
        print(f"... {task}: {r.name} {r.precision}", file=sys.stderr, flush=True)
        try:
            job(min(s.budget_s, max(left - needs, 0.0)))
        except Exception as err:  # noqa: BLE001 - one failure must not lose the other numbers
            r.error = first_line(err)
        finally:
            reset_memory(dev)
    for key, r in train.items():
        r.flops = flops.get("diffusers" if key.startswith("diffusers") else "ours")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return dict(setup=s, train=train, sample=sample, device_name=name,
                params={"ours": count_parameters(UNet(s.cfg))})  # fmt: skip


def fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def report(res: dict) -> tuple[str, list[str]]:
    """Markdown tables and verdict lines."""
    s, train, sample, name = res["setup"], res["train"], res["sample"], res["device_name"]
    ok = [r for r in train.values() if r.img_s]
    theirs = [r for r in ok if r.name.startswith("diffusers")]
    best_theirs = max((r.img_s for r in theirs), default=None)
    rows = [
        f"Training, batch {s.batch}:",
        "",
        "| variant | precision | setup | img/s | ms/step | vs diffusers best | TFLOP/s | MFU | peak mem (GiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in train.values():
        if r.error:
            rows.append(f"| {r.name} | {r.precision} | {r.note} | {r.error} | | | | | |")
            continue
        tflops = r.flops * r.img_s / s.batch / 1e12 if r.flops else None
        peak = peak_flops(name, r.precision)
        mfu = tflops * 1e12 / peak if tflops is not None and peak else None
        ratio = r.img_s / best_theirs if best_theirs else None
        rows.append(f"| {r.name} | {r.precision} | {r.note} | {r.img_s:,.0f} | {r.ms:.1f} | {fmt(ratio, '.2f', 'x')} | "
                    f"{fmt(tflops, '.3g')} | {fmt(mfu and 100 * mfu, '.1f', '%')} | {fmt(r.mem_gib, '.2f')} |")  # fmt: skip
    rows += [
        "",
        f"Sampling, batch {s.sample_batch}, {s.sample_steps} steps of {samplers.DEFAULT_SAMPLER}:",
        "",
        "| variant | precision | setup | img/s | s/batch | peak mem (GiB) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in sample.values():
        if r.error:
            rows.append(f"| {r.name} | {r.precision} | {r.note} | {r.error} | | |")
        else:
            rows.append(
                f"| {r.name} | {r.precision} | {r.note} | {r.img_s:,.1f} | {r.ms / 1e3:.2f} | {fmt(r.mem_gib, '.2f')} |"
            )
    lines = []
    ours_bf16 = train["ours-bf16"].img_s
    on_h100 = any(k in name for k in ("H100", "H200"))
    verdict = ("met" if ours_bf16 >= TARGET_IMG_S else "missed") if ours_bf16 and on_h100 else "n/a on this device"
    lines.append(f"ours bf16 (eager): {fmt(ours_bf16, ',.0f')} img/s (target {TARGET_IMG_S:,} on one H100: {verdict})")
    best_ours = max((r for r in ok if r.name.startswith("ours") and "control" not in r.name),
                    key=lambda r: r.img_s, default=None)  # fmt: skip
    if best_ours and best_theirs:
        q = best_ours.img_s / best_theirs
        lines.append(f"ours best ({best_ours.name}, {best_ours.precision}) / diffusers best = {q:.2f}x "
                     f"(target {TARGET_RATIO:g}x: {'met' if q >= TARGET_RATIO else 'missed'})")  # fmt: skip
    per_img = {key.split("-")[0]: r.flops / s.batch for key, r in train.items() if r.flops}
    if per_img:
        lines.append("GFLOP per training image (forward + backward; matmul, conv, attention): "
                     + ", ".join(f"{k} {v / 1e9:.3g}" for k, v in per_img.items()))  # fmt: skip
    comp = train["ours-bf16-compile"]
    if comp.warmup_s is not None:
        lines.append(f"compile warm-up ({s.warmup} steps, backend {s.compile_backend}): {comp.warmup_s:.0f} s")
    g, e = sample["bf16-graph"].img_s, sample["bf16"].img_s
    if g and e:
        lines.append(f"CUDA graph sampling / eager sampling (bf16) = {g / e:.2f}x")
    return "\n".join(rows), lines


def write_markdown(path: Path, res: dict, table: str, lines: list[str], command: str) -> None:
    s = res["setup"]
    cfg = s.cfg
    cuda = f", CUDA {torch.version.cuda}" if s.device.type == "cuda" else ""
    try:
        import diffusers

        dv = f", diffusers {diffusers.__version__}"
    except ImportError:
        dv = ""
    section = "\n".join([
        MARK_START,
        "## GPU training and sampling throughput (`benchmarks/gpu.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; device: {res['device_name']}; "
        f"torch {torch.__version__}{cuda}{dv}",
        f"- model: DDPM layout, base {cfg.base_channels}, mults {','.join(map(str, cfg.channel_mults))}, "
        f"{cfg.num_res_blocks} res blocks, attention at {','.join(map(str, cfg.attention_resolutions))}, dropout "
        f"{cfg.dropout}; {cfg.image_size}x{cfg.image_size}x{cfg.in_channels}; {res['params']['ours']:,} parameters",
        "- training step = `diffuse train`'s: uint8 batch on the device, flips, q_sample, MSE, backward, clip, AdamW, "
        "EMA; fp32 = TF32 matmuls/convs; MFU against the card's dense peak for the precision",
        "",
        table,
        "",
        *[f"- {line}" for line in lines],
        MARK_END,
    ])  # fmt: skip
    replace_section(path, section, MARK_START, MARK_END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model, two steps per variant: a CPU smoke test")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    p.add_argument("--sample-batch", type=int, default=256, help="sampling batch (default 256)")
    p.add_argument("--sample-steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--budget", type=float, default=12.0, help="timed seconds per variant (default 12)")
    p.add_argument(
        "--total-budget",
        type=float,
        default=270.0,
        help="seconds for the whole run; variants that no longer fit are skipped (default 270)",
    )
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; eager for --tiny on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape first")
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' model")
    p.add_argument("--markdown", type=Path, help="write/replace the gpu section of this markdown file")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    table, lines = report(res)
    print(f"device: {res['device_name']}; torch {torch.__version__}; {time.perf_counter() - t0:.0f} s")
    print(table)
    print()
    for line in lines:
        print(line)
    if args.markdown:
        exe = os.path.relpath(sys.executable)
        exe = sys.executable if exe.startswith("..") else exe
        command = shlex.join([exe, os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])
        write_markdown(args.markdown, res, table, lines, command)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
