"""`diffuse sample` in the engine (engine/sample_files.py): the job prepared before any work (every mistake
reported before the model runs), the images generated, and the files they are written to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import sample_files as sf
from diffuse_cli.engine import samplers
from diffuse_cli.engine.errors import ConfigError, OutputError


def test_nothing_to_write_or_guidance_without_a_class_is_refused(shared_run):
    with pytest.raises(ConfigError, match="nothing to write: give --out, --grid or --gif"):
        sf.prepare(shared_run, 2, out=None)
    with pytest.raises(ConfigError, match="give --class too"):
        sf.prepare(shared_run, 2, out=None, grid="g.png", guidance=2.0)


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_an_unconditional_job(shared_run, tmp_path, sampler):
    job = sf.prepare(shared_run, 3, out=tmp_path / "imgs", sampler=sampler, device="cpu")
    assert job.num == 3 and job.classes is None and job.known_classes == 0 and job.guidance == 1.0
    assert job.steps == samplers.default_steps(sampler, 50)
    assert job.options == ({"clip_x0": True, "eta": 0.0} if sampler == "ddim" else {"clip_x0": True})
    assert (tmp_path / "imgs").is_dir()  # the output folder is ready before any sampling


def test_eta_goes_to_the_engine_that_says_where_it_applies(shared_run, tmp_path):
    job = sf.prepare(shared_run, 1, out=None, grid=tmp_path / "g.png", sampler="ddpm", eta=0.5, clip=False)
    assert job.options == {"clip_x0": False, "eta": 0.5}


def test_a_class_job_asks_for_num_of_each_class_in_the_order_given(class_run, tmp_path):
    _, run = class_run
    job = sf.prepare(run, 2, out=tmp_path / "o", classes=["red", "0", "red"], guidance=3.0, steps=4)
    assert job.known_classes == 2 and job.class_names == ("red", "blue", "red") and job.per_class == 2
    assert job.num == 6 and job.classes.tolist() == [1, 1, 0, 0, 1, 1] and job.guidance == 3.0 and job.steps == 4
    with pytest.raises(ConfigError, match="unknown class 'green'"):
        sf.prepare(run, 2, out=tmp_path / "o", classes=["green"])
    with pytest.raises(ConfigError, match="--guidance"):
        sf.prepare(run, 2, out=tmp_path / "o", classes=["red"], guidance=-1.0)


def test_earlier_images_and_files_in_the_way_are_refused_before_sampling(shared_run, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0000.png").write_bytes(b"")
    with pytest.raises(OutputError, match="already holds 1 generated images"):
        sf.prepare(shared_run, 1, out=tmp_path / "imgs")
    sf.prepare(shared_run, 1, out=tmp_path / "imgs", overwrite=True)
    assert not (tmp_path / "imgs" / "0000.png").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError):
        sf.prepare(shared_run, 1, out=None, grid=tmp_path / "afile" / "g.png")


def test_run_is_seeded_and_in_the_model_range(shared_run):
    job = sf.prepare(shared_run, 3, out=None, grid="g.png", sampler="ddim", steps=3, device="cpu")
    a, b, c = sf.run(job, seed=1), sf.run(job, seed=1, batch_size=2), sf.run(job, seed=2)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32 and a.abs().max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)  # an image's noise does not depend on the batch


def test_save_names_pads_and_tags_with_safe_class_names(shared_run, tmp_path):
    job = sf.prepare(shared_run, 3, out=None, grid="g.png", device="cpu")
    images = torch.linspace(-1, 1, 3 * 64).reshape(3, 1, 8, 8)
    sf.save(job, images, out=tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    with Image.open(tmp_path / "a" / "0002.png") as im:
        assert np.array_equal(np.asarray(im), ((images[2, 0] + 1) * 127.5).round().to(torch.uint8).numpy())
    wide = dataclasses.replace(job, num=12345)
    sf.save(wide, images[:1], out=tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["00000.png"]  # as many digits as the last index
    images = torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8)
    tagged = dataclasses.replace(job, num=4, classes=torch.tensor([0, 0, 1, 1]), class_names=("sea lion", "../x"),
                                 per_class=2)  # fmt: skip
    sf.save(tagged, images, out=tmp_path / "c", grid=tmp_path / "grid.png")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "0000-sea_lion.png", "0001-sea_lion.png", "0002-x.png", "0003-x.png"]  # fmt: skip
    with Image.open(tmp_path / "grid.png") as g:  # one row per class: 2 x 2 images of 8 px, 2 px padding, upscaled
        assert g.size == (22 * 24, 22 * 24)  # 24 = ceil(512 / 22)
