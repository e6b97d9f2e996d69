"""Is the model copying its training images? Nearest-training-image distances and the near-copy share.

A sample is a **near-copy** when its nearest training image is much closer than the training
images around it. Carlini et al. 2023 ("Extracting Training Data from Diffusion Models",
sec. 5.1) measure this with a *relative* distance: the l2 distance to the nearest training
image divided by the mean distance to the ``k`` nearest, so that a sample in a dense part of
the data is not called a copy only because everything there is close. Here:

    ratio(x) = d_1(x) / mean(d_1(x), ..., d_k(x)),     k = min(50, N)    (Carlini et al. use n = 50)
    near-copy  <=>  ratio(x) < 1/3

with d_j the j-th smallest l2 distance from x to the N training images, in pixels (values
0..255). The threshold 1/3 is this project's (a copy sits three times closer to one training
image than to its neighbourhood); ``benchmarks/monitor.py`` shows that held-out real digits
are essentially never flagged by it while a model that memorised 32 images is.

The **reference** for the same numbers are real images measured against the *other* training
images (leave-one-out): how close a new real image from the same distribution comes to the
training set. A model that generalises has sample distances like those; a copying one has far
smaller ones and a near-copy share far above the reference's.

Distances are also reported in the evaluation features (:mod:`.evaluate`), where a shifted or
slightly noisy copy is still close.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEAR_COPY_K = 50  # Carlini et al. 2023 normalise by the mean distance to the n = 50 nearest training images
NEAR_COPY_RATIO = 1.0 / 3.0  # this project's threshold on d_1 / mean(d_1..d_k); see benchmarks/RESULTS.md
COPY_WARN = 0.1  # a model "is copying" when at least this share of its samples are near-copies ...
COPY_WARN_FACTOR = 3.0  # ... and that is at least this many times the real images' own share
_CHUNK = 256  # query rows per distance block: bounded memory for large training sets


def _flat(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) (or features (N, D)) -> float32 (N, D) rows."""
    return images.reshape(images.shape[0], -1).to(torch.float32)


def nearest(
    queries: torch.Tensor, train: torch.Tensor, k: int = 1, *, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest l2 distances from each query to the training rows, and their indices.

    ``queries`` (M, ...) and ``train`` (N, ...): uint8 images or feature rows. ``exclude`` (M,)
    gives, for each query, a training index to leave out (the query itself, for real images of
    the training set: leave-one-out). Returns float64 distances (M, k), ascending, and int64
    indices (M, k).
    """
    q, x = _flat(queries), _flat(train)
    k = min(k, x.shape[0] - (exclude is not None))
    dists, idx = [], []
    for s in range(0, q.shape[0], _CHUNK):
        d = torch.cdist(q[s : s + _CHUNK].to(torch.float64), x.to(torch.float64))
        if exclude is not None:
            rows = torch.arange(d.shape[0])
            d[rows, exclude[s : s + _CHUNK]] = float("inf")
        v, i = d.topk(k, dim=1, largest=False)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def copy_ratio(dists: torch.Tensor) -> torch.Tensor:
    """d_1 / mean(d_1..d_k) per row of ascending distances (M, k) (Carlini et al. 2023's normalisation)."""
    return dists[:, 0] / dists.mean(dim=1).clamp_min(1e-12)


def near_copies(samples: torch.Tensor, train: torch.Tensor, *, k: int = NEAR_COPY_K,
                threshold: float = NEAR_COPY_RATIO) -> torch.Tensor:  # fmt: skip
    """(M,) bool: which uint8 ``samples`` are near-copies of a uint8 ``train`` image (module docstring)."""
    if train.shape[0] < 2:
        return torch.zeros(samples.shape[0], dtype=torch.bool)  # one image: no neighbourhood to compare with
    d, _ = nearest(samples, train, k)
    return copy_ratio(d) < threshold


def near_copy_share(samples: torch.Tensor, train: torch.Tensor, *, k: int = NEAR_COPY_K,
                    threshold: float = NEAR_COPY_RATIO) -> float:  # fmt: skip
    """The share (0..1) of uint8 ``samples`` (M, C, H, W) that are near-copies of uint8 ``train`` images."""
    return float(near_copies(samples, train, k=k, threshold=threshold).to(torch.float64).mean())


@dataclass(frozen=True)
class Memorisation:
    """Samples against real images left out of the training set, both measured against the training set."""

    near_copy_share: float  # share of samples with ratio < threshold
    reference_share: float  # the same share for the reference real images (leave-one-out)
    pixel_distance: float  # median distance of a sample to its nearest training image (0..255 l2 / sqrt(D))
    reference_pixel_distance: float  # the same for the reference real images
    feature_distance: float | None  # median nearest distances in the evaluation features (None: not computed)
    reference_feature_distance: float | None
    nearest: torch.Tensor  # (M, neighbours) indices of each sample's nearest training images (pixels)
    copies: torch.Tensor  # (M,) bool
    samples: int
    references: int
    k: int
    threshold: float

    @property
    def copying(self) -> bool:
        """Whether this is a model copying its training images (COPY_WARN, COPY_WARN_FACTOR)."""
        return self.near_copy_share >= COPY_WARN and self.near_copy_share >= COPY_WARN_FACTOR * self.reference_share

    def to_dict(self) -> dict:
        keys = ("near_copy_share", "reference_share", "pixel_distance", "reference_pixel_distance", "feature_distance",
                "reference_feature_distance", "samples", "references", "k", "threshold", "copying")  # fmt: skip
        return {key: getattr(self, key) for key in keys}


def memorisation(
    samples: torch.Tensor,
    train: torch.Tensor,
    *,
    references: int = 256,
    sample_features: torch.Tensor | None = None,
    train_features: torch.Tensor | None = None,
    neighbours: int = 3,
    k: int = NEAR_COPY_K,
    threshold: float = NEAR_COPY_RATIO,
    generator: torch.Generator | None = None,
) -> Memorisation:
    """Nearest-training-image distances of uint8 ``samples`` (M, C, H, W) against uint8 ``train`` (N, C, H, W).

    ``references`` real images (drawn with ``generator``) are measured leave-one-out for comparison.
    With ``sample_features`` (M, D) and ``train_features`` (N, D) the medians are also reported in
    those features. ``neighbours`` nearest training indices per sample are kept (for a picture).
    """
    n, m = train.shape[0], samples.shape[0]
    dim = float(train[0].numel()) ** 0.5
    d, idx = nearest(samples, train, max(k, neighbours))
    kk = min(k, d.shape[1])
    copies = copy_ratio(d[:, :kk]) < threshold if n >= 2 else torch.zeros(m, dtype=torch.bool)
    ref = torch.randperm(n, generator=generator)[: min(references, n)] if n >= 2 else torch.zeros(0, dtype=torch.long)
    if ref.numel():
        d_ref, _ = nearest(train[ref], train, kk, exclude=ref)
        ref_share, ref_pixel = float((copy_ratio(d_ref) < threshold).double().mean()), float(d_ref[:, 0].median()) / dim
    else:
        ref_share, ref_pixel = float("nan"), float("nan")
    feat, ref_feat = None, None
    if sample_features is not None and train_features is not None:
        feat = float(nearest(sample_features, train_features, 1)[0][:, 0].median())
        if ref.numel():
            ref_feat = float(nearest(train_features[ref], train_features, 1, exclude=ref)[0][:, 0].median())
    return Memorisation(
        near_copy_share=float(copies.double().mean()),
        reference_share=ref_share,
        pixel_distance=float(d[:, 0].median()) / dim,
        reference_pixel_distance=ref_pixel,
        feature_distance=feat,
        reference_feature_distance=ref_feat,
        nearest=idx[:, :neighbours],
        copies=copies,
        samples=m,
        references=int(ref.numel()),
        k=kk,
        threshold=threshold,
    )


def nearest_picture(samples: torch.Tensor, train: torch.Tensor, result: Memorisation, rows: int = 16):
    """A PIL picture: one row per sample (the first ``rows``, near-copies first), the sample and then its
    nearest training images, a red frame round each near-copy's sample."""
    from PIL import ImageDraw

    from .images import make_grid, upscale

    order = torch.argsort(result.copies.to(torch.int8), descending=True, stable=True)[:rows]
    nb = result.nearest.shape[1]
    tiles = torch.cat([torch.cat([samples[i : i + 1], train[result.nearest[i]]]) for i in order.tolist()])
    pad = 2
    grid = make_grid(tiles, nrow=nb + 1, pad=pad)
    scale = max(1, -(-48 // samples.shape[-1]))  # tiles at least 48 px
    big = upscale(grid, grid.height * scale if grid.height < grid.width else grid.width * scale).convert("RGB")
    f = big.width / grid.width
    draw = ImageDraw.Draw(big)
    h = samples.shape[-1]
    for r, i in enumerate(order.tolist()):
        if bool(result.copies[i]):
            y = pad + r * (h + pad)
            draw.rectangle([0, (y - pad) * f, (pad * 2 + h) * f - 1, (y + h + pad) * f - 1], outline=(220, 30, 30),
                           width=max(1, int(f)))  # fmt: skip
    return big
