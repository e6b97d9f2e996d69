"""CPU training throughput: our U-Net against diffusers' UNet2DModel in the same DDPM layout.

Both networks are the DDPM CIFAR-10 layout at half width (base 64 channels, mults
1,2,2,2, 2 residual blocks per level, attention at 16x16, one head, dropout 0.1) on
32x32 RGB, batch 16; the two compute the same function (``tests/test_unet.py`` loads
diffusers' weights into ours and compares outputs). One step = forward, MSE loss
against a fixed target, backward, AdamW step, in fp32 unless a row says bf16.

Variants, timed in alternating rounds so that a change in machine load hits all alike:

* ``diffusers``: UNet2DModel as a user gets it (NCHW tensors, ``torch.optim.AdamW()``);
* ``diffusers+perf``: the same model with our speed settings, to show what they alone buy;
* ``ours``: :class:`UNet` with :func:`perf.optimize_for_device` and :func:`perf.make_optimizer`;
* ``ours+compile`` (``--compile``): the same, through ``torch.compile`` (inductor, C++ codegen);
* ``diffusers bf16`` / ``ours bf16`` (``--bf16``): both under bf16 autocast. Different
  numerics from the fp32 rows: compare these two with each other only.

The reported number per variant is the median over all timed steps of the wall-clock
time, and of the CPU time of the whole process (all threads), which is the steadier
figure when other jobs share the machine: then run with ``--threads 1``, and the verdict
lines compare CPU times instead of wall-clock times.

    python -m benchmarks.train_cpu                           # full run, prints the table
    python -m benchmarks.train_cpu --quick                   # seconds: smoke test
    python -m benchmarks.train_cpu --compile --bf16 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffuse_cli.engine import device as perf
from diffuse_cli.engine.config import UNetConfig
from diffuse_cli.engine.unet import UNet, count_parameters

from ._common import cpu_name, diffusers_model, diffusers_version, replace_section

MARK_START, MARK_END = "<!-- train_cpu:start -->", "<!-- train_cpu:end -->"
TARGET_RATIO = 1.5  # ours at least 1.5x diffusers' img/s


@dataclass
class Variant:
    name: str
    note: str
    step: Callable[[], None]
    params: int
    times: list[float] = field(default_factory=list)  # wall-clock seconds per step
    cpu_times: list[float] = field(default_factory=list)  # CPU seconds per step, all threads of this process

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)


def build_config(quick: bool) -> UNetConfig:
    if quick:  # same layout, scaled down so a test can run it in seconds
        return UNetConfig(image_size=16, in_channels=3, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                          attention_resolutions=(8,), dropout=0.1)  # fmt: skip
    return UNetConfig(image_size=32, in_channels=3, base_channels=64, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                      attention_resolutions=(16,), dropout=0.1)  # fmt: skip


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor,
              target: torch.Tensor, is_diffusers: bool, bf16: bool = False) -> Callable[[], None]:  # fmt: skip
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t)
        if is_diffusers:
            out = out.sample
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def flops_per_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                   is_diffusers: bool) -> int:  # fmt: skip
    """FLOPs of one forward + backward (matmuls, convs, attention), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        out = model(x, t)
        F.mse_loss(out.sample if is_diffusers else out, target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (Linux only)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait; steal counts as busy: another VM had the core
    return (sum(fields) - idle) / hz, sum(fields) / hz


def load_average() -> str:
    try:
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def peak_gflops(dtype: torch.dtype, reps: int = 5) -> dict[str, float]:
    """This CPU's measured throughput (GFLOP/s, best of ``reps``) for the two kinds of work a U-Net step is made
    of, in ``dtype``: a large matrix product (2048 x 2048, what attention and the linear layers are) and a 3x3
    convolution at the widths of the benchmark's model (batch 32, 128 -> 128 channels, 16x16). The best of the
    two is the "peak" a step's GFLOP/s is compared with."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    x = torch.randn(32, 128, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    work = {
        "matmul": (lambda: a @ b, 2 * 2048**3),
        "conv": (lambda: conv(x), 2 * 32 * 128 * 128 * 9 * 16 * 16),
    }
    out = {}
    with torch.no_grad():
        for name, (fn, flop) in work.items():
            fn()
            best = min(_timed(fn) for _ in range(reps))
            out[name] = flop / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = build_config(args.quick)
    batch = 4 if args.quick else args.batch
    size, ch = cfg.image_size, cfg.in_channels
    x = torch.randn(batch, ch, size, size)
    t = torch.randint(0, 1000, (batch,))
    target = torch.randn(batch, ch, size, size)
    lr = 1e-4

    variants: list[Variant] = []
    theirs = diffusers_model(cfg).train()
    variants.append(Variant("diffusers", "UNet2DModel, NCHW, torch.optim.AdamW defaults", make_step(
        theirs, torch.optim.AdamW(theirs.parameters(), lr=lr), x, t, target, True), count_parameters(theirs)))  # fmt: skip
    if not args.no_diffusers_perf:
        theirs_p = perf.optimize_for_device(diffusers_model(cfg).train(), "cpu")
        variants.append(Variant("diffusers+perf", "UNet2DModel + our settings (channels_last, fused AdamW)", make_step(
            theirs_p, perf.make_optimizer(theirs_p.parameters(), lr), x, t, target, True),
            count_parameters(theirs_p)))  # fmt: skip
    ours = perf.optimize_for_device(UNet(cfg).train(), "cpu")
    ours_opt = perf.make_optimizer(ours.parameters(), lr)
    variants.append(Variant("ours", "diffuse UNet, eager, channels_last, fused AdamW", make_step(
        ours, ours_opt, x, t, target, False), count_parameters(ours)))  # fmt: skip
    if args.bf16:  # mixed precision on both: different numerics from the fp32 rows, compared only with each other
        theirs_b = diffusers_model(cfg).train()
        variants.append(Variant("diffusers bf16", "UNet2DModel, NCHW, AdamW defaults, bf16 autocast", make_step(
            theirs_b, torch.optim.AdamW(theirs_b.parameters(), lr=lr), x, t, target, True, bf16=True),
            count_parameters(theirs_b)))  # fmt: skip
        ours_b = perf.optimize_for_device(UNet(cfg).train(), "cpu", autocast_dtype=torch.bfloat16)
        variants.append(Variant("ours bf16", "diffuse UNet, eager, NCHW (perf's bf16 choice), fused AdamW, bf16 autocast",
            make_step(ours_b, perf.make_optimizer(ours_b.parameters(), lr), x, t, target, False, bf16=True),
            count_parameters(ours_b)))  # fmt: skip
    compile_s = None
    if args.compile:
        ours_c = perf.optimize_for_device(UNet(cfg).train(), "cpu")
        compiled = torch.compile(ours_c)
        step_c = make_step(compiled, perf.make_optimizer(ours_c.parameters(), lr), x, t, target, False)
        t0 = time.perf_counter()
        step_c()  # compiles forward and backward
        compile_s = time.perf_counter() - t0
        variants.append(Variant("ours+compile", "diffuse UNet, torch.compile (inductor), channels_last, fused AdamW",
                                step_c, count_parameters(ours_c)))  # fmt: skip

    flops = {
        "diffusers": flops_per_step(theirs, x, t, target, True),
        "ours": flops_per_step(ours, x, t, target, False),
    }
    for v in variants:
        for _ in range(args.warmup):
            v.step()
    for _ in range(args.repeats):
        for v in variants:
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                v.step()
                v.times.append(time.perf_counter() - t0)
                v.cpu_times.append(time.process_time() - c0)
    peaks = {"fp32": peak_gflops(torch.float32), "bf16": peak_gflops(torch.bfloat16)}
    return dict(cfg=cfg, batch=batch, variants=variants, flops=flops, compile_s=compile_s,
                threads=torch.get_num_threads(), peaks=peaks)  # fmt: skip


def report(res: dict) -> tuple[str, list[str]]:
    """The markdown table and the verdict lines."""
    batch, variants, flops = res["batch"], res["variants"], res["flops"]
    base = variants[0]
    rows = [
        "| variant | setup | params | ms/step | img/s | vs diffusers | CPU ms/step | vs diffusers (CPU time) "
        "| GFLOP/step | GFLOP/s | of this CPU's peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peaks = res["peaks"]
    for v in variants:
        f = flops["diffusers" if v.name.startswith("diffusers") else "ours"]
        peak = max(peaks["bf16" if "bf16" in v.name else "fp32"].values())
        rows.append(
            f"| {v.name} | {v.note} | {v.params:,} | {v.median * 1e3:.1f} | {batch / v.median:.1f} | "
            f"{base.median / v.median:.2f}x | {v.cpu_median * 1e3:.1f} | {base.cpu_median / v.cpu_median:.2f}x | "
            f"{f / 1e9:.1f} | {f / v.median / 1e9:.0f} | {f / v.median / 1e9 / peak:.0%} |"
        )
    by_name = {v.name: v for v in variants}
    # With one thread, CPU time is the work this process did, whatever else runs on the machine;
    # with more, idle threads spin, so wall-clock time is the measure (on a quiet machine).
    by_cpu = res["threads"] == 1
    basis = "CPU time, 1 thread" if by_cpu else "wall-clock"

    def speedup(slow: str, fast: str) -> float:
        a, b = by_name[slow], by_name[fast]
        return a.cpu_median / b.cpu_median if by_cpu else a.median / b.median

    def verdict(label: str, ratio: float) -> str:
        met = "met" if ratio >= TARGET_RATIO else "missed"
        return f"{label} / diffusers throughput = {ratio:.2f}x ({basis}; target {TARGET_RATIO}x: {met})"

    lines = [verdict("ours (eager)", speedup("diffusers", "ours"))]
    for kind, p in peaks.items():
        lines.append(f"this CPU's measured peak in {kind}: matrix product {p['matmul']:.0f} GFLOP/s, 3x3 convolution "
                     f"{p['conv']:.0f} GFLOP/s (the larger is the peak of the last column)")  # fmt: skip
    if "ours+compile" in by_name:
        lines.append(verdict("ours (torch.compile)", speedup("diffusers", "ours+compile"))
                     + f"; compiling took {res['compile_s']:.0f} s")  # fmt: skip
    if "diffusers+perf" in by_name:
        lines.append("with the same settings on both (channels_last, fused AdamW): ours / diffusers = "
                     f"{speedup('diffusers+perf', 'ours'):.2f}x")  # fmt: skip
    if "ours bf16" in by_name:
        lines.append(f"both under bf16 autocast (not the same numerics as fp32): ours / diffusers = "
                     f"{speedup('diffusers bf16', 'ours bf16'):.2f}x; ours bf16 / diffusers fp32 = "
                     f"{speedup('diffusers', 'ours bf16'):.2f}x")  # fmt: skip
    return "\n".join(rows), lines


def write_markdown(path: Path, res: dict, table: str, lines: list[str], command: str, meta: dict) -> None:
    cfg = res["cfg"]
    section = "\n".join([
        MARK_START,
        "## CPU training throughput (`benchmarks/train_cpu.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}; CPU: {meta['cpu']}, {meta['cores']} cores, {meta['threads']} torch threads; "
        f"torch {torch.__version__}, diffusers {meta['diffusers']}; load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}; CPU time used by other processes during the run: "
        f"{meta.get('others', 'n/a')}",
        f"- model: DDPM layout, base {cfg.base_channels}, mults {','.join(map(str, cfg.channel_mults))}, "
        f"{cfg.num_res_blocks} res blocks, attention at {','.join(map(str, cfg.attention_resolutions))}, dropout "
        f"{cfg.dropout}; {cfg.image_size}x{cfg.image_size}x{cfg.in_channels}, batch {res['batch']}; fp32 unless "
        "a row says bf16",
        "- step = forward + MSE loss + backward + AdamW step; median over "
        f"{meta['timed']} timed steps per variant, in alternating rounds after {meta['warmup']} warm-up steps; "
        "FLOPs from `torch.utils.flop_counter` (forward + backward).",
        "",
        table,
        "",
        *[f"- {line}" for line in lines],
        MARK_END,
    ])  # fmt: skip
    replace_section(path, section, MARK_START, MARK_END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours); compiling takes minutes")
    p.add_argument("--bf16", action="store_true", help="also time both models under bf16 autocast")
    p.add_argument("--no-diffusers-perf", action="store_true", help="skip the diffusers+perf variant")
    p.add_argument("--quick", action="store_true", help="tiny model and batch, one step each: a smoke test")
    p.add_argument("--markdown", type=Path, help="write/replace the train_cpu section of this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = 1, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    version = diffusers_version()
    if version is None:
        return 2

    meta = dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), cpu=cpu_name(), cores=os.cpu_count(),
        threads=torch.get_num_threads(), diffusers=version, load_before=load_average(),
        timed=args.steps * args.repeats, warmup=args.warmup,
    )  # fmt: skip
    machine0, own0 = machine_cpu_seconds(), time.process_time()
    res = run(args)
    machine1, own1 = machine_cpu_seconds(), time.process_time()
    meta["load_after"] = load_average()
    table, lines = report(res)
    if machine0 and machine1:
        # The share of all CPU time that went to other processes while this one ran.
        others = max(0.0, (machine1[0] - machine0[0]) - (own1 - own0)) / (machine1[1] - machine0[1])
        meta["others"] = f"{others:.0%}"
        if others > 0.1:
            lines.append(f"other processes used {others:.0%} of the machine's CPU time during the run: "
                         "wall-clock numbers are unreliable, the CPU-time columns less so")  # fmt: skip
    print(table)
    print()
    for line in lines:
        print(line)
    if args.markdown:
        exe = os.path.relpath(sys.executable)
        exe = sys.executable if exe.startswith("..") else exe
        command = shlex.join([exe, os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])
        write_markdown(args.markdown, res, table, lines, command, meta)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
