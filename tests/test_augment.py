"""Non-leaking augmentation (engine/augment.py) and its conditioning in the U-Net (the step's draws are in
test_step.py, the data-size defaults in test_plan.py).

Oracles: exact pixel operations (a flip is ``Tensor.flip``, a whole-pixel shift moves every pixel by
one, a quarter turn is ``torch.rot90``), image moments (a scale by s multiplies the spread of a blob
by s), the binomial law of the coins, and the zero vector being the identity everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffuse_cli.engine import augment
from diffuse_cli.engine.config import AUGMENT_DIM, UNetConfig
from diffuse_cli.engine.unet import UNet

S = 16


def vector(**cols) -> torch.Tensor:
    """The vector of EDM's raw parameters ``cols`` (shifts as fractions of the side, log2 scales, cos a - 1, sin a)."""
    names = {"flip": 0, "tx": 1, "ty": 2, "scale": 3, "cos1": 4, "sin": 5, "aniso": 6, "fx": 7, "fy": 8}
    v = torch.zeros(1, AUGMENT_DIM)
    for k, val in cols.items():
        v[0, names[k]] = val / augment.UNITS[names[k]]
    return v


def blob(sigma: float = 2.0, cx: float = 0.0, cy: float = 0.0) -> torch.Tensor:
    """A Gaussian blob (1, 1, S, S) centred (cx, cy) pixels from the image centre."""
    r = torch.arange(S, dtype=torch.float32) - (S - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))[None, None]


def spread(x: torch.Tensor) -> float:
    r = torch.arange(S, dtype=torch.float64) - (S - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    w = x[0, 0].double()
    return float(((w * (xx**2 + yy**2)).sum() / w.sum()).sqrt())


def test_zero_vector_is_the_identity_bit_for_bit():
    x = torch.randn(5, 3, S, S)
    assert torch.equal(augment.apply(x, torch.zeros(5, AUGMENT_DIM)), x)
    torch.testing.assert_close(augment.image_transform(torch.zeros(2, AUGMENT_DIM)), torch.eye(3).expand(2, 3, 3))


def test_flip_is_a_mirror_image():
    x = torch.randn(1, 2, S, S)
    torch.testing.assert_close(augment.apply(x, vector(flip=1)), x.flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dx,dy", [(1, 0), (0, 2), (-2, 1)])
def test_whole_pixel_shift_moves_every_pixel(dx, dy):
    x = torch.randn(1, 1, S, S)
    y = augment.apply(x, vector(tx=dx / S, ty=dy / S))
    # Away from the reflected border, output pixel (i, j) is input pixel (i - dy, j - dx).
    inner = (slice(None), slice(None), slice(max(dy, 0), S + min(dy, 0)), slice(max(dx, 0), S + min(dx, 0)))
    torch.testing.assert_close(y[inner], torch.roll(x, (dy, dx), dims=(2, 3))[inner], atol=1e-5, rtol=0)


def test_quarter_turn_is_rot90():
    x = torch.randn(1, 1, S, S)
    y = augment.apply(x, vector(cos1=-1.0, sin=1.0))  # a = +90 degrees
    turned = [torch.rot90(x, k, dims=(2, 3)) for k in (1, 3)]
    errors = [float((y - r).abs().max()) for r in turned]
    assert min(errors) < 1e-4 and max(errors) > 0.5  # exactly one of the two directions


@pytest.mark.parametrize("sigma,log2s", [(1.5, -0.3), (2.0, 0.3), (2.0, 0.4)])
def test_scale_multiplies_the_spread(sigma, log2s):
    # Blobs small enough that the reflected border stays dark; bilinear resampling adds a little blur (< 5%).
    x = blob(sigma=sigma)
    ratio = spread(augment.apply(x, vector(scale=log2s))) / spread(x)
    assert ratio == pytest.approx(2**log2s, rel=0.05)


def test_fractional_shift_moves_the_centre_of_mass():
    x = blob(sigma=1.5)
    y = augment.apply(x, vector(fx=0.3 / S))  # 0.3 pixels to the right
    r = torch.arange(S, dtype=torch.float64)
    com = lambda im: float((im[0, 0].double().sum(0) * r).sum() / im.double().sum())  # noqa: E731
    assert com(y) - com(x) == pytest.approx(0.3, abs=0.02)


def test_draw_is_seeded_and_fires_with_probability_p():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = augment.draw(4000, 0.3, S, g(), "cpu"), augment.draw(4000, 0.3, S, g(), "cpu")
    assert a.shape == (4000, AUGMENT_DIM) and torch.equal(a, b)
    for col in (3, 6, 7):  # continuous draws: nonzero exactly when the op fired
        share = float((a[:, col] != 0).float().mean())
        assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)  # 4 standard deviations of a binomial share
    assert float((a[:, 0] != 0).float().mean()) == pytest.approx(0.15, abs=0.03)  # flip fires, then flips half
    raw = a * torch.tensor(augment.UNITS)  # EDM's parameters
    assert (raw[:, 1:3] * S).round().eq(raw[:, 1:3] * S).all() and a[:, 1:3].abs().max() <= 1  # whole pixels
    angle = torch.atan2(raw[:, 5], raw[:, 4] + 1)
    assert angle.abs().max() <= augment.ROTATE_MAX + 1e-6
    assert not augment.draw(100, 0.0, S, g(), "cpu").any()


def test_unet_without_augmentation_is_unchanged_and_zero_vector_adds_nothing():
    base = dict(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(), dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    plain = UNet(UNetConfig(**base))
    torch.manual_seed(0)
    aug = UNet(UNetConfig(**base, augment_dim=AUGMENT_DIM))
    assert set(aug.state_dict()) - set(plain.state_dict()) == {"aug_emb.weight"}
    for k, v in plain.state_dict().items():  # created last: the other initial weights are the same
        assert torch.equal(v, aug.state_dict()[k])
    with torch.no_grad():
        for p in aug.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 999])
    with torch.no_grad():
        assert torch.equal(aug(x, t), aug(x, t, augment=torch.zeros(3, AUGMENT_DIM)))
        assert not torch.allclose(aug(x, t), aug(x, t, augment=augment.draw(3, 1.0, 8, torch.Generator(), "cpu")))


def test_a_vector_that_moves_a_pixel_is_far_from_the_zero_vector():
    # The network reads the vector through smooth layers, so vectors it must tell apart have to be far apart:
    # whatever moves some pixel of an 8x8 image by a whole pixel is at least 0.25 from "not augmented".
    # EDM's raw units fail this (a 1-pixel shift at 8x8 is 0.125 away), and so leaked shifts into samples.
    side = 8
    v = augment.draw(4000, 0.5, side, torch.Generator().manual_seed(0), "cpu")
    r = (torch.arange(side, dtype=torch.float32) + 0.5) * 2 / side - 1  # pixel centres in [-1, 1]
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    q = torch.stack([xx.flatten(), yy.flatten(), torch.ones(side * side)])  # (3, P)
    moved = (augment.image_transform(v) @ q - q)[:, :2].norm(dim=1).amax(dim=1) * side / 2  # pixels
    far = v.norm(dim=1)
    assert (moved >= 1).sum() > 1000
    assert float(far[moved >= 1].min()) >= 0.25
    assert float(far[(v != 0).any(1)].min()) > 0  # and every augmented image is told apart from a plain one


@pytest.mark.slow  # about 60 s: trains a small U-Net for 1,500 steps
def test_trained_model_does_not_leak_augmentations_at_the_zero_vector():
    """One digit, augmented with p = 0.3 per operation (88% of the training images are warped): a model
    that reads the vector samples the plain digit at the zero vector; one that ignores it samples the
    warped mixture (Karras et al. 2022, app. C.4: the non-leaking condition)."""
    from diffuse_cli.engine import step as step_mod
    from diffuse_cli.engine.config import DiffusionConfig, TrainConfig
    from diffuse_cli.engine.data import load_builtin, to_model_range
    from diffuse_cli.engine.generate import generate

    torch.set_num_threads(1)
    digit = load_builtin("digits").images[:1]  # a zero, 8x8
    model = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), dropout=0.0, augment_dim=AUGMENT_DIM)  # fmt: skip
    config = TrainConfig(steps=1500, batch_size=32, lr=1e-3, warmup=50, augment=0.3, seed=0, threads=1)
    diffusion = DiffusionConfig(timesteps=200)
    ts = step_mod.make_train_step(model, diffusion, config, digit.expand(32, -1, -1, -1).contiguous(),
                                  torch.device("cpu"))  # fmt: skip
    for i in range(config.steps):
        ts(i)
    net = ts.model.eval()  # the raw weights: 1,500 steps are too few for the EMA to have caught up
    samples = generate(net, ts.diffusion, 64, (1, 8, 8), seed=1, clip_x0=True)
    clean = to_model_range(digit)
    warped = augment.apply(clean.expand(256, -1, -1, -1), augment.draw(256, 0.3, 8, torch.Generator(), "cpu"))
    dist = lambda x: float((x - clean).flatten(1).norm(dim=1).mean())  # noqa: E731
    # Measured: 1.3 here against 3.8 for the warped images and 1.0 without augmentation; the old conditioning
    # (EDM raw units after the time MLP) gave 3.0, its samples shifted and warped like the training images.
    assert dist(samples) < dist(warped) / 2, (dist(samples), dist(warped))
