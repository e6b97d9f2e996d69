"""Models for sampling (engine/models.py): building a U-Net from a checkpoint, its classes by name or id, and the
errors for models and classes that do not match."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import models
from diffuse_cli.engine.errors import CheckpointError, ConfigError


def _ck(num_classes=0, classes=None, path="m.safetensors") -> ckpt.Checkpoint:
    dataset = {} if classes is None else {"classes": classes}
    return ckpt.Checkpoint(Path(path), "model", {}, {"num_classes": num_classes}, {}, dataset=dataset)


@pytest.mark.parametrize(
    "num_classes, classes, names",
    [(0, None, []), (2, ["cat", "dog"], ["cat", "dog"]), (3, None, ["0", "1", "2"]),  # no names stored: the ids
     (3, ["a", "b"], ["0", "1", "2"]),  # names that do not match the model's classes: the ids
     (2, [1, 2], ["1", "2"]), (-1, None, []), ("2", ["a", "b"], []), (None, None, [])],  # edited metadata
)  # fmt: skip
def test_class_names(num_classes, classes, names):
    assert models.class_names(_ck(num_classes, classes)) == names


def test_class_ids_by_name_or_id_in_the_order_asked():
    ck = _ck(3, ["red", "green", "7"])
    assert models.class_ids(ck, ["green", "0", "red", "green"]) == ([1, 0, 0, 1], ["green", "red", "red", "green"])
    assert models.class_ids(ck, ["7"]) == ([2], ["7"])  # a name wins over the id it looks like
    assert models.class_ids(ck, [" 1 "]) == ([1], ["green"])
    assert models.class_ids(ck, []) == ([], [])


@pytest.mark.parametrize(
    "asked, pattern",
    [(["blue"], r"unknown class 'blue'; this model knows red, green, 7 \(a name or an id 0..2\)"),
     (["3"], "unknown class '3'"), (["-1"], "unknown class '-1'"), (["1.0"], "unknown class '1.0'"),
     (["Red"], "unknown class 'Red'"), ([""], "unknown class ''"), (["red", "nope"], "unknown class 'nope'")],
)  # fmt: skip
def test_class_ids_refuses_unknown_classes(asked, pattern):
    with pytest.raises(ConfigError, match=pattern):
        models.class_ids(_ck(3, ["red", "green", "7"]), asked)


def test_class_ids_of_a_model_without_classes():
    with pytest.raises(ConfigError, match=r"m.safetensors was trained without classes, so --class cannot choose one"):
        models.class_ids(_ck(0), ["0"])


def test_a_long_class_list_is_cut_in_the_message():
    names = [f"c{i}" for i in range(100)]
    with pytest.raises(ConfigError) as err:
        models.class_ids(_ck(100, names), ["nope"])
    msg = str(err.value)
    assert "c39, ... (100 in all)" in msg and "c40" not in msg and "id 0..99" in msg


def test_load_for_sampling_a_run_a_model_file_and_a_state(shared_run):
    model, diffusion, ck = models.load_for_sampling(shared_run)
    assert ck.kind == "model" and ck.step == 4 and not model.training and diffusion.num_timesteps == 50
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 40])
    with torch.no_grad():
        out = model(x, t)
        same, _, _ = models.load_for_sampling(shared_run / ckpt.MODEL_FILE)
        assert torch.equal(same(x, t), out)
        ema, _, st = models.load_for_sampling(ckpt.state_path(shared_run, 4))  # a state samples with its EMA
        assert st.kind == "state" and torch.equal(ema(x, t), out)
    assert models.class_names(ck) == []


def test_build_model_refuses_inconsistent_metadata(shared_run):
    ck = ckpt.load(shared_run / ckpt.MODEL_FILE)
    ck.dataset = {**ck.dataset, "channels": 3, "image_size": 8}
    with pytest.raises(CheckpointError, match="inconsistent model config: 1x8x8 images, but it was trained on 3x8x8"):
        models.build_model(ck)
    ck = ckpt.load(shared_run / ckpt.MODEL_FILE)
    ck.model = {**ck.model, "base_channels": "many"}
    with pytest.raises(CheckpointError, match="invalid model config"):
        models.build_model(ck)
