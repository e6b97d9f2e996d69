"""Sample quality during training: the Frechet distance and KID of fixed EMA samples, and a memorisation check.

The training loss of a DDPM (Ho et al. 2020, eq. 14) flattens long before the samples stop
improving, so at a few steps (:func:`eval_due`: 500, 1000, then every ``eval_every``, and at
the end) the loop asks a :class:`Monitor` to

1. draw ``samples`` images from the EMA model with the same per-image seeds every time (so
   the curve shows the model, not the luck of the draw), with the default sampler and
   clipping that ``diffuse sample`` and ``diffuse eval`` use;
2. take their features (:class:`evaluate.RandConvFeatures`, as ``diffuse eval``) and compute
   the **Frechet distance** (Heusel et al. 2017) to a Gaussian fitted to *all* real images, and
   the **KID** (Binkowski et al. 2018), which is unbiased at small counts;
3. compare them with the **floor**: the same two numbers for ``samples`` real images against
   the statistics of the other real images, i.e. what a perfect model would score at this count
   (the Frechet distance of a finite sample is biased upwards, so "0" is never reached);
4. measure memorisation (:mod:`.memorisation`): the share of samples that are near-copies of a
   training image, against the same share for real images left out of the comparison.

The real statistics (feature mean, covariance and up to ``MAX_REAL_FEATURES`` feature rows)
are computed once per data set and stored beside its cache file (``<cache>.stats.safetensors``),
keyed by the cache's fingerprint; a built-in data set (no cache file) recomputes them, which
takes about a second. The lowest Frechet distance so far marks the best step; the loop keeps
that EMA model as ``best.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .evaluate import RandConvFeatures, extract_features, gaussian_frechet_distance, kernel_distance
from .memorisation import memorisation

FIRST_EVAL = 500  # evaluations at 500, 1000, 2000, ... steps until eval_every: early feedback at ~10% cost
MAX_REAL_FEATURES = 10_000  # feature rows kept for KID, the floor and feature-space neighbours
KID_REAL = 2000  # real feature rows KID compares with (its cost and memory grow with the square)
FLOOR_DRAWS = 4  # real subsets averaged for the floor
STATS_VERSION = 1  # bump when the stored statistics change meaning
FEATURES = "randconv"


def doubling_due(step: int, every: int, first: int) -> bool:
    """Every ``every`` steps, and before that at ``first``, 2 ``first``, 4 ``first``, ... steps (``every`` = 0: never).

    The schedule of the training previews and of the in-training evaluation: often early, when a run changes fast."""
    if not every:
        return False
    if step % every == 0:
        return True
    k = step // first
    return step < every and step % first == 0 and k & (k - 1) == 0


def eval_due(step: int, every: int, done: bool = False) -> bool:
    """Every ``every`` steps, and before that at 500, 1000, 2000, ... steps; at the end (``done``) of a run
    that got that far (a few hundred steps have nothing worth measuring). ``every`` = 0: never."""
    first = min(FIRST_EVAL, every)
    return bool(every) and (doubling_due(step, every, first) or (done and step >= first))


# --- the real statistics, once per data set ---------------------------------------------------------
@dataclass(frozen=True)
class RealStats:
    """Features of the real images: a Gaussian fit of all of them and up to MAX_REAL_FEATURES rows."""

    mean: torch.Tensor  # (D,) float64
    cov: torch.Tensor  # (D, D) float64
    features: torch.Tensor  # (M, D) float32, M = min(N, MAX_REAL_FEATURES); all N rows in order when M = N
    images: int  # N


def stats_location(data) -> tuple[Path | None, str | None]:
    """Where a data set's statistics are stored (beside its cache file) and the key they must match."""
    cache = getattr(data, "cache", None)
    if cache is None:
        return None, None
    from .data.cache import CacheInvalid, read_header

    try:
        with open(cache.path, "rb") as f:
            head = read_header(f)
    except (OSError, CacheInvalid):
        return None, None
    return Path(f"{cache.path}.stats.safetensors"), f"{head.get('fingerprint')}:{head.get('data_crc32')}"


def _load_stats(path: Path, key: str, n: int) -> RealStats | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("version") != str(STATS_VERSION) or meta.get("images") != str(n):
                return None
            t = {name: f.get_tensor(name) for name in ("mean", "cov", "features")}
    except Exception:  # noqa: BLE001 - a missing, foreign or damaged file is recomputed, never trusted
        return None
    return RealStats(t["mean"], t["cov"], t["features"], n)


def _save_stats(path: Path, key: str, stats: RealStats) -> None:
    from safetensors.torch import save_file

    from .fileio import atomic_path

    meta = {"key": key, "version": str(STATS_VERSION), "images": str(stats.images), "features": FEATURES}
    tensors = {"mean": stats.mean, "cov": stats.cov, "features": stats.features.contiguous()}
    with contextlib.suppress(OSError), atomic_path(path) as tmp:  # a read-only cache folder: keep them in memory
        save_file(tensors, str(tmp), metadata=meta)


def real_stats(images: torch.Tensor, *, net: torch.nn.Module | None = None, store: Path | None = None,
               key: str | None = None, device: torch.device | str = "cpu", batch_size: int = 256) -> RealStats:  # fmt: skip
    """The features' mean and covariance over all uint8 ``images`` (N, C, H, W); read from ``store`` when it
    holds them for ``key``, else computed (and written there)."""
    n = images.shape[0]
    if store is not None and key is not None:
        found = _load_stats(store, key, n)
        if found is not None:
            return found
    net = net or RandConvFeatures()
    feats = []
    for s in range(0, n, 4096):  # a memory-mapped data set is read a block at a time
        feats.append(extract_features(images[s : s + 4096], FEATURES, batch_size=batch_size, device=device, net=net))
    f = torch.cat(feats)
    keep = torch.arange(n) if n <= MAX_REAL_FEATURES else torch.randperm(n, generator=torch.Generator().manual_seed(0))
    stats = RealStats(f.mean(0), torch.cov(f.T).reshape(f.shape[1], -1), f[keep[:MAX_REAL_FEATURES]].float(), n)
    if store is not None and key is not None:
        _save_stats(store, key, stats)
    return stats


def _fit(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = f.to(torch.float64)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], -1)


def floor(stats: RealStats, count: int, draws: int = FLOOR_DRAWS, seed: int = 0) -> dict:
    """The Frechet distance and KID of ``count`` real images against the other real images (the mean of
    ``draws`` random splits): what a model that draws exactly from the data scores at this count.

    ``count`` is capped at half the stored feature rows so the other half still fits a Gaussian."""
    f = stats.features
    count = max(2, min(count, f.shape[0] // 2))
    g = torch.Generator().manual_seed(seed)
    fds, kids = [], []
    for _ in range(draws):
        perm = torch.randperm(f.shape[0], generator=g)
        a, b = f[perm[:count]], f[perm[count:]]
        fds.append(gaussian_frechet_distance(*_fit(a), *_fit(b)))
        kids.append(kernel_distance(b[:KID_REAL], a))
    return {"fd_floor": sum(fds) / draws, "kid_floor": sum(kids) / draws, "floor_count": count}


# --- the monitor ---------------------------------------------------------------------------------------
@dataclass
class Monitor:
    """The in-training evaluation of one run; call it with the EMA model at :func:`eval_due` steps.

    ``images``: the training set, uint8 (N, C, H, W) on the CPU. ``history``: earlier records of this
    run (from log.jsonl on resume), so the best step and the copying warning survive a resume.
    """

    images: torch.Tensor
    samples: int = 256
    seed: int = 0
    device: torch.device | str = "cpu"
    amp: torch.dtype | None = None
    batch_size: int = 256
    store: Path | None = None
    key: str | None = None
    history: list[dict] = field(default_factory=list)
    best_fd: float = math.inf
    best_step: int | None = None
    warned: bool = False

    def __post_init__(self) -> None:
        self.net = None  # the features and the real statistics: built at the first evaluation (prepare)
        for rec in self.history:
            if isinstance(rec.get("fd"), int | float) and rec["fd"] < self.best_fd:
                self.best_fd, self.best_step = float(rec["fd"]), rec.get("step")
            self.warned = self.warned or bool(rec.get("copying"))

    def prepare(self) -> None:
        """The feature net, the real statistics (read or computed once) and the floor, if not done yet."""
        if self.net is not None:
            return
        with torch.random.fork_rng(devices=[]):  # the net's default init must not move training's random stream
            self.net = RandConvFeatures().to(self.device)
        self.stats = real_stats(self.images, net=self.net, store=self.store, key=self.key, device=self.device)
        self.floor = floor(self.stats, self.samples, seed=self.seed)
        self._mean_cov = (self.stats.mean, self.stats.cov)

    def __call__(self, model, diffusion, step: int) -> dict:
        """Evaluate ``model`` (the EMA network) at ``step``: a record for log.jsonl, with ``best`` = True when
        this is the lowest Frechet distance so far and ``warn`` = the one-line message when copying starts."""
        from .data import from_model_range
        from .generate import generate

        t0 = time.perf_counter()
        self.prepare()
        x = generate(model, diffusion, self.samples, tuple(self.images.shape[1:]), seed=self.seed,
                     batch_size=self.batch_size, device=self.device, amp=self.amp, clip_x0=True)  # fmt: skip
        fake = from_model_range(x)
        f = extract_features(fake, FEATURES, batch_size=self.batch_size, device=self.device, net=self.net)
        fd = gaussian_frechet_distance(*_fit(f), *self._mean_cov)
        kid = kernel_distance(self.stats.features[:KID_REAL], f)
        all_rows = self.stats.features.shape[0] == self.images.shape[0]
        mem = memorisation(fake, self.images, sample_features=f if all_rows else None,
                           train_features=self.stats.features if all_rows else None,
                           generator=torch.Generator().manual_seed(self.seed))  # fmt: skip
        rec = {"step": step, "fd": fd, "kid": kid, **self.floor, "eval_samples": self.samples,
               "near_copy": mem.near_copy_share, "near_copy_ref": mem.reference_share,
               "pixel_nn": mem.pixel_distance, "pixel_nn_ref": mem.reference_pixel_distance}  # fmt: skip
        best = fd < self.best_fd
        if best:
            self.best_fd, self.best_step = fd, step
        copying = mem.copying
        rec.update(best_step=self.best_step, copying=copying, eval_s=time.perf_counter() - t0)
        out = {**rec, "best": best}
        if copying and not self.warned:
            self.warned = True
            out["warn"] = (f"the model is copying its training images: {mem.near_copy_share:.0%} of {self.samples} "
                           f"samples at step {step} are near-copies (real images: {mem.reference_share:.0%}); "
                           "more data or --augment 0.12 (non-leaking augmentation) helps, "
                           "or keep an earlier checkpoint")  # fmt: skip
        return out


def read_history(log: str | os.PathLike) -> list[dict]:
    """The evaluation records (those with "fd") of a run's log.jsonl, oldest first."""
    try:
        lines = Path(log).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and "fd" in rec:
                out.append(rec)
    return out
