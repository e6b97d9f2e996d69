import os

import pytest

os.environ.setdefault("COLUMNS", "120")
# Training and sampling run on one thread whatever the machine's load (device.ThreadPolicy honours
# OMP_NUM_THREADS as it honours --threads), so no result depends on what else the machine is doing.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["DIFFUSE_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="diffuse-test-cache-")  # never ~/.cache


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: the CLI's default outputs (samples/, runs/) never land in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def photo(tmp_path):
    """A small synthetic RGB 'photo' with structure (gradients and a disc)."""
    import numpy as np
    from PIL import Image

    h, w = 96, 128
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 / w).astype(np.uint8)
    g = (y * 255 / h).astype(np.uint8)
    b = (((x - 64) ** 2 + (y - 48) ** 2 < 900) * 255).astype(np.uint8)
    p = tmp_path / "photo.png"
    Image.fromarray(np.stack([r, g, b], -1), "RGB").save(p)
    return p


def pytest_configure(config):
    # The test models are tiny: one thread is as fast as two, and it cannot stall in OpenMP
    # spin-waits when another process (a torchrun test, a busy CI neighbour) holds the other core.
    import torch

    torch.set_num_threads(1)
