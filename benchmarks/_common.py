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


def diffusers_version() -> str | None:
    """diffusers' version, or None (after saying how to install it on stderr) where it is missing."""
    import sys

    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return None
    return diffusers.__version__


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
    """diffusers' UNet2DModel with the layout of our ``UNetConfig`` ``cfg``: the config ``diffuse export`` writes."""
    from diffusers import UNet2DModel

    from diffuse_cli.engine.diffusers_io import unet_config

    return UNet2DModel.from_config(unet_config(cfg))


def write_synthetic_pngs(args: tuple[str, int, int, int, bool]) -> None:
    """Write images ``start .. stop - 1`` of a synthetic RGB folder (``size`` x ``size``: a colour gradient plus
    noise, seeded per image), into sub-folders of 1,000 when ``nested``; ``args`` is one tuple so a process pool
    can map it."""
    import numpy as np
    from PIL import Image

    folder, start, stop, size, nested = args
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        c0, cx, cy = rng.uniform(0, 255, (3, 3))
        img = c0 + cx * x[..., None] * 0.5 + cy * y[..., None] * 0.5 + rng.normal(0, 12, (size, size, 3))
        sub = Path(folder) / f"{i // 1000:03d}" if nested else Path(folder)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(sub / f"{i:06d}.png")
