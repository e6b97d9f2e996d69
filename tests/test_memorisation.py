"""Near-copy detection (engine/memorisation.py) and the kernel distance it is reported with."""

import pytest
import torch

from diffuse_cli.engine import evaluate
from diffuse_cli.engine import memorisation as M
from diffuse_cli.engine.data import load_builtin


@pytest.fixture(scope="module")
def digits16():
    return load_builtin("digits", image_size=16).images


def test_nearest_matches_brute_force_and_leaves_one_out():
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (300, 1, 4, 4), generator=g, dtype=torch.uint8)
    q = torch.randint(0, 256, (7, 1, 4, 4), generator=g, dtype=torch.uint8)
    d, idx = M.nearest(q, train, 5)
    brute = ((q.reshape(7, 1, -1).double() - train.reshape(1, 300, -1).double()) ** 2).sum(-1).sqrt()
    want, want_idx = brute.sort(dim=1)
    assert torch.allclose(d, want[:, :5], atol=1e-2) and torch.equal(idx[:, 0], want_idx[:, 0])
    own = torch.tensor([3, 10, 200])
    d_self, idx_self = M.nearest(train[own], train, 2, exclude=own)
    assert (d_self[:, 0] > 0).all() and not (idx_self == own[:, None]).any()


def test_copies_are_flagged_and_new_images_are_not(digits16):
    train, held_out = digits16[:1000], digits16[1000:1300]
    g = torch.Generator().manual_seed(1)
    noisy = (train[:200].float() + 8 * torch.randn(train[:200].shape, generator=g)).clamp(0, 255).to(torch.uint8)
    assert M.near_copy_share(train[:200], train) == 1.0  # exact copies: d_1 = 0
    assert M.near_copy_share(noisy, train) == 1.0  # slightly noisy copies still sit far closer to one image
    assert M.near_copy_share(held_out, train) < 0.02  # real digits the model never saw are new
    assert M.near_copy_share(held_out[:3], train[:1]) == 0.0  # one training image: no neighbourhood, no verdict


def test_copy_ratio_is_scale_free():
    d = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]], dtype=torch.float64)
    assert torch.allclose(M.copy_ratio(d), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_memorisation_report_against_leave_one_out_reference(digits16):
    train = digits16[:500]
    samples = torch.cat([train[:30], digits16[1500:1530]])  # half copies, half new digits
    f_train, f_samples = evaluate.extract_features(train), evaluate.extract_features(samples)
    r = M.memorisation(samples, train, references=100, sample_features=f_samples, train_features=f_train,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert r.near_copy_share == pytest.approx(0.5, abs=0.05)
    assert r.copies[:30].all() and r.reference_share < 0.05 and r.references == 100
    assert torch.equal(r.nearest[:30, 0], torch.arange(30))  # each copy's nearest image is its original
    assert r.pixel_distance < r.reference_pixel_distance and r.feature_distance < r.reference_feature_distance
    pic = M.nearest_picture(samples, train, r, rows=4)
    assert pic.width >= 4 * 16 and pic.height >= 4 * 16
    assert set(r.to_dict()) >= {"near_copy_share", "reference_share", "threshold", "k"}


def test_kernel_distance_matches_its_definition_and_is_unbiased():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert evaluate.kernel_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    # Same distribution: KID averages to 0 (unbiased) while the Frechet distance stays above it (biased).
    kids, fds = [], []
    for _ in range(200):
        a, b = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
        kids.append(evaluate.kernel_distance(a, b))
        fds.append(evaluate.frechet_distance(a, b))
    kid = torch.tensor(kids, dtype=torch.float64)
    assert abs(float(kid.mean())) < 3 * float(kid.std()) / 200**0.5
    assert min(fds) > 0
    shifted = evaluate.kernel_distance(torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g) + 1.0)
    assert shifted > 10 * float(kid.std())
