"""A small CNN that reads the built-in digits: the judge of class-conditional samples.

``classifier(image_size)`` trains (once; cached under ``benchmarks/.cache/``) a two-layer CNN on
one half of the 1,797 UCI digits, chosen by a fixed permutation, and records its accuracy on the
other half in ``held_out_accuracy``. ``predict(images_uint8)`` labels uint8 images (N, 1, S, S),
white on black as ``builtin:digits`` stores them, with their softmax confidence.

Everything is seeded, runs on the CPU and takes seconds, so the judge is the same on every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffuse_cli.engine.data import load_builtin, to_model_range  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
SEED = 0
EPOCHS = 40


def split(n: int = 1797) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): the two halves of a fixed permutation of the digits."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    return perm[: n // 2], perm[n // 2 :]


class DigitClassifier(nn.Module):
    """conv 3x3 (32) - ReLU - conv 3x3 (64) - ReLU - global average and max pool - linear (10)."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(128, 10)
        self.held_out_accuracy = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels int64 (N,), confidences float (N,)) for uint8 images (N, 1, S, S)."""
        assert images_uint8.dtype == torch.uint8 and images_uint8.shape[1:] == (1, self.image_size, self.image_size)
        self.eval()
        probs = torch.cat([self(to_model_range(b)).softmax(1) for b in images_uint8.split(512)])
        conf, labels = probs.max(1)
        return labels, conf


def _train(image_size: int) -> DigitClassifier:
    ds = load_builtin("digits", image_size=image_size)
    tr, te = split(len(ds))
    x, y = to_model_range(ds.images[tr]), ds.labels[tr]
    torch.manual_seed(SEED)
    model = DigitClassifier(image_size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(tr), generator=gen).split(64):
            # One-pixel shifts make the judge read a digit, not its exact position.
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    labels, _ = model.predict(ds.images[te])
    model.held_out_accuracy = float((labels == ds.labels[te]).float().mean())
    return model


_MODELS: dict[int, DigitClassifier] = {}


def classifier(image_size: int = 8) -> DigitClassifier:
    """The digit classifier for ``image_size`` x ``image_size`` digits: trained once, then cached."""
    if image_size in _MODELS:
        return _MODELS[image_size]
    from safetensors.torch import load_file, save_file

    path = CACHE / f"digit-classifier-{image_size}-seed{SEED}-e{EPOCHS}.safetensors"
    if path.exists():
        model = DigitClassifier(image_size)
        weights = load_file(str(path))
        model.held_out_accuracy = float(weights.pop("held_out_accuracy"))
        model.load_state_dict(weights)
    else:
        model = _train(image_size)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({**model.state_dict(), "held_out_accuracy": torch.tensor(model.held_out_accuracy)}, str(path))
    _MODELS[image_size] = model.eval()
    return model


def predict(images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, confidences) for uint8 digits (N, 1, S, S), by the classifier for their size S."""
    return classifier(images_uint8.shape[-1]).predict(images_uint8)


if __name__ == "__main__":
    torch.set_num_threads(1)
    m = classifier(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
    print(f"held-out accuracy {m.held_out_accuracy:.4f}")
