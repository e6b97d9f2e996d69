"""Generate ``src/diffuse_cli/data/digits.bin.gz`` from scikit-learn's copy of the UCI digits.

Run once by a maintainer (``python scripts/make_digits.py``); the package reads the
result with the standard library and torch only, so neither scikit-learn nor numpy
pickles are needed at run time.

File format (gzip-compressed; the gzip trailer's CRC-32 guards against corruption):

    header  struct "<4sIBBB": magic b"DGT1", count N, height H, width W, max value M
    labels  N bytes, the digit 0..9 of each image
    pixels  N*H*W bytes, row-major, the original ink counts 0..M (M = 16; higher = more ink)

The script also prints the checksums pinned in ``tests/test_data.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "src" / "diffuse_cli" / "data" / "digits.bin.gz"
MAGIC = b"DGT1"


def main() -> None:
    bunch = load_digits()
    images = np.asarray(bunch.images)  # (1797, 8, 8) float64 holding integers 0..16
    labels = np.asarray(bunch.target)
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    pixels = images.astype(np.uint8)
    assert np.array_equal(pixels, images) and pixels.max() == 16 and pixels.min() == 0
    n, h, w = pixels.shape
    payload = struct.pack("<4sIBBB", MAGIC, n, h, w, 16) + labels.astype(np.uint8).tobytes() + pixels.tobytes()
    # mtime=0 so that regenerating gives a byte-identical file.
    OUT.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    scaled = (pixels.astype(np.int64) * 255 + 8) // 16  # round(x * 255 / 16), halves up
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    print(f"sum of raw values: {int(pixels.astype(np.int64).sum())}")
    print(f"sum of labels: {int(labels.sum())}")
    print(f"sha256 of the 0..255 uint8 images: {hashlib.sha256(scaled.astype(np.uint8).tobytes()).hexdigest()}")


if __name__ == "__main__":
    main()
