"""Non-leaking augmentation (engine/augment.py), its conditioning in the U-Net and the step, and the
data-size defaults of the training plan.

Oracles: exact pixel operations (a flip is ``Tensor.flip``, a whole-pixel shift moves every pixel by
one, a quarter turn is ``torch.rot90``), image moments (a scale by s multiplies the spread of a blob
by s), the binomial law of the coins, and the zero vector being the identity everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from diffuse_cli.engine import augment
from diffuse_cli.engine.config import AUGMENT_DIM, DiffusionConfig, TrainConfig, UNetConfig
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.plan import plan_training, regularisation
from diffuse_cli.engine.step import make_train_step
from diffuse_cli.engine.unet import UNet

S = 16


def vector(**cols) -> torch.Tensor:
    names = {"flip": 0, "tx": 1, "ty": 2, "scale": 3, "cos1": 4, "sin": 5, "aniso": 6, "fx": 7, "fy": 8}
    v = torch.zeros(1, AUGMENT_DIM)
    for k, val in cols.items():
        v[0, names[k]] = val
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
    assert (a[:, 1:3] * S).round().eq(a[:, 1:3] * S).all() and a[:, 1:3].abs().max() <= 0.125  # whole pixels
    angle = torch.atan2(a[:, 5], a[:, 4] + 1)
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


def _step(augment_dim: int, p: float, seed: int = 0):
    mc = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=(), dropout=0.0, augment_dim=augment_dim)  # fmt: skip
    images = torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    tc = TrainConfig(batch_size=8, augment=p, seed=seed)
    return make_train_step(mc, DiffusionConfig(timesteps=50), tc, images, torch.device("cpu"))


def test_step_draws_after_everything_else_and_trains_the_conditioning():
    plain, off, on = _step(0, 0.0), _step(AUGMENT_DIM, 0.0), _step(AUGMENT_DIM, 1.0)
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
        _step(0, 0.5)
    with pytest.raises(ConfigError, match="--augment"):
        TrainConfig(augment=1.5)
    with pytest.raises(ConfigError, match="augment_dim"):
        UNetConfig(augment_dim=3)


def test_regularisation_by_data_size():
    assert regularisation(100) == (0.2, 0.1)
    assert regularisation(1000) == (0.2, 0.1)
    assert regularisation(1797) == (0.0, None)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("few")
    for i in range(5):
        Image.new("L", (8, 8), 40 * i).save(d / f"{i}.png")
    return d


@pytest.mark.parametrize(
    "train,model,augment_dim,dropout,words",
    [({}, {}, AUGMENT_DIM, 0.1, "augment p = 0.2 and dropout 0.1 for 5 images"),
     ({"augment": 0.0}, {}, 0, 0.1, "dropout 0.1 for 5 images"),
     ({"augment": 0.5}, {"dropout": 0.0}, AUGMENT_DIM, 0.0, None)],
)  # fmt: skip
def test_plan_fills_in_the_small_data_defaults(tmp_path, small_folder, train, model, augment_dim, dropout, words):
    plan = plan_training(str(small_folder), tmp_path / "run", preset="tiny", train=train, model=model,
                         device="cpu", cache=False)  # fmt: skip
    assert plan.model.augment_dim == augment_dim and plan.model.dropout == dropout
    assert plan.train.augment == train.get("augment", 0.2)
    if words:
        assert plan.data_line.endswith(f"{words}: small data copies")
    else:
        assert "small data" not in plan.data_line


def test_plan_leaves_the_full_digits_as_they_were(tmp_path):
    plan = plan_training("builtin:digits", tmp_path / "run", device="cpu", cache=False)
    assert plan.train.augment == 0.0 and plan.model.augment_dim == 0
    assert plan.model.dropout == UNetConfig.preset("auto", 8, 1).dropout and "small data" not in plan.data_line
