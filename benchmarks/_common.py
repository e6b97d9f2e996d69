"""Shared by the benchmarks: the RESULTS.md sections, the machine's name, diffusers' twin of our U-Net."""

from __future__ import annotations

import platform
from pathlib import Path


def replace_section(path: Path, section: str, start: str, end: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) in place of the old one, or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in old and end in old:
        pre, rest = old.split(start, 1)
        new = pre + section + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def diffusers_model(cfg):
    """diffusers' UNet2DModel with the layout of our ``UNetConfig`` ``cfg`` (the same function; see tests/test_unet.py)."""
    from diffusers import UNet2DModel

    res = cfg.resolutions
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults), layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if r in cfg.attention_resolutions else "DownBlock2D" for r in res),
        up_block_types=tuple("AttnUpBlock2D" if r in cfg.attention_resolutions else "UpBlock2D" for r in reversed(res)),
        attention_head_dim=None,  # one head of the full width, as in DDPM and in our config
        dropout=cfg.dropout,
    )  # fmt: skip
