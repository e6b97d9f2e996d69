"""Classifier-free guidance (engine/guidance.py): the wrapper's algebra on a conditional U-Net, and guided
sampling of an analytic Gaussian mixture whose components are the classes (exact conditional eps known).
The training step's label drops are in test_step.py, the conditional U-Net's layout in test_unet.py."""

import math

import pytest
import torch

from diffuse_cli.engine.analytic import GaussianMixture
from diffuse_cli.engine.config import DiffusionConfig, UNetConfig
from diffuse_cli.engine.diffusion import Diffusion, to_x0_eps
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.generate import generate
from diffuse_cli.engine.guidance import guided
from diffuse_cli.engine.unet import UNet

K = 3
CFG = UNetConfig.preset("tiny", 8, 1, num_classes=K)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    m = UNet(CFG).eval()
    with torch.no_grad():  # DDPM starts the output conv at zero: give it weights so the classes matter
        for p in (m.conv_out.weight, *(b.res.conv2.weight for b in m.up if hasattr(b, "res"))):
            p.normal_(0, 0.05)
    return m


class Counting:
    """Wraps a conditional model and records the batch size of every call."""

    def __init__(self, model):
        self.model, self.sizes, self.null_class = model, [], model.null_class

    def __call__(self, x, t, y=None):
        self.sizes.append(x.shape[0])
        return self.model(x, t, y)


def _inputs(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 1, 8, 8, generator=g),
        torch.randint(0, 1000, (b,), generator=g),
        torch.tensor([0, 2, 1, 2])[:b],
    )


@torch.no_grad()
def test_w1_is_the_conditional_model_exactly_and_w0_the_unconditional(unet):
    x, t, y = _inputs()
    m = Counting(unet)
    assert torch.equal(guided(m, y, 1.0)(x, t), unet(x, t, y))
    assert torch.equal(guided(m, y, 0.0)(x, t), unet(x, t))  # y None = the null class
    assert torch.equal(unet(x, t), unet(x, t, torch.full((4,), K)))
    assert m.sizes == [4, 4]  # no doubled batch when one side is not needed
    assert not torch.allclose(unet(x, t, y), unet(x, t), atol=1e-3)  # the label does change the output


@torch.no_grad()
@pytest.mark.parametrize("w", [0.5, 1.5, 3.0])
def test_guided_is_one_batched_call_extrapolating_from_uncond_to_cond(unet, w):
    x, t, y = _inputs()
    m = Counting(unet)
    out = guided(m, y, w)(x, t)
    assert m.sizes == [8]  # [x, x] with labels [y, null]: one call of 2B
    cond, uncond = unet(x, t, y), unet(x, t)
    torch.testing.assert_close(out, uncond + w * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_guidance_scale_must_be_a_finite_non_negative_number(unet):
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--guidance"):
            guided(unet, torch.zeros(2, dtype=torch.long), bad)


# --- the training step ------------------------------------------------------------------------


# --- the analytic mixture: each component a class ----------------------------------------------
SIGMA, HALF_GAP = 0.5, 0.5  # two components N((+-0.5, 0), 0.25 I): a Bayes classifier gets Phi(0.5 / 0.5) right


def _mixture():
    return GaussianMixture([0.5, 0.5], [[-HALF_GAP, 0.0], [HALF_GAP, 0.0]], stds=[SIGMA, SIGMA])


def _sample(mix, diff, classes, w, prediction=None, sampler="ddim", steps=50, seed=0):
    model = mix.conditional_model(diff, prediction)
    return generate(
        model,
        diff,
        classes.numel(),
        (2,),
        sampler=sampler,
        steps=steps,
        seed=seed,
        batch_size=classes.numel(),
        classes=classes,
        guidance=w,
        eta=0.0,
        clip_x0=False,  # the mixture's data are points in the plane, not images in [-1, 1]
    )


def _in_own_component(x, classes):
    """The fraction that the Bayes classifier of the mixture (the sign of the first coordinate) puts in their class."""
    return float(((x[:, 0] > 0).long() == classes).float().mean())


@pytest.fixture(scope="module")
def guided_fractions():
    mix, diff = _mixture(), Diffusion(DiffusionConfig())
    classes = torch.arange(2).repeat_interleave(1000)
    xs = {w: _sample(mix, diff, classes, w) for w in (1.0, 2.0, 4.0)}
    return classes, xs


def test_w1_samples_each_class_from_its_own_component(guided_fractions):
    classes, xs = guided_fractions
    x = xs[1.0]
    expected = 0.5 * (1 + math.erf(HALF_GAP / SIGMA / math.sqrt(2)))  # Phi(1) = 0.8413: the best any sampler can do
    frac = _in_own_component(x, classes)
    assert abs(frac - expected) < 4 * math.sqrt(expected * (1 - expected) / classes.numel())  # measured: 0.857
    for k, mu in enumerate((-HALF_GAP, HALF_GAP)):
        xk = x[classes == k].double()
        torch.testing.assert_close(xk.mean(0), torch.tensor([mu, 0.0], dtype=torch.float64), atol=0.05, rtol=0)
        torch.testing.assert_close(xk.std(0), torch.tensor([SIGMA, SIGMA], dtype=torch.float64), atol=0.04, rtol=0)


def test_larger_guidance_concentrates_each_class_further(guided_fractions):
    classes, xs = guided_fractions
    fr = {w: _in_own_component(x, classes) for w, x in xs.items()}
    assert fr[1.0] < fr[2.0] < fr[4.0] and fr[4.0] > 0.97, fr  # measured: 0.857, 0.994, 1.000
    # ... by pushing the classes apart along the axis that separates them
    gap = {w: float(x[classes == 1, 0].mean() - x[classes == 0, 0].mean()) for w, x in xs.items()}
    assert gap[1.0] < gap[2.0] < gap[4.0], gap


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_guidance_is_the_same_on_eps_x0_and_v_predictions(prediction):
    mix, diff = _mixture(), Diffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(3)
    x_t, t, y = (
        torch.randn(6, 2, generator=g, dtype=torch.float64),
        torch.randint(0, 1000, (6,), generator=g),
        torch.tensor([0, 1] * 3),
    )
    a = diff.sqrt_alphas_cumprod[t][:, None]
    s = diff.sqrt_one_minus_alphas_cumprod[t][:, None]
    x0_eps = to_x0_eps("eps", guided(mix.conditional_model(diff, "eps"), y, 2.5)(x_t, t), x_t, a, s)[0]
    x0_other = to_x0_eps(prediction, guided(mix.conditional_model(diff, prediction), y, 2.5)(x_t, t), x_t, a, s)[0]
    torch.testing.assert_close(x0_other, x0_eps)


def test_an_images_noise_stream_does_not_depend_on_its_class_or_batch():
    mix, diff = _mixture(), Diffusion(DiffusionConfig(timesteps=100))
    a, b = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0])
    unc = generate(mix.conditional_model(diff), diff, 4, (2,), sampler="ddpm", seed=5)
    for classes in (a, b):  # w = 0: the unconditional model, whatever the classes
        assert torch.equal(
            generate(mix.conditional_model(diff), diff, 4, (2,), sampler="ddpm", seed=5, classes=classes, guidance=0.0),
            unc,
        )
    whole = generate(mix.conditional_model(diff), diff, 4, (2,), sampler="ddpm", seed=5, classes=a, guidance=2.0)
    one_by_one = generate(
        mix.conditional_model(diff), diff, 4, (2,), sampler="ddpm", seed=5, classes=a, guidance=2.0, batch_size=1
    )
    torch.testing.assert_close(whole, one_by_one, atol=1e-6, rtol=0)


def test_generate_refuses_classes_for_an_unconditional_model_or_out_of_range():
    mix, diff = _mixture(), Diffusion(DiffusionConfig(timesteps=10))
    with pytest.raises(ConfigError, match="without classes"):
        generate(mix.model(diff), diff, 2, (2,), classes=torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="class ids"):
        generate(mix.conditional_model(diff), diff, 2, (2,), classes=torch.tensor([0, 2]))
    with pytest.raises(ConfigError, match="one class per image"):
        generate(mix.conditional_model(diff), diff, 3, (2,), classes=torch.tensor([0, 1]))


def test_w1_puts_every_sample_in_its_component_when_the_components_are_apart():
    mix = GaussianMixture([0.5, 0.5], [[-1.5, 0.0], [1.5, 0.0]], stds=[SIGMA, SIGMA])  # 6 sigma apart: Phi(3) = 0.9987
    diff = Diffusion(DiffusionConfig())
    classes = torch.arange(2).repeat_interleave(500)
    x = _sample(mix, diff, classes, 1.0)
    assert _in_own_component(x, classes) >= 0.99  # Phi(3) = 0.9987 expected; measured: 0.997
    assert _in_own_component(_sample(mix, diff, classes, 0.0), classes) < 0.6  # unconditional: about half
