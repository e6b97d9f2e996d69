"""Speed settings per device that leave the math unchanged.

Two functions, shared by the training loop and ``benchmarks/train_cpu.py``:

* :func:`optimize_for_device` moves a model to its device in the memory format
  its convolutions run fastest in there (``channels_last``: oneDNN on CPU and
  cuDNN on recent GPUs work in NHWC natively, so no layout reorder per conv);
* :func:`make_optimizer` builds AdamW with the fused single-kernel update when
  this torch build has it for the device, else the default implementation.

Inputs need no conversion: a conv whose weight is ``channels_last`` returns a
``channels_last`` activation, and the U-Net keeps that layout from then on.
Measured numbers live in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The activation layout to use for conv nets on ``device``."""
    kind = torch.device(device).type
    return torch.channels_last if kind in ("cpu", "cuda") else torch.contiguous_format


def optimize_for_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``model`` to ``device`` in its fastest memory format (in place); returns it."""
    return model.to(device=device, memory_format=memory_format(device))


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    device: torch.device | str,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019), fused into one kernel when the build supports it on ``device``.

    The fused and the per-parameter implementations compute the same update; the
    fused one saves a dozen small kernel launches per parameter tensor.
    """
    params = list(params)
    kind = torch.device(device).type
    if kind in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # torch < 2.4 has no fused AdamW on CPU
            pass
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
