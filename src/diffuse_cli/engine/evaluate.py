"""How good is a model: bits/dim, Frechet distance, precision and recall.

* **Negative log-likelihood** as the variational bound of Ho et al. 2020 (eq. 5), in nats per
  image, with our 0-based timesteps (x_t is the image after step t; t = T - 1 is x_T):

      L = KL(q(x_{T-1} | x0) || N(0, I))                               prior, L_T
        + sum_{t=1}^{T-1} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))  L_{t-1}, Gaussians (eq. 6-8)
        - log p(x0 | x_0-noisy)                                         L_0, the decoder

  The reverse step p(x_{t-1} | x_t) = N(mu(x_t, x0_pred), sigma_t^2 I) has the posterior mean of
  eq. 7 with the network's x0 and a fixed variance: sigma_t^2 = beta_t ("beta") or beta~_t
  ("posterior"), or a learned-variance model's own (Nichol & Dhariwal 2021, eq. 15; its default,
  and at t = 0 the decoder's variance too, as in their code). The decoder of 8-bit images is eq. 13: the Gaussian's mass over each pixel's bin
  of width 2/255 (the outermost bins reach to +-inf), with mean x0_pred and variance beta_0
  ("beta", Ho et al.'s sigma_1^2 = beta_1) or, as beta~_0 = 0, beta~ of the second step
  ("posterior"; Nichol & Dhariwal 2021 clip it so). For continuous data (the analytic tests) the
  decoder is the Gaussian density instead. Only "beta" makes the bound tight as T grows: at
  small t the true reverse step has variance ~ beta_t, and beta~_t / beta_t ~ (t - 1) / t there
  leaves a gap that does not vanish (test_evaluate measures both).
  Bits/dim = L / (D ln 2) for D = C H W values per image.

  The KL terms are estimated with one draw of x_t per image and step, so the per-image values
  are noisy but unbiased; the reported interval (mean +- 1.96 standard errors over images)
  covers that noise and the spread of the data. ``terms`` < T - 1 evaluates that many of the KL
  steps (one random t per stratum of equal width) and scales them up: still an unbiased
  estimate of the same bound, only noisier (each image draws its own t in each stratum, so the
  interval covers that too).

* **Frechet distance** between Gaussians fitted to features of real and generated images
  (Dowson & Landau 1982; as FID, Heusel et al. 2017):
  ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2}).
  FID uses Inception-v3 pool features (2048-d) as the pytorch-fid package computes them; the
  default "randconv" features are a fixed, randomly initialised conv net (no download), so
  its numbers are comparable with each other but are not FID.

* **Precision and recall** (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", sec. 3): each sample's k-th nearest neighbour distance (k = 3)
  defines a ball; precision is the share of generated samples inside some real ball, recall
  the share of real samples inside some generated ball.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import EVAL_FEATURES, check_seed
from .diffusion import Diffusion
from .errors import ConfigError, Unsupported
from .gaussians import _gaussian_log_density, _normal_kl, discretized_gaussian_log_likelihood  # noqa: F401

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]

PR_K = 3  # Kynkaanniemi et al. 2019 use k = 3
Z95 = 1.959963984540054  # two-sided 95% normal quantile
_LN2 = math.log(2.0)


# --- the variational bound ---------------------------------------------------------------------
def _strata(first: int, last: int, terms: int) -> list[tuple[int, int]]:
    """[first, last] cut into ``terms`` strata [lo, hi) of (nearly) equal width; all single steps if terms covers it."""
    n = last - first + 1
    if terms >= n:
        return [(t, t + 1) for t in range(first, last + 1)]
    edges = [first + round(i * n / terms) for i in range(terms + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


@torch.no_grad()
def nll_bound(
    model: Model,
    diffusion: Diffusion,
    x0: torch.Tensor,
    *,
    variance: str | None = None,
    discrete: bool = True,
    terms: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> dict[str, torch.Tensor]:
    """The variational bound on -log p(x0) per image (nats), split into its parts; float64 tensors of shape (B,).

    ``x0``: (B, ...) in [-1, 1] (8-bit values when ``discrete``). The model is called with x_t in
    x0's dtype. Returns ``{"prior", "kl", "decoder", "total"}``. ``callback`` gets ``{"t"}``
    after each model call.
    """
    variance = diffusion.reverse_variance(variance)
    T = diffusion.num_timesteps
    b = x0.shape[0]
    x0_64 = x0.to(torch.float64)
    dims = tuple(range(1, x0.ndim))

    def term(t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """L_{t-1} per image (DDPM eq. 5): p's mean from the network's x0, its variance per ``variance``."""
        t_vec = t if isinstance(t, torch.Tensor) else torch.full((b,), t, dtype=torch.int64, device=x0.device)
        x_t = diffusion.q_sample(x0_64, t_vec, eps)
        out = model(x_t.to(x0.dtype), t_vec).to(torch.float64)
        mean, log_var, _, _ = diffusion.p_mean_variance(out, x_t, t_vec, variance)
        if callback is not None:
            callback({"t": t})
        return diffusion.vlb_terms(x0_64, x_t, t_vec, mean, log_var, discrete)

    # L_T: q(x_{T-1} | x0) against the N(0, I) the reverse process starts from
    mean_T, var_T = diffusion.q_mean_variance(x0_64, torch.full((b,), T - 1, dtype=torch.int64, device=x0.device))
    prior = _normal_kl(mean_T, var_T, torch.zeros_like(mean_T), torch.ones_like(var_T)).sum(dims)

    kl = torch.zeros(b, dtype=torch.float64, device=x0.device)
    strata = _strata(1, T - 1, T - 1 if terms is None else max(1, int(terms))) if T > 1 else []
    for lo, hi in strata:
        # one uniform t per image in each stratum (independent across images, so the interval over
        # images covers this sampling too), weighted by the stratum's width
        t_vec = torch.randint(lo, hi, (b,), generator=generator).to(x0.device) if hi - lo > 1 else lo
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
        kl += (hi - lo) * term(t_vec, eps)

    # L_0: the decoder p(x0 | x_0-noisy) with mean x0_pred (eq. 7 at t = 0) and the variance at t = 0
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    decoder = term(0, eps)
    return {"prior": prior, "kl": kl, "decoder": decoder, "total": prior + kl + decoder}


@dataclass(frozen=True)
class NLLResult:
    """Bits/dim over a set of images: the mean of the per-image bound and its 95% interval."""

    bits_per_dim: float
    ci95: tuple[float, float]
    per_image: torch.Tensor  # (N,) float64 bits/dim
    parts: dict[str, float]  # mean bits/dim of prior, kl, decoder
    images: int
    terms: int  # KL steps evaluated (T - 1 is the exact bound)
    timesteps: int
    variance: str

    def to_dict(self) -> dict:
        return {"bits_per_dim": self.bits_per_dim, "ci95": list(self.ci95), "images": self.images,
                "terms": self.terms, "timesteps": self.timesteps, "variance": self.variance,
                "parts": self.parts}  # fmt: skip


def mean_ci(values: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """Mean and normal 95% interval (mean +- 1.96 standard errors) of a 1-D sample."""
    v = values.to(torch.float64)
    m = float(v.mean())
    if v.numel() < 2:
        return m, (math.nan, math.nan)
    half = Z95 * float(v.std(unbiased=True)) / math.sqrt(v.numel())
    return m, (m - half, m + half)


def bits_per_dim(
    model: Model,
    diffusion: Diffusion,
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    variance: str | None = None,
    terms: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
) -> NLLResult:
    """Bits/dim of 8-bit ``images`` (N, C, H, W) uint8 under the discretised bound (see :func:`nll_bound`).

    ``callback`` gets ``{"done", "total"}`` in model calls.
    """
    from .data import to_model_range

    n = images.shape[0]
    dims = images[0].numel()
    T = diffusion.num_timesteps
    k = T - 1 if terms is None else max(1, min(int(terms), T - 1))
    total_calls = math.ceil(n / batch_size) * (k + 1 if T > 1 else 1)
    done = 0
    per_image, parts = [], {"prior": [], "kl": [], "decoder": []}

    def tick(_: dict) -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback({"done": done, "total": total_calls})

    for start in range(0, n, batch_size):
        x0 = to_model_range(images[start : start + batch_size].to(device))
        out = nll_bound(model, diffusion, x0, variance=variance, discrete=True, terms=None if k == T - 1 else k,
                        generator=generator, callback=tick)  # fmt: skip
        scale = 1.0 / (dims * _LN2)
        per_image.append(out["total"].cpu() * scale)
        for name in parts:
            parts[name].append(out[name].cpu() * scale)
    values = torch.cat(per_image)
    mean, ci = mean_ci(values)
    return NLLResult(bits_per_dim=mean, ci95=ci, per_image=values,
                     parts={name: float(torch.cat(v).mean()) for name, v in parts.items()},
                     images=n, terms=k, timesteps=T, variance=diffusion.reverse_variance(variance))  # fmt: skip


# --- features ------------------------------------------------------------------------------------
RANDCONV_SIZE = 32  # images are resized to 32x32 first
RANDCONV_WIDTHS = (32, 64, 128, 128)  # four 3x3 convs; the last three stride 2 -> 4x4; 128-d pool
RANDCONV_GENERATOR_SEED = 0  # fixes the weights: the same features on every machine and version


class RandConvFeatures(nn.Module):
    """A fixed conv net with random He-normal weights (no training, no download): 128-d features.

    Random, untrained conv features still separate image distributions (Naeem et al. 2020,
    "Reliable Fidelity and Diversity Metrics for Generative Models", sec. 5, use randomly
    initialised networks where ImageNet features do not fit). Input: uint8 (N, C, H, W), C in
    {1, 3}; greyscale is repeated to 3 channels and every image resized to 32x32.
    """

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(RANDCONV_GENERATOR_SEED)
        layers, cin = [], 3
        for i, cout in enumerate(RANDCONV_WIDTHS):
            conv = nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
            cin = cout
        self.net = nn.Sequential(*layers)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 127.5 - 1.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != RANDCONV_SIZE or x.shape[-2] != RANDCONV_SIZE:
            x = F.interpolate(x, size=(RANDCONV_SIZE, RANDCONV_SIZE), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > RANDCONV_SIZE)  # fmt: skip
        return self.net(x).mean(dim=(2, 3))


INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def _inception() -> nn.Module:
    """pytorch-fid's Inception-v3 (pool3, 2048-d); its weights are fetched from GitHub on first use."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError as err:
        raise Unsupported(
            "--features inception needs the optional pytorch-fid package: pip install 'diffuse-cli[fid]' "
            "(or use the default --features randconv, which needs no download)"
        ) from err
    try:
        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except (OSError, RuntimeError, ValueError) as err:  # URLError/HTTPError are OSErrors; a bad download RuntimeError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise Unsupported(
            f"cannot fetch the Inception-v3 weights for FID ({reason}): pytorch-fid downloads {INCEPTION_WEIGHTS} "
            "from github.com on first use into the torch hub cache (~/.cache/torch/hub/checkpoints/); connect once, "
            "or copy the file there (or use --features randconv, which needs no download)"
        ) from err


@torch.no_grad()
def extract_features(images: torch.Tensor, features: str = "randconv", *, batch_size: int = 64,
                     device: torch.device | str = "cpu", net: nn.Module | None = None) -> torch.Tensor:  # fmt: skip
    """Features of uint8 images (N, C, H, W): (N, D) float64."""
    if features not in EVAL_FEATURES:
        raise ConfigError(f"unknown features {features!r}; choose one of {', '.join(EVAL_FEATURES)}")
    if net is None:
        net = RandConvFeatures() if features == "randconv" else _inception()
    net = net.to(device).eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        if features == "inception":
            x = x.to(torch.float32) / 255.0  # pytorch-fid takes [0, 1] and rescales itself
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            f = net(x)[0].flatten(1)
        else:
            f = net(x)
        out.append(f.to("cpu", torch.float64))
    return torch.cat(out)


# --- Frechet distance, precision, recall ----------------------------------------------------------
def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(0.5 * (a + a.T))
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def gaussian_frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau 1982).

    tr((cov1 cov2)^{1/2}) is taken as tr((S1^{1/2} cov2 S1^{1/2})^{1/2}), a symmetric PSD matrix with
    the same eigenvalues, so only symmetric eigendecompositions are needed (float64).
    """
    mu1, mu2, cov1, cov2 = (x.to(torch.float64) for x in (mu1, mu2, cov1, cov2))
    s1 = _sqrtm_psd(cov1)
    middle = torch.linalg.eigvalsh(0.5 * ((s1 @ cov2 @ s1) + (s1 @ cov2 @ s1).T)).clamp(min=0).sqrt().sum()
    value = float((mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * middle)
    return max(value, 0.0)


def frechet_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets (N, D)."""
    f1, f2 = feats1.to(torch.float64), feats2.to(torch.float64)
    if f1.shape[0] < 2 or f2.shape[0] < 2:
        raise ConfigError("the Frechet distance needs at least 2 images in each set")
    return gaussian_frechet_distance(f1.mean(0), torch.cov(f1.T).reshape(f1.shape[1], -1), f2.mean(0),
                                     torch.cov(f2.T).reshape(f2.shape[1], -1))  # fmt: skip


def _kth_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls; features (N, D)."""
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise ConfigError(f"precision/recall need more than k = {k} images in each set")
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (N_fake, N_real)
    precision = float((d <= r_real[None, :]).any(dim=1).to(torch.float64).mean())
    recall = float((d.T <= r_fake[None, :]).any(dim=1).to(torch.float64).mean())
    return precision, recall


# --- generating and the whole evaluation ----------------------------------------------------------
def sample_quality(real: torch.Tensor, fake: torch.Tensor, *, features: str = "randconv", batch_size: int = 64,
                   device: torch.device | str = "cpu", net: nn.Module | None = None) -> dict:  # fmt: skip
    """Frechet distance and precision/recall between two uint8 image sets, in the given features."""
    f_real = extract_features(real, features, batch_size=batch_size, device=device, net=net)
    f_fake = extract_features(fake, features, batch_size=batch_size, device=device, net=net)
    precision, recall = precision_recall(f_real, f_fake)
    return {"frechet_distance": frechet_distance(f_real, f_fake), "features": features,
            "is_fid": features == "inception", "feature_dim": int(f_real.shape[1]), "precision": precision,
            "recall": recall, "k": PR_K, "real": int(real.shape[0]), "generated": int(fake.shape[0])}  # fmt: skip


def _pick_real(images: torch.Tensor, num: int, gen: torch.Generator) -> torch.Tensor:
    """A random subset of ``num`` images (all of them if there are fewer), in their original order."""
    if images.shape[0] > num:
        images = images[torch.randperm(images.shape[0], generator=gen)[:num].sort().values]
    return images


MEMORISATION_FEATURES_MAX = 10_000  # training images whose features eval computes for the nearest distances


def _memorisation(fake: torch.Tensor, ds, picture: Path, seed: int, device) -> dict:
    """Near-copies of the training images among the samples (:mod:`.memorisation`), and the picture of each
    sample beside its nearest training images. Distances in features (randconv) only for data sets of at most
    MEMORISATION_FEATURES_MAX images; the near-copy criterion itself is in pixels."""
    from .images import save_image
    from .memorisation import memorisation, nearest_picture

    small = ds.images.shape[0] <= MEMORISATION_FEATURES_MAX
    mem = memorisation(fake, ds.images, sample_features=extract_features(fake, device=device) if small else None,
                       train_features=extract_features(ds.images, device=device) if small else None,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    save_image(nearest_picture(fake, ds.images, mem), picture)
    return {**mem.to_dict(), "picture": str(picture)}


def run(
    checkpoint,
    data_spec: str,
    *,
    num_images: int = 500,
    nll: bool = True,
    fd: bool = True,
    features: str = "randconv",
    variance: str | None = None,
    terms: int | None = None,
    sampler: str = "dpmpp",
    steps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    log=None,
    callback: Callback | None = None,
) -> tuple[dict, Path]:
    """``diffuse eval``: the report (a JSON-ready dict) for a model on real data, and the JSON-lines file
    it was appended to (``log``; default: ``eval.jsonl`` in the run folder).

    ``callback`` receives ``{"event": "info", ...}`` once the model and data are loaded and
    ``{"event": "progress", "task": name, "done": k, "total": n}`` while the metrics are computed."""
    import datetime

    from . import samplers
    from .data import load_dataset
    from .device import ThreadPolicy, resolve_device
    from .fileio import append_jsonl, check_appendable
    from .generate import generate
    from .models import load_for_sampling

    emit = callback or (lambda e: None)
    check_seed(seed)  # before any work, as sample does
    if num_images < 2 or (fd and num_images <= PR_K):
        raise ConfigError(f"--num-images must be at least {PR_K + 1 if fd else 2} (got {num_images})")
    if not (nll or fd):
        raise ConfigError("nothing to evaluate: --no-nll and --no-fd together leave no metric")
    checkpoint = Path(checkpoint)
    log_path = check_appendable(
        Path(log) if log is not None else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "eval.jsonl"
    )
    dev = resolve_device(device)
    policy = ThreadPolicy(threads, dev)  # ``threads`` None: follow the machine's load (re-checked per batch)
    model, diffusion, ck = load_for_sampling(checkpoint, dev)
    T = diffusion.num_timesteps
    if fd:
        steps = steps if steps is not None else samplers.default_steps(sampler, T)
        samplers.timestep_grid(diffusion, steps)  # checks --steps before any work
    c, size = model.config.in_channels, model.config.image_size
    ds = load_dataset(
        data_spec,
        size,
        c,
        lambda done, total: emit({"event": "progress", "task": "decode", "done": done, "total": total}),
    )
    gen = torch.Generator().manual_seed(seed)
    real = _pick_real(ds.images, num_images, gen)
    n = real.shape[0]
    if n < 2 or (fd and n <= PR_K):
        raise ConfigError(f"{data_spec} has {n} usable image(s); the metrics need at least {PR_K + 1}")
    emit({"event": "info", "checkpoint": ck, "data": ds.summary.source, "images": n, "device": str(dev), "T": T})
    report: dict = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "model": str(ck.path), "step": ck.step, "data": ds.summary.source, "images": n, "seed": seed}  # fmt: skip

    def progress(task: str, total: int | None):
        return lambda done, tot=total: emit({"event": "progress", "task": task, "done": done, "total": tot})

    policy.start()
    if nll:
        bar = progress("bits/dim", None)
        res = bits_per_dim(model, diffusion, real, batch_size=batch_size, variance=variance, terms=terms, generator=gen,
                           device=dev, callback=lambda e: (bar(e["done"], e["total"]), policy.update()))  # fmt: skip
        report["nll"] = res.to_dict()
    if fd:
        from .data import from_model_range

        fake = from_model_range(generate(model, diffusion, n, (c, *model.config.hw), sampler=sampler, steps=steps,
                                         seed=seed, batch_size=batch_size, device=dev, clip_x0=True,
                                         progress=progress("generate", n), threads=policy))  # fmt: skip
        progress(f"features ({features})", None)(0)
        q = sample_quality(real, fake, features=features, batch_size=batch_size, device=dev)
        report["fd"] = {"value": q["frechet_distance"], "features": features, "is_fid": q["is_fid"],
                        "feature_dim": q["feature_dim"], "generated": n, "sampler": sampler, "steps": steps}  # fmt: skip
        report["precision"], report["recall"], report["pr_k"] = q["precision"], q["recall"], q["k"]
        progress("memorisation", None)(0)
        report["memorisation"] = _memorisation(fake, ds, log_path.with_name("nearest.png"), seed, dev)
    append_jsonl(log_path, report)
    return report, log_path


def kernel_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """Kernel (Inception) Distance, KID (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 4): the unbiased
    estimate of MMD^2 with the cubic kernel k(x, y) = (x.y / D + 1)^3 between two feature sets (N, D).

    Unlike the Frechet distance it has no bias at small counts: its expectation is 0 when both sets
    come from one distribution, whatever their sizes (it can then come out slightly negative).
    """
    x, y = feats1.to(torch.float64), feats2.to(torch.float64)
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2:
        raise ConfigError("the kernel distance needs at least 2 images in each set")
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1)) + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(off - 2.0 * k_xy.mean())
