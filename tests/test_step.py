"""The training step (engine/step.py): classifier-free guidance's label drops and its random-number stream,
the labels a model needs, and the compiled step against the eager reference."""

import math

import pytest
import torch

from diffuse_cli.engine import step as step_mod
from diffuse_cli.engine.config import AUGMENT_DIM, DiffusionConfig, TrainConfig, UNetConfig
from diffuse_cli.engine.data import load_dataset
from diffuse_cli.engine.errors import ConfigError

K = 3  # classes
# The compiled-step test's model: DDPM's layout, scaled down to 8x8 digits.
MODEL = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.1)  # fmt: skip
DIFF = DiffusionConfig(schedule="cosine", timesteps=100)


def _step(num_classes, labels, **cfg):
    mc = UNetConfig.preset("tiny", 8, 1, num_classes=num_classes)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return step_mod.make_train_step(
        mc, DiffusionConfig(timesteps=50), TrainConfig(batch_size=16, **cfg), images, torch.device("cpu"), labels=labels
    )


def test_label_drops_are_drawn_after_the_unconditional_numbers():
    labels = torch.arange(40) % K
    plain, cond = _step(0, None), _step(K, labels, cond_drop=0.5)
    for k in range(3):  # within a step: the drops shift the stream of the steps after, never this one's numbers
        plain.gen.manual_seed(k)
        cond.gen.manual_seed(k)
        x0, t, eps, y0, _ = plain.draw()
        cx0, ct, ceps, y, _ = cond.draw()
        assert y0 is None
        assert torch.equal(x0, cx0) and torch.equal(t, ct) and torch.equal(eps, ceps)  # the same stream up to here
        assert y.dtype == torch.long and ((y >= 0) & (y <= K)).all()


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_labels_are_dropped_at_the_asked_rate(drop):
    labels = torch.arange(40) % K
    ts = _step(K, labels, cond_drop=drop)
    ys = torch.cat([ts.draw()[3] for _ in range(200)])  # 3,200 labels
    rate = float((ys == K).float().mean())
    assert abs(rate - drop) < 4 * math.sqrt(max(drop * (1 - drop), 1e-9) / ys.numel()) + 1e-9
    ts2 = _step(K, labels, cond_drop=drop)
    loss = ts2(0)
    assert torch.isfinite(loss) and ts2.model.class_emb.weight.grad is not None


def test_step_refuses_labels_and_models_that_do_not_match():
    with pytest.raises(ConfigError, match="needs labels"):
        _step(K, None)
    with pytest.raises(ConfigError, match="needs labels"):
        _step(0, torch.zeros(40, dtype=torch.long))


def test_compiled_and_eager_steps_agree():
    """The compiled step (a backend that runs on any CPU) computes the eager step's losses and weights."""
    digits = load_dataset("builtin:digits")
    cfg_ = TrainConfig(steps=6, batch_size=8, save_every=3, sample_every=0, log_every=1, warmup=2, hflip=True)
    eager = step_mod.make_train_step(MODEL, DIFF, cfg_, digits.images, torch.device("cpu"))
    comp = step_mod.make_train_step(MODEL, DIFF, cfg_, digits.images, torch.device("cpu"))
    assert comp.compile(backend="aot_eager") is None
    for k in range(3):
        torch.testing.assert_close(comp(k), eager(k), rtol=1e-5, atol=1e-6)  # the same losses
    fresh = step_mod.make_train_step(MODEL, DIFF, cfg_, digits.images, torch.device("cpu"))
    # Compare what the networks compute, not raw weights: where a gradient is zero in exact arithmetic
    # (biases a GroupNorm removes) Adam turns rounding noise into full-size steps (see test_system_distributed.py).
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0, 99, 16).long()
    with torch.no_grad():
        out = {name: ts.model.eval()(x, t) for name, ts in (("fresh", fresh), ("eager", eager), ("compiled", comp))}
    moved = (out["eager"] - out["fresh"]).abs().max().item()
    apart = (out["compiled"] - out["eager"]).abs().max().item()
    assert moved > 1e-3 and apart < 0.01 * moved, (moved, apart)


# --- non-leaking augmentation (Karras et al. 2022, app. C.4) -----------------------------------------
def _aug_step(augment_dim: int, p: float, seed: int = 0):
    mc = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=(), dropout=0.0, augment_dim=augment_dim)  # fmt: skip
    images = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    tc = TrainConfig(batch_size=8, augment=p, seed=seed)
    return step_mod.make_train_step(mc, DiffusionConfig(timesteps=50), tc, images, torch.device("cpu"))


def test_step_draws_after_everything_else_and_trains_the_conditioning():
    plain, off, on = _aug_step(0, 0.0), _aug_step(AUGMENT_DIM, 0.0), _aug_step(AUGMENT_DIM, 1.0)
    (x0, t, eps, y, aug), (ox0, ot, oeps, _, oaug), (nx0, nt, neps, _, naug) = plain.draw(), off.draw(), on.draw()
    assert aug is None and y is None and not oaug.any() and naug.shape == (8, AUGMENT_DIM)
    assert torch.equal(x0, ox0) and torch.equal(t, ot) and torch.equal(eps, oeps)  # the same stream before
    assert torch.equal(t, nt) and torch.equal(eps, neps) and not torch.equal(x0, nx0)
    before = on.model.aug_emb.weight.detach().clone()
    for k in range(3):  # the zero-initialised output layers pass no gradient back on the first step
        on(k)
    assert not torch.equal(on.model.aug_emb.weight, before)


def test_augment_needs_the_conditioning():
    with pytest.raises(ConfigError, match="augmentation conditioning"):
        _aug_step(0, 0.5)
    with pytest.raises(ConfigError, match="--augment"):
        TrainConfig(augment=1.5)
    with pytest.raises(ConfigError, match="augment_dim"):
        UNetConfig(augment_dim=3)
