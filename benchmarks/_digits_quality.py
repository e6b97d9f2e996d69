"""The one digit judge of the benchmarks: a small CNN classifier and a Frechet distance in its features.

For models trained on the built-in digits (``builtin:digits``, 1,797 UCI 8x8 digits, at any
image size). The classifier is trained deterministically on one half of the digits (even
indices) at the size being scored and cached under the benchmark cache dir; the other half
(odd indices, 898 images) is the held-out reference set. The API is small on purpose:

    from benchmarks._digits_quality import score, predict
    score(images_uint8)            # {"fd", "confident", "speckled", "n", "accuracy"?}
    fd_full(images_uint8)          # the fd against all 1,797 digits
    predict(images_uint8)          # (labels, confidence), e.g. for class-conditional accuracy

``images_uint8``: a uint8 tensor (N, 1, S, S), white strokes on black (what the sampler's
[-1, 1] output becomes after ``data.from_model_range``). The metrics:

- ``fd``: Frechet distance between Gaussians fitted to the classifier's penultimate features
  (64-d) of the images and of the held-out real digits (Heusel et al. 2017, "GANs Trained by a
  Two Time-Scale Update Rule", the FID formula, here in a digit classifier's features; the engine's
  ``evaluate.frechet_distance``).
  Lower is better; :func:`floor` is the same distance for the training half of the real data.
- ``confident``: fraction of images classified with probability > 0.9.
- ``speckled``: fraction whose mean absolute horizontal neighbour difference exceeds 60 on
  0..255: saturated pixel noise rather than strokes (real 16x16 digits score about 20-30 and
  none exceeds it; at 8x8 real strokes are too coarse for this test to mean anything).
- ``accuracy``: only with ``labels=``: fraction classified as the given label.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from diffuse_cli.engine.data import load_builtin
from diffuse_cli.engine.evaluate import frechet_distance

from ._trained import cache_dir

CONFIDENT = 0.9
SPECKLE_THRESHOLD = 60.0  # mean |x[.., j+1] - x[.., j]| on 0..255
FEATURES = 64
EPOCHS = 30
VERSION = 1  # bump to retrain cached classifiers


class DigitNet(nn.Module):
    """conv 16 - pool - conv 32 - pool - 4x4 pool - fc 64 (the features) - fc 10."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, FEATURES), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(FEATURES, 10)

    def features(self, u8: torch.Tensor) -> torch.Tensor:
        return self.body(u8.float() / 127.5 - 1.0)

    def forward(self, u8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(u8))


def digits(image_size: int, half: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in digits at ``image_size``: ``half`` "train" (even indices) or "heldout" (odd)."""
    ds = load_builtin("digits", image_size=image_size)
    sl = slice(0, None, 2) if half == "train" else slice(1, None, 2)
    return ds.images[sl], ds.labels[sl]


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random integer shifts of up to 1/8 of the size (zero padded): a little robustness, deterministic."""
    s = x.shape[-1]
    m = max(1, s // 8)
    pad = torch.nn.functional.pad(x, (m, m, m, m))
    dx, dy = torch.randint(0, 2 * m + 1, (2,), generator=gen).tolist()
    return pad[..., dy : dy + s, dx : dx + s]


@cache
def classifier(image_size: int = 16) -> DigitNet:
    """The digit classifier for ``image_size`` (trained on first use, then loaded from the cache), in eval mode."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"digit-classifier-v{VERSION}-{image_size}px.safetensors"
    torch.manual_seed(0)
    net = DigitNet()
    if path.exists():
        net.load_state_dict(load_file(str(path)))
        return net.eval()
    images, labels = digits(image_size, "train")
    with torch.enable_grad():  # callers may be under no_grad
        _fit(net, images, labels)
    net.eval()
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return net


def _fit(net: DigitNet, images: torch.Tensor, labels: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(net(_shift(images[idx], gen)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def _features_and_probs(images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 1:
        raise ValueError(f"expected uint8 images (N, 1, S, S), got {images_u8.dtype} {tuple(images_u8.shape)}")
    net = classifier(images_u8.shape[-1])
    feats, probs = [], []
    for chunk in images_u8.split(512):
        f = net.features(chunk)
        feats.append(f.double())
        probs.append(net.head(f).softmax(-1))
    return torch.cat(feats), torch.cat(probs)


def fd_full(images_u8: torch.Tensor) -> float:
    """``fd`` against all 1,797 digits (both halves) rather than the held-out half: for models that saw a
    subset of one half, the whole distribution they should cover."""
    everything = load_builtin("digits", image_size=images_u8.shape[-1]).images
    return frechet_distance(_features_and_probs(images_u8)[0], _features_and_probs(everything)[0])


def predict(images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's labels (int64) and their probabilities (float) for uint8 images (N, 1, S, S)."""
    _, probs = _features_and_probs(images_u8)
    conf, labels = probs.max(-1)
    return labels, conf


@cache
def _reference_features(image_size: int) -> torch.Tensor:
    return _features_and_probs(digits(image_size, "heldout")[0])[0]


def speckled(images_u8: torch.Tensor) -> torch.Tensor:
    """Per image: is the mean absolute horizontal neighbour difference above SPECKLE_THRESHOLD?"""
    d = (images_u8[..., 1:].float() - images_u8[..., :-1].float()).abs().flatten(1).mean(1)
    return d > SPECKLE_THRESHOLD


def score(images_u8: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Quality of generated digits (see the module docstring); ``labels`` adds ``accuracy``."""
    feats, probs = _features_and_probs(images_u8)
    conf, pred = probs.max(-1)
    out = {
        "n": int(images_u8.shape[0]),
        "fd": frechet_distance(feats, _reference_features(images_u8.shape[-1])),
        "confident": float((conf > CONFIDENT).float().mean()),
        "speckled": float(speckled(images_u8).float().mean()),
    }
    if labels is not None:
        out["accuracy"] = float((pred == labels.to(pred.device)).float().mean())
    return out


def heldout_accuracy(image_size: int = 16) -> float:
    """How often the classifier reads the held-out real digits right: the judge's own error rate."""
    held, held_labels = digits(image_size, "heldout")
    return float((predict(held)[0] == held_labels).float().mean())


def floor(image_size: int = 16) -> dict:
    """:func:`score` of the real training half, plus the classifier's held-out accuracy: the best a model can do."""
    images, _ = digits(image_size, "train")
    out = score(images)
    out["heldout_accuracy"] = heldout_accuracy(image_size)
    return out
