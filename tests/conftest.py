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


# --- the session's one tiny trained run -------------------------------------------------------------------
# Trained once per test session (about a second on one CPU thread) and shared by every test that needs a
# finished run: read it through `shared_run`; a test that writes into a run (resume, eval's log, damage)
# takes `shared_run_copy`, its own copy.
SHARED_RUN_ARGS = ["--classes", "none", "--preset", "tiny", "--batch-size", "8", "--device", "cpu", "-T", "50",
                   "--kind", "cosine", "--steps", "4", "--save-every", "2", "--sample-every", "0"]  # fmt: skip


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """A finished unconditional run on builtin:digits (1x8x8, T = 50, cosine): states at steps 2 and 4,
    model.safetensors at step 4. Read-only: copy it (`shared_run_copy`) to write into it."""
    from helpers import invoke

    out = tmp_path_factory.mktemp("shared-run") / "digits"
    r = invoke("train", "builtin:digits", *SHARED_RUN_ARGS, "--out", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def shared_run_copy(shared_run, tmp_path):
    """The test's own copy of `shared_run`, to resume, damage or log into."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(shared_run, dst)
    return dst


@pytest.fixture(scope="session")
def class_run(tmp_path_factory):
    """(data folder, finished run) on two RGB classes, red and blue, of 3 images each (one in a nested folder),
    at 8x8, T = 50. Read-only."""
    from PIL import Image

    from helpers import TINY_TRAIN, invoke

    d = tmp_path_factory.mktemp("classes")
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(3):
            (d / name / ("nested" if i == 2 else "")).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), tuple(min(255, c + 10 * i) for c in colour)).save(
                d / name / ("nested" if i == 2 else "") / f"{i}.png"
            )
    out = tmp_path_factory.mktemp("crun") / "r"
    r = invoke("train", d, "--out", out, "--image-size", "8", *TINY_TRAIN, "-T", "50")
    assert r.exit_code == 0, r.output
    assert "2 classes, images per class: blue 3, red 3" in r.output
    assert "fewer than 10 images" in r.output and "blue (3), red (3)" in r.output
    return d, out
