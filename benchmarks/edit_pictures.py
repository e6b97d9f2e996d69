"""The README's editing pictures, made by real `diffuse` runs on the held-out digits model (issue #21).

    python -m benchmarks.edit_pictures docs/

- ``inpaint.png``: `diffuse inpaint` of held-out digits with their lower half masked: input | hole | mask | 8 results.
- ``sdedit.png``: `diffuse sample --init sketch.png --strength S` (DPM-Solver++), one row per S (0 ... 1).
- ``interpolate.png``: `diffuse interpolate` between two held-out digits, DDIM inversion + slerp (top) and
  DDPM fig. 8's noise-and-mix at t = T/2 (bottom).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffuse_cli.engine import images as img

from ._digits_quality import digits
from ._trained import SPECS, cache_dir

MODEL = "digits16-eps-half"
STRENGTHS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)


def diffuse(*args) -> None:
    cmd = [sys.executable, "-m", "diffuse_cli", *map(str, args), "--device", "cpu"]
    print("$ diffuse", " ".join(map(str, args)))
    # one thread: on a shared machine two spin-waiting OpenMP threads are many times slower than one
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def read(folder: Path, n: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / f"{i:04d}.png")))[None] for i in range(n)])


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = cache_dir() / f"{SPECS[MODEL].key()}.safetensors"
    assert model.exists(), f"train it first: python -m benchmarks._trained {MODEL}"
    held, _ = digits(16, "heldout")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i in (0, 3, 7):
            Image.fromarray(held[i, 0].numpy(), "L").save(tmp / f"digit{i}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[8:] = 255  # white = fill in
        Image.fromarray(mask, "L").save(tmp / "lower.png")
        rows = []
        for i in (0, 3, 7):
            diffuse("inpaint", model, tmp / f"digit{i}.png", "--mask", tmp / "lower.png", "--num", 8,
                    "--out", tmp / f"inpaint{i}", "--grid", tmp / f"grid{i}.png", "--batch-size", 8)  # fmt: skip
            rows.append(Image.open(tmp / f"grid{i}.png"))
        grid = Image.new("L", (rows[0].width, sum(r.height for r in rows)))
        for k, r in enumerate(rows):
            grid.paste(r.convert("L"), (0, k * r.height))
        img.save_image(grid, out / "inpaint.png")

        sketch = Image.new("L", (16, 16), 0)  # a crude "7": two strokes
        draw = ImageDraw.Draw(sketch)
        draw.line([(4, 3), (12, 3)], fill=255, width=2)
        draw.line([(12, 3), (6, 13)], fill=255, width=2)
        sketch.save(tmp / "sketch.png")
        edits = []
        for s in STRENGTHS:
            diffuse("sample", model, "--init", tmp / "sketch.png", "--strength", s, "--num", 8, "--out",
                    tmp / f"s{s}")  # fmt: skip
            edits.append(torch.cat([torch.from_numpy(np.array(sketch))[None, None], read(tmp / f"s{s}", 8)]))
        img.save_image(img.upscale(img.make_grid(torch.cat(edits), nrow=9, pad_value=128), 512), out / "sdedit.png")

        for method in ("ddim", "noise"):
            diffuse("interpolate", model, tmp / "digit3.png", tmp / "digit7.png", "--frames", 8, "--method", method,
                    "--out", tmp / f"{method}.png")  # fmt: skip
        a, b = Image.open(tmp / "ddim.png"), Image.open(tmp / "noise.png")
        both = Image.new(a.mode, (a.width, a.height + b.height))
        both.paste(a, (0, 0))
        both.paste(b, (0, a.height))
        img.save_image(both, out / "interpolate.png")
    print(f"wrote {out}/inpaint.png, sdedit.png, interpolate.png")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
