"""Tests for diffuse_cli.engine.adamw: the AdamW outside torch.optim against torch.optim.AdamW, its state, its imports."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from diffuse_cli.engine import adamw as A
from diffuse_cli.engine.errors import CheckpointError

FUSED_CPU = A.fused_available(torch.device("cpu"))


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A conv weight in channels_last (the U-Net's layout), a matrix and a bias."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return [torch.nn.Parameter(conv), torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]  # fmt: skip


def _run(opt, params, steps: range, lrs=(1e-3, 2e-3, 3e-3, 3e-3, 3e-3, 3e-3)) -> None:
    """Steps with gradients of a fixed random quadratic (so both optimizers see the same gradients)
    and a warming-up learning rate, as the training loop sets it."""
    for k in steps:
        g = torch.Generator().manual_seed(100 + k)
        opt.param_groups[0]["lr"] = lrs[k % len(lrs)]
        opt.zero_grad(set_to_none=True)
        loss = sum(((p - torch.randn(p.shape, generator=g)) ** 2 * (1 + k)).sum() for p in params)
        loss.backward()
        opt.step()


def _torch_adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, **kw)


def _ours(params):
    return A.AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


@pytest.mark.skipif(not FUSED_CPU, reason="this torch has no fused AdamW on CPU")
def test_fused_path_is_bit_identical_to_torch_fused_adamw():
    ours, theirs = _params(), _params()
    _run(_ours(ours), ours, range(6))
    _run(_torch_adamw(theirs, fused=True), theirs, range(6))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("fused", [False, True])
def test_equals_torch_adamw_to_float_tolerance_with_weight_decay(monkeypatch, fused):
    """Both paths (fused kernel, _foreach formula) against torch.optim.AdamW's reference loop."""
    if fused and not FUSED_CPU:
        pytest.skip("this torch has no fused AdamW on CPU")
    monkeypatch.setattr(A, "fused_available", lambda device: fused)
    ours, theirs = _params(), _params()
    opt = _ours(ours)
    _run(opt, ours, range(6))
    _run(_torch_adamw(theirs, foreach=False), theirs, range(6))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert a.stride() == b.stride()
    assert all(float(st["step"]) == 6 for st in opt.state.values())
    start = _params()  # the weights moved (a test of equal no-ops would pass trivially)
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(ours, start, strict=True))


def test_first_step_matches_the_closed_form():
    """Step 1: m = (1 - b1) g, v = (1 - b2) g^2, so the update is lr g / (|g| + eps') after weight decay."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = A.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)
    g = torch.tensor([0.3, -4.0, 1e-3])
    p.grad = g.clone()
    opt.step()
    decayed = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5)
    torch.testing.assert_close(p.detach(), decayed - 0.1 * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("direction", ["torch to ours", "ours to torch"])
def test_a_state_moves_between_torch_adamw_and_ours_and_training_continues_identically(direction):
    """Training states written by earlier diffuse versions (torch.optim.AdamW) resume here, and the reverse."""
    make_first, make_second = (
        ((lambda p: _torch_adamw(p, fused=FUSED_CPU)), _ours)
        if direction == "torch to ours"
        else (_ours, (lambda p: _torch_adamw(p, fused=FUSED_CPU)))
    )
    first = _params()
    opt = make_first(first)
    _run(opt, first, range(3))
    saved = copy.deepcopy(opt.state_dict())  # as through a file: both state_dicts share the live tensors
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = make_second(second)
    opt2.load_state_dict(saved)
    _run(opt, first, range(3, 6))
    _run(opt2, second, range(3, 6))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_loaded_moments_take_the_parameters_layout():
    """safetensors stores the moments contiguous; a channels_last parameter gets channels_last moments back."""
    params = _params()
    opt = _ours(params)
    _run(opt, params, range(2))
    sd = opt.state_dict()
    sd["state"] = {i: {k: v.contiguous() for k, v in st.items()} for i, st in sd["state"].items()}
    opt2 = _ours(params)
    opt2.load_state_dict(sd)
    for p in params:
        assert all(opt2.state[p][k].stride() == p.stride() for k in ("exp_avg", "exp_avg_sq"))
        assert all(torch.equal(opt2.state[p][k], opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def _amsgrad(sd):
    sd["param_groups"][0]["amsgrad"] = True


def _fewer(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]


def _other_shape(sd):
    sd["state"][1]["exp_avg"] = torch.zeros(3)


def _no_moment(sd):
    del sd["state"][0]["exp_avg_sq"]


def _unknown_index(sd):
    sd["state"][7] = sd["state"][0]


@pytest.mark.parametrize("damage", [_amsgrad, _fewer, _other_shape, _no_moment, _unknown_index])
def test_a_state_that_is_not_adamw_over_these_parameters_is_refused(damage):
    params = _params()
    opt = _ours(params)
    _run(opt, params, range(1))
    sd = opt.state_dict()
    damage(sd)
    with pytest.raises(CheckpointError, match="optimizer state"):
        _ours(_params()).load_state_dict(sd)


def test_a_training_step_and_its_state_never_import_torch_dynamo():
    """torch.optim imports torch._dynamo on every optimizer call: about 2 CPU s of every run's start-up."""
    code = (
        "import sys, torch\n"
        "from diffuse_cli.engine.config import DiffusionConfig, TrainConfig, UNetConfig\n"
        "from diffuse_cli.engine import rundir, step\n"
        "m = UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,\n"
        "               attention_resolutions=())\n"
        "ts = step.make_train_step(m, DiffusionConfig(timesteps=10), TrainConfig(batch_size=2, steps=1),\n"
        "                          torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.device('cpu'))\n"
        "ts(0)\n"
        "rundir.state_tensors(ts.model, ts.ema.model, ts.opt, ts.gen, torch.device('cpu'))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
