"""Processes: this process's place in a torchrun job, and stop requests every rank agrees on.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`init_distributed` reads them once
(NCCL on CUDA, gloo elsewhere). Without torchrun everything here is a no-op on one process.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .device import resolve_device
from .errors import OutputError


@dataclass
class Dist:
    """This process's place in a torchrun job (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of ``x`` over all ranks (a collective: call it on all ranks)."""
        if not self.enabled:
            return x
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank (a collective: call it on all ranks)."""
        if not self.enabled:
            return flag
        x = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return bool(x.item() > 0)

    def main_only(self, fn: Callable[[], None], device: torch.device) -> None:
        """Run ``fn`` on rank 0 only; if it fails there, every rank raises (a collective: call it on all ranks).

        Without the agreement the other ranks would wait for rank 0 in their next collective
        until torchrun killed them.
        """
        err: Exception | None = None
        if self.is_main:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised below once every rank knows
                err = e
        if self.any(err is not None, device):
            if err is not None:
                raise err
            raise OutputError("stopped because rank 0 failed (its error is reported above)")

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Set up the process group from torchrun's environment (NCCL on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    here = False
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
        here = True
    return Dist(rank, world, local_rank, here), device


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so it can save before exiting."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            # Except under torchrun: a terminal's Ctrl-C can reach a worker twice (directly, and
            # forwarded by the agent), and the agent itself kills workers that outlive its timeout.
            if "TORCHELASTIC_RUN_ID" in os.environ:
                return
            if callable(self._old.get(signum)):  # what the signal did before us (the CLI's SIGTERM -> exit 143)
                self._old[signum](signum, frame)
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def launched_rank() -> int:
    """This process's global rank as torchrun announced it (0 without torchrun), before any process group exists."""
    return int(os.environ.get("RANK", "0"))
