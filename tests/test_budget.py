"""engine/budget.py: --precision auto on a CPU and the model sized for a --time budget (issue 25)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffuse_cli.engine import budget
from diffuse_cli.engine.config import UNetConfig

CPU = torch.device("cpu")
TINY = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                  attention_resolutions=())  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_cache():
    budget._cpu_precision.cache_clear()
    budget._cpu_speed.cache_clear()
    yield
    budget._cpu_precision.cache_clear()
    budget._cpu_speed.cache_clear()


def fake_speeds(monkeypatch, fn):
    """training_speed(config, batch, device, amp) -> img/s, without running anything."""
    monkeypatch.setattr(budget, "training_speed", lambda cfg, batch, device, amp, reps=2: fn(cfg, amp))


def test_measuring_leaves_the_runs_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    assert budget.training_speed(TINY, 4, CPU, None, reps=1) > 0
    assert budget.training_speed(TINY, 4, CPU, torch.bfloat16, reps=1) > 0
    assert torch.equal(torch.rand(4), expected)


def test_explicit_precisions_are_never_measured(monkeypatch):
    fake_speeds(monkeypatch, lambda cfg, amp: pytest.fail("measured"))
    assert budget.training_precision("fp32", TINY, 32, CPU) == (None, "")
    assert budget.training_precision("bf16", TINY, 32, CPU) == (torch.bfloat16, "")


@pytest.mark.parametrize(
    ("supported", "bf16_speed", "expected"),
    [(True, 150.0, torch.bfloat16), (True, 105.0, None), (True, 60.0, None), (False, 300.0, None)],
)
def test_auto_on_a_cpu_picks_bf16_only_where_it_is_measured_faster(monkeypatch, supported, bf16_speed, expected):
    monkeypatch.setattr(budget, "bf16_supported", lambda: supported)
    fake_speeds(monkeypatch, lambda cfg, amp: bf16_speed if amp is torch.bfloat16 else 100.0)
    amp, note = budget.training_precision("auto", TINY, 32, CPU)
    assert amp is expected
    assert note.startswith("auto:")
    if supported:
        assert f"{bf16_speed / 100:.2f}x" in note
    else:
        assert "no native bf16" in note


def test_auto_keeps_fp32_for_short_runs_and_several_processes(monkeypatch):
    monkeypatch.setattr(budget, "bf16_supported", lambda: True)
    fake_speeds(monkeypatch, lambda cfg, amp: pytest.fail("measured"))
    assert budget.training_precision("auto", TINY, 32, CPU, long_run=False) == (None, "")
    amp, note = budget.training_precision("auto", TINY, 32, CPU, processes=2)
    assert amp is None and "several processes" in note


def _rungs(base: UNetConfig) -> list[UNetConfig]:
    return [dataclasses.replace(base, **overrides) for _, overrides in budget.LADDER]


@pytest.mark.parametrize(("size", "rung"), [(16, 0), (16, 1), (28, 0), ((24, 40), 1)])
def test_the_largest_model_that_gets_enough_steps_is_chosen(monkeypatch, size, rung):
    """Speeds 100 and 200 img/s for the rungs: the budget that gives rung k just enough steps (a number
    proportional to the shorter side) picks it."""
    base = UNetConfig.preset("cpu", size, 1, "cpu")
    speeds = dict(zip(_rungs(base), (100.0, 200.0), strict=True))
    fake_speeds(monkeypatch, lambda cfg, amp: speeds[cfg])
    monkeypatch.setattr(budget, "bf16_supported", lambda: False)
    wanted = budget.MIN_STEPS_PER_SIDE * min(base.hw)
    seconds = wanted * 32 / (speeds[_rungs(base)[rung]] * budget.TRAINING_SHARE) * 1.001
    sized = budget.size_for_budget(base, seconds, 32)
    assert sized.model == _rungs(base)[rung]
    assert sized.img_per_s == speeds[sized.model]
    assert f"~{speeds[sized.model]:.0f} img/s" in sized.note
    assert budget.size_for_budget(base, seconds * 0.99, 32).model == _rungs(base)[min(rung + 1, 1)]
    # a budget too short for every rung gets the smallest
    assert budget.size_for_budget(base, 1.0, 32).model == _rungs(base)[-1]


def test_sizing_applies_only_to_new_auto_cpu_runs_with_a_time_budget(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert budget.wants_sizing(600.0, "auto", "cpu", False, resume=False)
    assert not budget.wants_sizing(None, "auto", "cpu", False, resume=False)
    assert not budget.wants_sizing(600.0, "cpu", "cpu", False, resume=False)
    assert not budget.wants_sizing(600.0, "auto", "cuda", False, resume=False)
    assert not budget.wants_sizing(600.0, "auto", "cpu", True, resume=False)
    assert not budget.wants_sizing(600.0, "auto", "cpu", False, resume=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not budget.wants_sizing(600.0, "auto", "cpu", False, resume=False)


def test_plan_sizes_the_model_for_time_and_keeps_todays_without(monkeypatch):
    from diffuse_cli.engine.plan import plan_training

    monkeypatch.setattr(budget, "bf16_supported", lambda: False)
    fake_speeds(monkeypatch, lambda cfg, amp: 1000.0 / cfg.base_channels / cfg.num_res_blocks)
    plain = plan_training("builtin:digits", None, train={"steps": 10}, cache=False)
    assert plain.model == UNetConfig.preset("cpu", 8, 1, "cpu", num_classes=10) and plain.sizing == ""
    timed = plan_training("builtin:digits", None, train={"time_limit": "2m"}, cache=False)
    assert timed.model != plain.model and timed.model in _rungs(plain.model)
    assert timed.sizing.startswith("sized for 2 min at ~")
    chosen = plan_training("builtin:digits", None, train={"time_limit": "2m"}, model={"base_channels": 48}, cache=False)
    assert chosen.model.base_channels == 48 and chosen.sizing == ""


def test_a_resumed_auto_run_keeps_the_precision_it_started_with(monkeypatch, tmp_path):
    """The first run measured bf16 as faster (faked); its resume must train in bf16 again without measuring,
    and say so, even where a new measurement would now say fp32."""
    from helpers import TINY_TRAIN, invoke

    monkeypatch.setattr(budget, "MIN_STEPS_TO_MEASURE", 1)
    monkeypatch.setattr(budget, "bf16_supported", lambda: True)
    fake_speeds(monkeypatch, lambda cfg, amp: 200.0 if amp is torch.bfloat16 else 100.0)
    run = tmp_path / "run"
    r = invoke("train", "builtin:digits", "--out", run, *TINY_TRAIN, "--steps", "4", "--eval-every", "0")
    assert r.exit_code == 0, r.output
    assert "precision bf16 (auto: bf16 autocast measured 2.00x faster" in " ".join(r.output.split())
    fake_speeds(monkeypatch, lambda cfg, amp: pytest.fail("measured again on resume"))
    r = invoke("train", "builtin:digits", "--out", run, "--resume", "--steps", "6", "--eval-every", "0")
    assert r.exit_code == 0, r.output
    assert "precision bf16 (auto: bf16, as the run was started)" in " ".join(r.output.split())
