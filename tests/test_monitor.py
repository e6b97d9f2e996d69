"""The in-training evaluation (engine/monitor.py): exact models that copy or do not, the floor, the stored stats."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import monitor
from diffuse_cli.engine.analytic import GaussianData, GaussianMixture
from diffuse_cli.engine.data import load_builtin, load_dataset, to_model_range
from diffuse_cli.engine.diffusion import Diffusion, DiffusionConfig

N = 48  # training images (8x8 digits)


@pytest.fixture(scope="module")
def setup():
    images = load_builtin("digits").images[:N]
    x = to_model_range(images).reshape(N, -1).double()
    diffusion = Diffusion(DiffusionConfig(schedule="cosine", timesteps=100))
    # The exact denoiser of the training set itself (each image a component with a tiny spread) is the
    # perfect memoriser: it can only ever produce training images. The exact denoiser of a Gaussian fitted
    # to the same pixels makes new (blurry) images and copies none.
    copier = GaussianMixture(torch.ones(N), x, stds=torch.full((N,), 0.02)).model(diffusion)
    cov = torch.cov(x.T) + 1e-3 * torch.eye(x.shape[1], dtype=torch.float64)
    blur = GaussianData(x.mean(0), cov).model(diffusion)
    mon = monitor.Monitor(images, samples=32, batch_size=32)
    return mon, diffusion, copier, blur


def test_copying_model_is_caught_and_a_generalising_one_is_not(setup):
    mon, diffusion, copier, blur = setup
    new = mon(blur, diffusion, 1)
    assert new["near_copy"] < 0.1 and not new["copying"] and "warn" not in new and new["best"]
    copy = mon(copier, diffusion, 2)
    assert copy["near_copy"] >= 0.9 and copy["copying"] and "copying its training images" in copy["warn"]
    assert copy["near_copy_ref"] < 0.2 and copy["pixel_nn"] < 0.5 * copy["pixel_nn_ref"]
    # a copier draws from the data itself: its Frechet distance is at the real-vs-real floor, the blur's is not
    assert copy["fd"] < 2 * copy["fd_floor"] < new["fd"]
    assert copy["best"] and copy["best_step"] == 2 and mon.best_step == 2
    again = mon(copier, diffusion, 3)
    assert "warn" not in again  # said once per run
    assert not mon(blur, diffusion, 4)["best"] and mon.best_step == 2
    assert json.dumps({k: v for k, v in again.items()})  # the record goes to log.jsonl as it is


def test_fixed_seeds_give_the_same_numbers(setup):
    mon, diffusion, _, blur = setup
    a, b = mon(blur, diffusion, 5), mon(blur, diffusion, 6)
    assert a["fd"] == b["fd"] and a["kid"] == b["kid"]


def test_history_restores_best_step_and_warning(setup):
    mon, diffusion, copier, _ = setup
    resumed = monitor.Monitor(mon.images, samples=32, batch_size=32,
                              history=[{"step": 7, "fd": 1e-9, "copying": True}, {"step": 8, "fd": 5.0}])  # fmt: skip
    assert resumed.best_step == 7 and resumed.warned
    rec = resumed(copier, diffusion, 9)
    assert not rec["best"] and rec["best_step"] == 7 and "warn" not in rec


def test_floor_is_real_against_real_at_the_same_count():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1000, 8, generator=g)
    stats = monitor.RealStats(f.double().mean(0), torch.cov(f.double().T), f, 1000)
    small, large = monitor.floor(stats, 20), monitor.floor(stats, 400)
    # the Frechet distance of n Gaussian draws is biased by about tr(cov) (D + 1) / (2 n) for large n; KID is not
    assert small["fd_floor"] > large["fd_floor"] > 0
    assert abs(small["kid_floor"]) < 0.2 * small["fd_floor"]
    assert monitor.floor(stats, 10_000)["floor_count"] == 500  # capped at half, so the rest still fits a Gaussian


@pytest.mark.parametrize(
    ("step", "done", "due"),
    [(250, False, False), (500, False, True), (750, False, False), (1000, False, True), (1500, False, False),
     (2000, False, True), (3000, False, True), (300, True, False), (700, True, True)],
)  # fmt: skip
def test_eval_schedule(step, done, due):
    assert monitor.eval_due(step, 1000, done) is due
    assert not monitor.eval_due(step, 0, True)


def test_stats_are_stored_beside_the_cache_and_keyed_by_it(tmp_path, monkeypatch):
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / f"{i}.png")
    ds = load_dataset(folder, 8, cache_dir=tmp_path / "cache")
    store, key = monitor.stats_location(ds)
    assert store.name.endswith(".u8.stats.safetensors") and store.parent == tmp_path / "cache"
    first = monitor.real_stats(ds.images, store=store, key=key)
    assert store.exists()

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(monitor, "extract_features", boom)
    again = monitor.real_stats(ds.images, store=store, key=key)  # read back, not recomputed
    assert torch.equal(again.mean, first.mean) and torch.equal(again.features, first.features)
    with pytest.raises(AssertionError, match="recomputed"):  # another key (the folder changed): computed again
        monitor.real_stats(ds.images, store=store, key=key + "x")
    store.write_bytes(b"garbage")
    with pytest.raises(AssertionError, match="recomputed"):  # a damaged file is never trusted
        monitor.real_stats(ds.images, store=store, key=key)
    assert monitor.stats_location(load_builtin("digits")) == (None, None)  # no cache file: kept in memory
