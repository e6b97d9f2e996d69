"""Small folders without copying: non-leaking augmentation against no augmentation and plain flips.

Subsets of the built-in digits (8x8 by default; the defaults were chosen with --size 16), e.g. 100, 200 and
500 images drawn from the even half so the odd half stays unseen, are trained with the ``tiny`` preset for
the same number of steps, several ways:

* ``none``: no augmentation, the preset's dropout 0 (``--early-steps`` adds it at a shorter budget too,
  to show whether longer training copies more);
* ``flip``: plus ``--flip`` (random mirror images, not conditioned on);
* ``pX`` / ``pX-dY``: ``--augment X`` (and ``--dropout Y``), the augmentation vector as conditioning,
  zero at sampling (Karras et al. 2022, app. C.4);
* ``default``: whatever ``plan.regularisation`` gives this many images (today p 0.12 and dropout 0.1 up to 100
  images, ``none`` above; measured as ``p0.12-d0.1``, the same run under its own name).

A copier row (draws of the subset itself) shows what pure copying scores.

Each model draws the same number of samples (same seed) with the default sampler, scored by:

* FD: the Frechet distance of ``_digits_quality`` (digit-classifier features) to the held-out odd half
  of the digits: the full distribution, not the subset the model saw;
* near-copy share: samples whose nearest training image (L2 in pixels) is closer than 1/3 of the
  mean distance to their 50 nearest training images (Carlini et al. 2023, "Extracting Training Data
  from Diffusion Models", sec. 4.2 criterion);
* no-leak statistics: the classifier's confidence, the centre of mass, the orientation of the
  second moments and the spread of the ink (image moments), against the real digits' mean and spread.

Training is single-threaded and counted in steps, so the results do not depend on the machine's load.
Every run is cached (samples and scores) under the benchmark cache, so the report can be rebuilt:

    python -m benchmarks.augment --sizes 100          # one subset (two processes can share the work)
    python -m benchmarks.augment --markdown benchmarks/RESULTS.md
    python -m benchmarks.augment --steps 20 --num 16 --sizes 100   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import tempfile
from pathlib import Path

import torch

from diffuse_cli.engine import memorisation, models
from diffuse_cli.engine.config import AUGMENT_DIM, DiffusionConfig, TrainConfig, UNetConfig
from diffuse_cli.engine.data import from_model_range, load_builtin
from diffuse_cli.engine.generate import generate
from diffuse_cli.engine.plan import regularisation
from diffuse_cli.engine.training import train

from ._common import cpu_name, replace_section
from ._digits_quality import fd_full, predict, score
from ._trained import cache_dir

MARK_START, MARK_END = "<!-- augment:start -->", "<!-- augment:end -->"
VARIANTS = ("none", "flip", "p0.05@100", "p0.12", "p0.12-d0.1@100")
NEAR_COPY_RATIO, NEIGHBOURS = memorisation.NEAR_COPY_RATIO, memorisation.NEAR_COPY_K


def subset(n: int, size: int = 16) -> torch.Tensor:
    """``n`` digits from the even half (a fixed, seeded choice): uint8 (n, 1, size, size)."""
    images = load_builtin("digits", image_size=size).images[0::2]
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(n))[:n]
    return images[idx.sort().values]


def configs(variant: str, n: int, steps: int, batch: int, size: int) -> tuple[UNetConfig, TrainConfig]:
    """The configs of a variant: ``none``, ``flip``, ``default`` (plan.regularisation's), ``pX`` (augment p = X,
    the preset's dropout) and ``pX-dY`` (augment p = X, dropout Y)."""
    p, dropout = regularisation(n) if variant == "default" else (0.0, None)
    if variant.startswith("p"):
        p_text, _, d_text = variant[1:].partition("-d")
        p, dropout = float(p_text), (float(d_text) if d_text else None)
    overrides = {"augment_dim": AUGMENT_DIM if p else 0}
    if dropout is not None:
        overrides["dropout"] = dropout
    model = UNetConfig.preset("tiny", size, 1, **overrides)
    tc = TrainConfig(steps=steps, batch_size=batch, hflip=variant == "flip", augment=p, sample_every=0,
                     save_every=steps, log_every=100, threads=1, seed=0)  # fmt: skip
    return model, tc


def near_copies(samples: torch.Tensor, train_u8: torch.Tensor) -> dict:
    """Near-copy share (``engine.memorisation``: Carlini et al. 2023's criterion) and the mean distance to the
    nearest training image, in pixels scaled to 0..1."""
    d1 = memorisation.nearest(samples, train_u8)[0][:, 0] / 255
    return {"near_copy": memorisation.near_copy_share(samples, train_u8), "nn_dist": float(d1.mean())}


def moments(images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: centre of mass (x, y in pixels from the centre), orientation of the ink's second moments
    (degrees; 0 = upright), and its spread (pixels): what a shift, rotation or scaling would change."""
    w = images_u8[:, 0].double()
    s = w.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
    mass = w.sum((1, 2)).clamp_min(1e-9)
    cx = (w * xs).sum((1, 2)) / mass
    cy = (w * ys).sum((1, 2)) / mass
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    m20, m02, m11 = ((w * dx * dx).sum((1, 2)) / mass, (w * dy * dy).sum((1, 2)) / mass,
                     (w * dx * dy).sum((1, 2)) / mass)  # fmt: skip
    angle = 0.5 * torch.atan2(2 * m11, m02 - m20) * 180 / math.pi  # of the long axis from vertical
    return {"com_x": cx - (s - 1) / 2, "com_y": cy - (s - 1) / 2, "angle": angle, "spread": (m20 + m02).sqrt()}


def leak_stats(images_u8: torch.Tensor) -> dict:
    """Mean and standard deviation over images of each moment and of the classifier's confidence; for the
    orientation also a robust spread (1.4826 x the median absolute deviation, the sd for normal data), which
    a few malformed samples with an ill-defined long axis cannot inflate, while rotated copies would."""
    m = moments(images_u8)
    stats = {k: (float(v.mean()), float(v.std())) for k, v in m.items()}
    stats["angle_robust_sd"] = float(1.4826 * (m["angle"] - m["angle"].median()).abs().median())
    conf = predict(images_u8)[1]
    stats["confidence"] = (float(conf.mean()), float(conf.std()))
    return stats


def _key(variant: str, n: int, size: int, steps: int, batch: int, num: int, p: float) -> str:
    """Cache name; v2: augmented models read the vector in unit-scale entries, before the time MLP."""
    version = "v2" if p else "v1"  # models without augmentation are unchanged since v1
    return f"augment-{version}-{variant}-{n}-{size}px-{steps}-{batch}-{num}"


def run_one(
    variant: str, n: int, steps: int, batch: int, num: int, size: int, log=print, cached_only: bool = False
) -> dict | None:
    """Train (or read from the cache) one model and score its samples; None if not cached and ``cached_only``."""
    model_cfg, tc = configs(variant, n, steps, batch, size)
    key = _key(variant, n, size, steps, batch, num, tc.augment)
    path = cache_dir() / f"{key}.json"
    if path.exists():
        result = json.loads(path.read_text())
        if "fd_full" not in result or "angle_robust_sd" not in result["leak"]:  # scored before these existed
            samples = torch.load(cache_dir() / f"{key}.pt")  # our own cache of generated uint8 samples
            result["fd_full"], result["leak"] = fd_full(samples), leak_stats(samples)
            path.write_text(json.dumps(result, indent=1))
        return result
    if cached_only:
        return None
    data = load_builtin("digits", image_size=size)
    images = subset(n, size)
    data = dataclasses.replace(data, images=images.contiguous(), labels=None, classes=(), notes=())
    with tempfile.TemporaryDirectory() as tmp:
        log(f"training {key}: {model_cfg.dropout=} {tc.augment=} {tc.hflip=}")
        out = train(data, Path(tmp) / "run", model_cfg, DiffusionConfig(), tc, device="cpu",
                    callback=lambda e: e.get("event") == "log" and e["step"] % 500 == 0 and log(f"  {key} {e['step']}"))  # fmt: skip
        model, diffusion, _ = models.load_for_sampling(out["model"], "cpu")
        x0 = generate(model, diffusion, num, (1, size, size), seed=1, batch_size=num, device="cpu", clip_x0=True)
    samples = from_model_range(x0)
    torch.save(samples, cache_dir() / f"{key}.pt")
    result = {**score(samples), "fd_full": fd_full(samples), **near_copies(samples, images), "leak": leak_stats(samples),
              "variant": variant, "n": n, "size": size, "steps": steps, "batch": batch, "num": num,
              "dropout": model_cfg.dropout, "augment": tc.augment, "hflip": tc.hflip}  # fmt: skip
    path.write_text(json.dumps(result, indent=1))
    return result


def copier(n: int, size: int, num: int) -> dict:
    """What a model that only copies would score: ``num`` draws (with replacement) from the ``n`` training images."""
    images = subset(n, size)
    samples = images[torch.randint(0, n, (num,), generator=torch.Generator().manual_seed(1))]
    return {**score(samples), "fd_full": fd_full(samples), **near_copies(samples, images), "leak": leak_stats(samples),
            "variant": "copier", "n": n, "size": size, "steps": 0, "num": num, "dropout": "-", "augment": "-",
            "hflip": False}  # fmt: skip


def save_grid(n: int, results: list[dict], path: Path) -> None:
    """Rows of 16: training images of the subset, then each variant's first samples (docs picture)."""
    from diffuse_cli.engine import images as img

    rows = [subset(n, results[0]["size"])[:16]]
    for r in results:
        if r["variant"] == "copier":
            continue
        key = _key(r["variant"], n, r["size"], r["steps"], r["batch"], r["num"], r["augment"])
        rows.append(torch.load(cache_dir() / f"{key}.pt")[:16])
    img.save_image(img.upscale(img.make_grid(torch.cat(rows), nrow=16), 640), path)


def _fmt(pair: tuple[float, float], digits: int = 2) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def markdown(results: list[dict], real: dict, command: str, notes: str = "") -> str:
    r0 = next(r for r in results if r["variant"] != "copier")
    lines = [
        MARK_START,
        "## Small data: non-leaking augmentation (`benchmarks/augment.py`, issue 23)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.date.today()}; CPU: {cpu_name()}; every model trained single-threaded (two or three "
        "at a time on 2 cores) for a fixed number of steps, so the numbers do not depend on the load",
        f"- data: subsets of the even half of the {r0['size']}x{r0['size']} built-in digits; `tiny` preset, batch "
        f"{r0['batch']}; {r0['num']} samples per model (seed 1, default sampler)",
        "- FD full: digit-classifier Frechet distance to all 1,797 digits (the whole distribution, not the subset); "
        "FD held-out: the same to the odd half, which neither the models nor the classifier saw; near-copy: share "
        f"of samples whose nearest training image is closer than {NEAR_COPY_RATIO:.2f} of the mean distance to "
        f"their {NEIGHBOURS} nearest (Carlini et al. 2023; `engine/memorisation.py`); NN dist: mean L2 distance "
        "(pixels in 0..1) to the nearest training image; copier: 256 draws of the subset itself, what a model "
        "that only copies would score",
        "",
        "| images | variant | steps | augment p | dropout | flip | FD full | FD held-out | near-copy | NN dist | confident |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']} | {r['variant']} | {r['steps'] or '-'} | {r['augment']} | {r['dropout']} | "
            f"{'yes' if r['hflip'] else 'no'} | {r['fd_full']:.1f} | {r['fd']:.1f} | {100 * r['near_copy']:.0f}% | "
            f"{r['nn_dist']:.2f} | {100 * r['confident']:.0f}% |"
        )
    lines += [
        "",
        "No leak: image moments (mean ± standard deviation over images) of the samples against all 1,797 real "
        "digits, and the classifier's confidence. A leaking augmentation would move the centre of mass, tilt the "
        "orientation or widen its spread (the robust sd of the orientation is 1.4826 x its median absolute "
        "deviation: malformed samples with no clear long axis inflate the plain sd, rotated copies would widen "
        "both)"
        + (
            ". At 8x8 the digits touch the top and bottom rows, so reflection padding hides vertical shifts "
            "from the vertical centre; the horizontal centre shows them."
            if r0["size"] == 8
            else "."
        ),
        "",
        "| images | variant | steps | centre x (px) | centre y (px) | orientation (deg) | orientation, robust sd "
        "| ink spread (px) | confidence |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| 1797 | real digits | - | {_fmt(real['com_x'])} | {_fmt(real['com_y'])} | {_fmt(real['angle'], 1)} | "
        f"{real['angle_robust_sd']:.1f} | {_fmt(real['spread'])} | {_fmt(real['confidence'])} |",
    ]
    for r in results:
        s = r["leak"]
        lines.append(
            f"| {r['n']} | {r['variant']} | {r['steps'] or '-'} | {_fmt(s['com_x'])} | {_fmt(s['com_y'])} | "
            f"{_fmt(s['angle'], 1)} | {s['angle_robust_sd']:.1f} | {_fmt(s['spread'])} | {_fmt(s['confidence'])} |"
        )
    if notes:
        lines += ["", notes.strip()]
    lines.append(MARK_END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,500", help="subset sizes, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--size", type=int, default=8, help="image side: 8 (the digits' own) or 16")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--early-steps", type=int, default=0, help="also report none and flip at this many steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--num", type=int, default=256, help="samples per model")
    ap.add_argument("--markdown", type=Path, help="write the section into this RESULTS.md")
    ap.add_argument("--notes", type=Path, help="a file of reading notes to put at the end of the section")
    ap.add_argument("--grids", type=Path, help="write a picture per subset size into this folder")
    ap.add_argument("--cached-only", action="store_true", help="report the runs already in the cache, train none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    for n in map(int, args.sizes.split(",")):
        if args.markdown:
            results.append(copier(n, args.size, args.num))
        runs = [(v, args.early_steps) for v in ("none", "flip") if args.early_steps]
        for v in args.variants.split(","):  # "p0.05@100": only for the 100-image subset
            name, _, only = v.partition("@")
            if not only or int(only) == n:
                runs.append((name, args.steps))
        for variant, steps in runs:
            r = run_one(variant, n, steps, args.batch, args.num, args.size, cached_only=args.cached_only)
            if r is None:
                print(f"not in the cache, left out: {variant} on {n} images, {steps} steps")
                continue
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "leak"}))
    if args.grids:
        for n in map(int, args.sizes.split(",")):
            rows = [r for r in results if r["n"] == n and r["steps"] == args.steps]
            if rows:
                save_grid(n, rows, args.grids / f"augment-{n}.png")
    if args.markdown:
        real = leak_stats(load_builtin("digits", image_size=args.size).images)
        command = (f"python -m benchmarks.augment --size {args.size} --steps {args.steps} --early-steps "
                   f"{args.early_steps} --batch {args.batch} --num {args.num} --sizes {args.sizes} --variants {args.variants}")  # fmt: skip
        notes = args.notes.read_text() if args.notes else ""
        section = markdown(results, real, command + f" --markdown {args.markdown}", notes)
        replace_section(args.markdown, section, MARK_START, MARK_END)
        print(section)


if __name__ == "__main__":
    main()
