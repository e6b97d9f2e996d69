"""The training plan (engine/plan.py): a new run takes each setting from its option, else the preset and the data;
--resume keeps the stored run's model, diffusion and classes and applies only the training options given again;
--classes none; --time without --steps."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from PIL import Image

from diffuse_cli.engine import plan as P
from diffuse_cli.engine.config import AUGMENT_DIM, UNLIMITED_STEPS, DiffusionConfig, UNetConfig
from diffuse_cli.engine.errors import ConfigError


def _plan(data="builtin:digits", out=None, **kw):
    return P.plan_training(data, out, preset=kw.pop("preset", "tiny"), device="cpu", cache=False, **kw)


def test_a_new_run_takes_its_options_else_the_preset_and_the_data(tmp_path):
    p = _plan(out=tmp_path / "r", train={"steps": 7, "lr": 3e-4, "batch_size": None},
              diffusion={"timesteps": 20, "schedule": "cosine", "prediction": None})  # fmt: skip
    assert not p.resume and p.out == tmp_path / "r"
    assert p.model == UNetConfig.preset("tiny", 8, 1, "cpu", num_classes=10)  # builtin:digits: 1x8x8, ten digits
    assert p.diffusion == DiffusionConfig(schedule="cosine", timesteps=20)
    assert p.train.steps == 7 and p.train.lr == 3e-4 and p.train.batch_size == 32  # the CPU's default batch
    assert p.data_line.startswith("builtin:digits: 1797 images used, 1x8x8, ")
    assert ("", "10 classes, images per class: 0 178, 1 182, 2 177, 3 183, 4 181, 5 182, 6 181, 7 179, 8 174, "
                "9 180") in p.notes  # fmt: skip


def test_the_default_out_is_runs_and_the_data_name():
    assert _plan().out == Path("runs/digits")


def test_model_options_parse_their_lists():
    p = _plan(model={"channel_mults": "1,2", "attention_resolutions": "", "base_channels": 16})
    assert p.model.channel_mults == (1, 2) and p.model.attention_resolutions == () and p.model.base_channels == 16
    with pytest.raises(ConfigError, match="--channel-mults"):
        _plan(model={"channel_mults": "1,x"})


def test_classes_none_plans_an_unconditional_model(tmp_path):
    p = _plan(classes="none")
    assert p.model.num_classes == 0 and p.data.labels is None and p.data.classes == ()
    assert not any("classes" in text for _, text in p.notes)


def test_few_images_per_class_are_warned_about(tmp_path):
    for name, n in (("big", 10), ("small", 3)):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), 10 * i).save(tmp_path / "d" / name / f"{i}.png")
    p = _plan(str(tmp_path / "d"))
    assert ("", "2 classes, images per class: big 10, small 3") in p.notes
    assert ("warning", "warning: this class has fewer than 10 images and may not be learned: small (3)") in p.notes


def test_time_without_steps_plans_unlimited_steps():
    p = _plan(train={"time_limit": "1m30s"})
    assert p.train.time_limit == 90 and p.train.steps == UNLIMITED_STEPS
    p = _plan(train={"time_limit": "2m", "steps": 40})
    assert p.train.time_limit == 120 and p.train.steps == 40  # both given: whichever ends first
    with pytest.raises(ConfigError, match="--time"):
        _plan(train={"time_limit": "soon"})


def test_resume_keeps_the_stored_run_and_applies_the_options_given_again(shared_run_copy):
    p = _plan(out=shared_run_copy, resume=True, classes="none", train={"steps": 9, "time_limit": "5m"},
              diffusion={"timesteps": 999}, model={"base_channels": 64}, preset="small")  # fmt: skip
    assert p.resume and p.diffusion is None  # training takes it from the stored state
    assert p.model.base_channels != 64 and p.model.image_size == 8 and p.model.num_classes == 0
    assert p.train.steps == 9 and p.train.time_limit == 300 and p.train.batch_size == 8  # stored batch kept
    assert p.data.labels is None  # the stored run is unconditional, as it was started


def test_resume_with_time_only_keeps_the_stored_steps(shared_run_copy):
    p = _plan(out=shared_run_copy, resume=True, train={"time_limit": "10s"})
    assert p.train.steps == 4 and p.train.time_limit == 10  # not UNLIMITED_STEPS: that is for new runs only


def test_resume_takes_size_and_channels_from_the_run(tmp_path, class_run):
    data, run = class_run
    import shutil

    shutil.copytree(run, tmp_path / "r")
    p = _plan(str(data), out=tmp_path / "r", resume=True, classes="none")
    assert p.data.images.shape[1:] == (3, 8, 8)  # the folder's 12 px images at the run's 8 px
    assert p.model.num_classes == 2 and p.data.classes == ("blue", "red")
    assert ("warning", "--classes none does not apply to --resume: the run keeps the classes it was started with") in (
        p.notes
    )


def test_resume_and_overwrite_together_are_refused_before_the_data_is_read(tmp_path):
    with pytest.raises(ConfigError, match="pass only one of them"):
        P.plan_training(str(tmp_path / "missing"), tmp_path / "r", resume=True, overwrite=True)


def test_one_class_folder_trains_unconditionally_and_says_why(tmp_path):
    (tmp_path / "d" / "only").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), 50 * i).save(tmp_path / "d" / "only" / f"{i}.png")
    p = _plan(str(tmp_path / "d"))
    assert p.model.num_classes == 0 and p.data.labels is None and p.data.notes
    assert P.class_notes(p.data) == [("warning", n) for n in p.data.notes]
    assert all(("warning", n) in p.notes for n in p.data.notes)


# --- small data: augmentation and dropout by data size (issue 23) ----------------------------------
def test_regularisation_by_data_size(monkeypatch):
    assert P.regularisation(5) == P.regularisation(100) == (0.12, 0.1)  # as measured on 100 16x16 digits
    assert P.regularisation(101) == P.regularisation(500) == P.regularisation(1797) == (0.0, None)
    monkeypatch.setattr(P, "SMALL_DATA", ((100, 0.3, 0.2), (200, 0.1, None)))  # first match wins
    assert P.regularisation(100) == (0.3, 0.2)
    assert P.regularisation(101) == (0.1, None)
    assert P.regularisation(201) == (0.0, None)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("few")
    for i in range(5):
        Image.new("L", (8, 8), 40 * i).save(d / f"{i}.png")
    return d


@pytest.mark.parametrize(
    "train,model,augment_dim,dropout,words",
    [({}, {}, AUGMENT_DIM, 0.1, "augment p = 0.2 and dropout 0.1 for 5 images, so they are not copied (--augment 0: off)"),
     ({"augment": 0.0}, {}, 0, 0.1, "dropout 0.1 for 5 images, so they are not copied"),
     ({"augment": 0.5}, {"dropout": 0.0}, AUGMENT_DIM, 0.0, None)],
)  # fmt: skip
def test_plan_fills_in_the_small_data_defaults(
    tmp_path, monkeypatch, small_folder, train, model, augment_dim, dropout, words
):
    monkeypatch.setattr(P, "SMALL_DATA", ((200, 0.2, 0.1),))  # a row as the table would hold it
    plan = P.plan_training(str(small_folder), tmp_path / "run", preset="tiny", train=train, model=model,
                         device="cpu", cache=False)  # fmt: skip
    assert plan.model.augment_dim == augment_dim and plan.model.dropout == dropout
    assert plan.train.augment == train.get("augment", 0.2)
    if words:
        assert plan.data_line.endswith(words)
    else:
        assert "not copied" not in plan.data_line


def test_plan_gives_a_small_folder_the_measured_defaults(tmp_path, small_folder):
    plan = P.plan_training(str(small_folder), tmp_path / "run", preset="tiny", device="cpu", cache=False)
    assert plan.train.augment == 0.12 and plan.model.augment_dim == AUGMENT_DIM and plan.model.dropout == 0.1
    assert plan.data_line.endswith(
        "augment p = 0.12 and dropout 0.1 for 5 images, so they are not copied (--augment 0: off)"
    )


def test_plan_leaves_the_full_digits_as_they_were(tmp_path):
    plan = P.plan_training("builtin:digits", tmp_path / "run", device="cpu", cache=False)
    assert P.regularisation(1797) == (0.0, None)
    assert plan.train.augment == 0.0 and plan.model.augment_dim == 0
    assert plan.model.dropout == UNetConfig.preset("auto", 8, 1).dropout and "not copied" not in plan.data_line


def test_plan_without_a_small_data_row_trains_a_small_folder_as_before(tmp_path, monkeypatch, small_folder):
    monkeypatch.setattr(P, "SMALL_DATA", ())
    plan = P.plan_training(str(small_folder), tmp_path / "run", preset="tiny", device="cpu", cache=False)
    assert plan.train.augment == 0.0 and plan.model.augment_dim == 0 and "not copied" not in plan.data_line
    assert plan.model.dropout == UNetConfig.preset("tiny", 8, 1).dropout


def test_train_help_states_the_small_data_defaults():
    from diffuse_cli.cli import train as cli_train

    (most, p, dropout), *_ = P.SMALL_DATA
    text = inspect.getsource(cli_train)
    assert f"[default: {p:g} for a folder of at most {most} images" in text
    assert f"[default: {dropout:g} for at most {most} images, else the preset's]" in text
