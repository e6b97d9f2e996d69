"""Devices, precision and the speed settings per device that leave the math unchanged.

* :func:`resolve_device` turns ``--device`` into a torch device; :func:`autocast_dtype`
  turns ``--precision`` into the autocast dtype (or None for fp32);
* :func:`optimize_for_device` moves a model to its device in the memory format
  its convolutions run fastest in there (``channels_last``: oneDNN on CPU and
  cuDNN on recent GPUs work in NHWC natively, so no layout reorder per conv);
* :func:`make_optimizer` builds AdamW (:mod:`.adamw`: the fused single-kernel update when
  this torch build has it for the device, else ``_foreach`` ops);
* :func:`to_device` copies data through pinned memory without blocking the host on CUDA;
* :class:`ThreadPolicy` sets torch's CPU threads to the cores other processes leave free, and
  re-decides now and then as their load changes (:class:`OtherLoad` reads it without sleeping).

Two more trade a little for speed and say so: :func:`enable_tf32` (CUDA only:
fp32 matmuls and convs on TF32 tensor cores) and :func:`compile_model` (an
optional ``torch.compile`` that falls back to eager where this machine cannot compile).

Inputs need no conversion: a conv whose weight is ``channels_last`` returns a
``channels_last`` activation, and the U-Net keeps that layout from then on.
Measured numbers live in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import torch
from torch import nn

from .adamw import AdamW
from .errors import ConfigError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU. Asking for a missing backend is a ConfigError.

    A bare ``cuda`` gets an index (this process's local rank), because
    ``torch.cuda.set_device`` and NCCL need one.
    """
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto"
            )
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ConfigError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32 (``auto``: bf16 on CUDA only)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        raise ConfigError(f"bf16 is not supported on {device}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def memory_format(device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> torch.memory_format:
    """The activation layout to use for conv nets on ``device`` (optionally under bf16/fp16 autocast).

    ``channels_last`` on CUDA, and on CPU in fp32: oneDNN convolutions run natively in
    NHWC there. Under autocast on CPU plain NCHW is faster, because the GroupNorms run
    in fp32 and their channels_last backward kernel is slow (``benchmarks/train_cpu.py``
    with ``--bf16``: about 1.3x slower per step in NHWC than in NCHW).
    """
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and autocast_dtype in (None, torch.float32)):
        return torch.channels_last
    return torch.contiguous_format


def optimize_for_device(
    model: nn.Module, device: torch.device | str, autocast_dtype: torch.dtype | None = None
) -> nn.Module:
    """Move ``model`` to ``device`` in its fastest memory format (in place); returns it.

    Pass the autocast dtype the model will be trained under, if any (see :func:`memory_format`).
    """
    return model.to(device=device, memory_format=memory_format(device, autocast_dtype))


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> AdamW:
    """AdamW (Loshchilov & Hutter 2019): :class:`.adamw.AdamW`, torch's fused single-kernel update where this
    build has it for the parameters' device (it saves a dozen small kernel launches per parameter tensor); the
    update runs where the parameters live.
    """
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def enable_tf32(device: torch.device | str) -> None:
    """On CUDA, let fp32 matmuls and convolutions run on TF32 tensor cores (process-wide; no-op elsewhere).

    TF32 rounds the inputs of a product to a 10-bit mantissa and accumulates in fp32:
    about 8x the fp32 FLOP/s on A100/H100. Under bf16 autocast it only touches the
    few ops autocast keeps in fp32.
    """
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``; on CUDA the copy goes from pinned memory and does not block the host."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2.0 + 1.0


def compile_model(fn, device: torch.device | str, backend: str | None = None):
    """``(torch.compile(fn), None)``, or ``(fn, why)`` when this machine cannot compile for ``device``.

    Compilation is lazy, so a missing C++ compiler (CPU) or Triton (GPU) would otherwise
    surface as a crash in the first training step; compiling a one-line function first
    finds that out in seconds. ``backend`` defaults to inductor.
    """
    kw = {"backend": backend} if backend else {}
    try:
        torch.compile(_compile_probe, **kw)(torch.ones(8, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means: train without compiling
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return fn, f"{type(err).__name__}: {first}"[:300]
    return torch.compile(fn, **kw), None


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def busy_cores(window_s: float = 0.25) -> float:
    """How many cores other processes keep busy now: measured over ``window_s`` from /proc/stat (this
    process sleeps meanwhile), else the 1-minute load average."""
    before = _cpu_times()
    if before is not None:
        time.sleep(window_s)
        after = _cpu_times()
        if after is not None and after[1] > before[1]:
            idle = (after[0] - before[0]) / (after[1] - before[1])
            return max(0.0, 1.0 - idle) * (os.cpu_count() or 1)
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for(busy: float, cores: int) -> int:
    """Threads to run with on ``cores`` usable cores while other processes keep ``busy`` of them busy."""
    return max(1, min(cores, cores - int(busy + 0.5)))


def default_threads() -> int:
    """CPU threads for torch when --threads is not given: the cores this process may use, less those
    other processes keep busy right now (:func:`busy_cores`).

    PyTorch's OpenMP threads spin-wait for each other; when one of them shares a core with another
    busy process, every parallel region waits for it, and training slowed 10-40x on a 2-core machine
    with the other core busy (see benchmarks/RESULTS.md). Leaving busy cores alone avoids that.
    """
    return threads_for(busy_cores(), _usable_cores())


class OtherLoad:
    """Cores that *other* processes kept busy since the previous reading, without sleeping.

    /proc/stat counts every core's busy time; this process's own CPU time (``time.process_time``,
    all its threads, spin-waits included) is subtracted, so what is left is the rest of the machine,
    averaged over the whole interval rather than sampled for a moment. None where /proc/stat is missing.
    """

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float] | None:
        times = _cpu_times()
        if times is None:
            return None
        idle, total = times
        return time.monotonic(), (total - idle) / self._hz, time.process_time()

    def __call__(self) -> float | None:
        now = self._snapshot()
        before, self._last = self._last, now
        if now is None or before is None or now[0] - before[0] <= 0:
            return None
        busy_all = now[1] - before[1]
        mine = now[2] - before[2]
        return max(0.0, (busy_all - mine) / (now[0] - before[0]))


#: Seconds between two thread decisions: long enough to average out a burst, short enough to follow the
#: machine within a few log lines.
RECHECK_S = 10.0
_MIN_WINDOW_S = 0.1  # a first reading over less than this is noise: wait for the rest


class ThreadPolicy:
    """Torch's CPU threads that follow the machine (``--threads`` not given): re-decided now and then.

    The count is :func:`threads_for` the cores other processes kept busy since the last decision
    (:class:`OtherLoad`), so a burst of other work at start-up no longer fixes a whole run at one
    thread, and a run started on a busy machine takes the cores back when they free up. ``fixed``
    (``--threads``, else ``OMP_NUM_THREADS`` when set, as torchrun sets it per process) is used as given.
    Callers call :meth:`update` at natural pauses (log lines, between sampling batches); it returns
    the new count when it changed. ``others``, ``cores`` and ``clock`` are injectable for tests.
    """

    def __init__(
        self,
        fixed: int | None = None,
        device: torch.device | str = "cpu",
        *,
        every_s: float = RECHECK_S,
        others=None,
        cores: int | None = None,
        clock=time.monotonic,
    ):
        env = os.environ.get("OMP_NUM_THREADS", "")
        self.fixed = fixed or (int(env) if env.isdigit() and int(env) > 0 else None)
        self.cpu = torch.device(device).type == "cpu"
        self.every_s = every_s
        self.cores = cores or _usable_cores()
        self.clock = clock
        self.others = others if others is not None else (OtherLoad() if self.cpu and not self.fixed else None)
        self.started = clock()
        self.last: float | None = None
        self.threads = torch.get_num_threads()

    @property
    def adaptive(self) -> bool:
        return self.cpu and not self.fixed

    def start(self) -> int:
        """Decide now (from the load since this policy was made, at least ``_MIN_WINDOW_S``); returns the count."""
        if not self.cpu:
            return torch.get_num_threads()
        if self.fixed:
            return self._set(self.fixed)
        wait = _MIN_WINDOW_S - (self.clock() - self.started)
        if wait > 0 and self.clock is time.monotonic:
            time.sleep(wait)
        return self._decide()

    def update(self) -> int | None:
        """Re-decide if ``every_s`` passed since the last decision; the new count if it changed, else None."""
        if not self.adaptive or (self.last is not None and self.clock() - self.last < self.every_s):
            return None
        before = self.threads
        n = self._decide()
        return n if n != before else None

    def _decide(self) -> int:
        busy = self.others() if self.others is not None else None
        self.last = self.clock()
        if busy is None:  # no /proc/stat: the old sampled reading
            busy = busy_cores()
        return self._set(threads_for(busy, self.cores))

    def _set(self, n: int) -> int:
        self.threads = n
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n
