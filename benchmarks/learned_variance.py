"""Issue #22: DDPM's fixed reverse variance against Improved DDPM's learned one, on the digits.

Two pairs of models, each pair the same U-Net (1.6M parameters; the learned one has 2C output
channels, +289 weights), the same data, seed and number of steps, trained by the engine
(``benchmarks/_trained.py``, cached): the built-in 8x8 digits (4,000 steps: at 1,200 the variance head
had not yet learned its t-dependence, see RESULTS.md) and the digits at 16x16 (900 steps, issue #16's
model), linear schedule, T = 1000, eps prediction. "fixed" is
today's default (L_simple, reverse variance beta_t); "learned" is ``--variance learned``
(L_hybrid with lambda = 0.001, Nichol & Dhariwal 2021, sec. 3.1; uniform t).

For each model:

- bits/dim of held-out real digits (the odd half, ``_digits_quality.digits``), the variational bound
  of Ho et al. 2020 eq. 5 with the discretised decoder (eq. 13), ``--terms`` of the T - 1 KL steps
  (stratified, unbiased), with its 95% interval over images. The fixed model uses beta_t (its default
  in ``diffuse eval``), the learned one its own variance;
- DDPM ancestral sampling (Algorithm 2) with 25, 50, 100 respaced steps (Nichol & Dhariwal sec. 4,
  the sampler's default "logsnr" grid) and all T = 1000, from the same x_T and noise for both models;
  Frechet distance in the digit classifier's features (``_digits_quality.score``) against the held-out half.

    python -m benchmarks.learned_variance --size 8 --json /tmp/lv8.json      # one size per process
    python -m benchmarks.learned_variance --size 16 --json /tmp/lv16.json
    python -m benchmarks.learned_variance --report /tmp/lv8.json /tmp/lv16.json --markdown benchmarks/RESULTS.md
    python -m benchmarks.learned_variance --size 16 --picture docs/learned-variance.png   # the README's picture
    python -m benchmarks.learned_variance --size 8 --train-steps 2000 --paired --json /tmp/lv8p.json  # longer budget
    python -m benchmarks.learned_variance --size 8 --headroom --json /tmp/lv8h.json   # what a t-only variance gains

``--train-steps`` trains both models of the pair for that many steps (their own cache entries); ``--headroom``
scores the bound's terms with beta_t, with the best variance that depends on t only (chosen on the evaluation
images themselves) and with a learned model's own variance, on the same draws of t and noise.

Intermediate results are kept in the ``--json`` file, so a rerun continues where one stopped.
Quality numbers only: no timings, so a shared machine changes nothing but the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
from pathlib import Path

import torch

from diffuse_cli.engine import evaluate, samplers
from diffuse_cli.engine.data import from_model_range, to_model_range

from ._common import cpu_name, replace_section
from ._digits_quality import digits, score
from ._trained import SPECS, trained_model

STEPS = (25, 50, 100, 1000)
PAIRS = {8: ("digits8-eps", "digits8-eps-learned"), 16: ("digits16-eps", "digits16-eps-learned")}


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def spec(name: str, train_steps: int | None = None):
    """The benchmark model ``name`` of ``_trained.SPECS``, trained for ``train_steps`` steps instead (same everything
    else, its own cache entry) when given: both models of a pair get the same budget."""
    return SPECS[name] if train_steps is None else dataclasses.replace(SPECS[name], steps=train_steps)


def run(size: int, out: Path, num: int, nll_images: int, terms: int, only: str | None = None, log=print,
        train_steps: int | None = None) -> dict:  # fmt: skip
    results = _load(out)
    held = digits(size, "heldout")[0]
    for name in [n for n in PAIRS[size] if only in (None, n)]:
        model, diffusion, _ = trained_model(spec(name, train_steps), log=log)
        r = results.setdefault(
            name, {"variance": diffusion.reverse_variance(), "train_steps": spec(name, train_steps).steps}
        )
        if "nll" not in r:
            res = evaluate.bits_per_dim(model, diffusion, held[:nll_images], batch_size=100, terms=terms,
                                        generator=torch.Generator().manual_seed(0))  # fmt: skip
            r["nll"] = {"bits_per_dim": res.bits_per_dim, "ci95": list(res.ci95), "parts": res.parts,
                        "images": res.images, "terms": res.terms}  # fmt: skip
            log(f"{name}: {res.bits_per_dim:.3f} bits/dim {res.ci95}")
            _save(out, results)
        for steps in STEPS:
            key = f"ddpm{steps}"
            if key in r:
                continue
            x_T = torch.randn(num, 1, size, size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                x0 = samplers.ddpm(model, diffusion, x_T, steps=steps, generator=torch.Generator().manual_seed(2))
            r[key] = score(from_model_range(x0))
            log(f"{name}: DDPM {steps} steps FD {r[key]['fd']:.2f}")
            _save(out, results)
    return results


def paired(size: int, out: Path, nll_images: int, terms: int, log=print, train_steps: int | None = None) -> dict:
    """Bits/dim of the same held-out images, with the same draws of t and noise, for the fixed model (beta_t) and
    the learned one with its own variance and with beta_t: per-image differences give a tight interval, and the
    learned model with beta_t separates what the variance does from what the hybrid loss did to the mean."""
    results = _load(out)
    held = digits(size, "heldout")[0][:nll_images]
    fixed, learned = PAIRS[size]
    per = {}
    for name, variance in ((fixed, "beta"), (learned, "learned"), (learned, "beta")):
        model, diffusion, _ = trained_model(spec(name, train_steps), log=log)
        res = evaluate.bits_per_dim(model, diffusion, held, batch_size=100, terms=terms, variance=variance,
                                    generator=torch.Generator().manual_seed(0))  # fmt: skip
        per[f"{name}/{variance}"] = res.per_image
        log(f"{name} with {variance}: {res.bits_per_dim:.4f} bits/dim")
    rows = {}
    for key, values in per.items():
        mean, ci = evaluate.mean_ci(values)
        rows[key] = {"bits_per_dim": mean, "ci95": list(ci)}
    for a, b in ((f"{learned}/learned", f"{fixed}/beta"), (f"{learned}/learned", f"{learned}/beta")):
        mean, ci = evaluate.mean_ci(per[a] - per[b])
        rows[f"{a} - {b}"] = {"bits_per_dim": mean, "ci95": list(ci)}
    results["paired"] = {"images": int(held.shape[0]), "terms": terms, "rows": rows,
                         "train_steps": spec(fixed, train_steps).steps}  # fmt: skip
    _save(out, results)
    return results


HEADROOM_SHIFTS = torch.linspace(-1.5, 1.5, 61, dtype=torch.float64)  # c of log sigma_t^2 = log beta_t + c


def headroom(size: int, out: Path, nll_images: int, log=print, train_steps: int | None = None) -> dict:
    """How much any reverse variance that depends on t only could gain over beta_t, for each model's own mean.

    For every t < 100 (where the bound lives and beta_t and beta~_t differ) and 100 stratified t above, the
    terms L_t of the bound (Ho et al. eq. 5, eq. 13 decoder at t = 0) of the held-out images with
    log sigma_t^2 = log beta_t + c, c on a grid; the best c per t is chosen on these same images, so the
    "best" row is an optimistic bound for every t-only variance (the optimal one of Bao et al. 2022 included).
    A learned variance can beat it only by varying per pixel; a learned model's own variance is scored on the
    same draws. In bits/dim, summed over the KL and decoder terms.
    """
    results = _load(out)
    x0 = to_model_range(digits(size, "heldout")[0][:nll_images]).to(torch.float64)
    for name in PAIRS[size]:
        if name in results.get("headroom", {}):
            continue
        gen = torch.Generator().manual_seed(0)  # the same t and noise for both models
        model, diffusion, _ = trained_model(spec(name, train_steps), log=log)
        T = diffusion.num_timesteps
        high = torch.arange(100, T, (T - 100) / 100).long()  # 100 strata of the rest, one t drawn in each
        high = high + (torch.rand(high.shape, generator=gen) * (T - 100) / 100).long()
        ts = [(t, 1.0) for t in range(100)] + [(int(t), (T - 100) / 100) for t in high.clamp(max=T - 1)]
        fixed_sum, best_sum, own_sum = 0.0, 0.0, 0.0
        for t_int, weight in ts:
            t = torch.full((x0.shape[0],), t_int)
            x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
            with torch.no_grad():
                net_out = model(x_t.float(), t).to(torch.float64)
            mean, log_var, _, _ = diffusion.p_mean_variance(net_out, x_t, t, "beta")
            bits = torch.stack([diffusion.vlb_terms(x0, x_t, t, mean, log_var + c).mean() for c in HEADROOM_SHIFTS])
            bits = bits / (x0[0].numel() * math.log(2.0))
            fixed_sum += weight * float(bits[HEADROOM_SHIFTS.abs().argmin()])
            best_sum += weight * float(bits.min())
            if diffusion.learned_variance:
                mean, log_var, _, _ = diffusion.p_mean_variance(net_out, x_t, t, "learned")
                own = diffusion.vlb_terms(x0, x_t, t, mean, log_var).mean() / (x0[0].numel() * math.log(2.0))
                own_sum += weight * float(own)
        row = {"beta": fixed_sum, "best_t_only": best_sum, "images": int(x0.shape[0]),
               "train_steps": spec(name, train_steps).steps}  # fmt: skip
        if diffusion.learned_variance:
            row["learned"] = own_sum
        results.setdefault("headroom", {})[name] = row
        log(f"{name}: terms with beta_t {fixed_sum:.4f}, best t-only variance {best_sum:.4f} bits/dim")
        _save(out, results)
    return results


def picture(size: int, path: Path, steps: int = 25, num: int = 24) -> None:
    """The two models of a pair side by side: DDPM with ``steps`` respaced steps from the same x_T and noise."""
    from diffuse_cli.engine import images

    grids, labels = [], []
    x_T = torch.randn(num, 1, size, size, generator=torch.Generator().manual_seed(1))
    for name in PAIRS[size]:
        model, diffusion, _ = trained_model(SPECS[name])
        with torch.no_grad():
            x0 = samplers.ddpm(model, diffusion, x_T, steps=steps, generator=torch.Generator().manual_seed(2))
        grids.append(images.make_grid(x0, nrow=8))
        labels.append(f"{diffusion.reverse_variance()} variance, DDPM {steps} steps")
    images.save_image(images.labelled_strip(grids, labels, panel_size=320), path)


SECTION = "## Learned variance vs fixed (issue #22, Improved DDPM)"
SECTION_END = "<!-- end of the learned-variance section -->"


def _train_steps(name: str, r: dict) -> int:
    return r.get("train_steps", SPECS[name].steps)  # files written before --train-steps: the SPECS budget


def markdown(files: list[Path], argv: str) -> str:
    """The RESULTS.md section from the ``--json`` files of the runs (any mix of sizes, models, budgets, ``--paired``
    and ``--headroom``)."""
    lines = [
        SECTION,
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu_name()}, 2 cores shared with other jobs "
        "(quality numbers only: load does not change them); torch threads 1",
        f"- commands: {argv}",
        "- models (`benchmarks/_trained.py`): U-Net 32/64/64, 2 blocks per level, attention at 8x8, batch 32, "
        "lr 2e-4, linear schedule, T = 1000, eps; 8x8: built-in digits; 16x16: the built-in digits resized "
        "to 16x16 (`load_builtin(..., image_size=16)`, as issue #16's model); training steps in the table. "
        "fixed = L_simple (today's default), learned = L_hybrid, lambda = 0.001, uniform t; within a pair the same "
        "seed, data order, learning rate and step count",
        "- bits/dim: held-out half of the digits, Ho et al. eq. 5 + eq. 13 decoder, stratified KL terms (unbiased), "
        "95% interval over images; fixed uses beta_t (`diffuse eval`'s default), learned its own variance",
        "- FD: Frechet distance in the digit classifier's features against the held-out half (lower is better); "
        "DDPM (Algorithm 2) from the same x_T and noise for both models, respaced on the default logsnr grid",
        "",
        "| size | model (variance) | train steps | bits/dim (95% CI) | FD DDPM 25 | FD 50 | FD 100 | FD 1000 (full T) "
        "| samples |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    extra = []
    for f in files:
        for name, r in _load(f).items():
            if name in ("paired", "headroom"):
                extra.append((name, r))
                continue
            size = SPECS[name].image_size
            nll = r["nll"]
            fds = " | ".join(f"{r[f'ddpm{s}']['fd']:.2f}" if f"ddpm{s}" in r else "-" for s in STEPS)
            n = r.get(f"ddpm{STEPS[0]}", {}).get("n", 0)
            lines.append(f"| {size}x{size} | {name} ({r['variance']}) | {_train_steps(name, r):,} | "
                         f"{nll['bits_per_dim']:.3f} ({nll['ci95'][0]:.3f} to {nll['ci95'][1]:.3f}; "
                         f"{nll['images']} images, {nll['terms']} terms) | {fds} | {n} |")  # fmt: skip
    for kind, p in extra:
        lines += _paired_lines(p) if kind == "paired" else _headroom_lines(p)
    return "\n".join(lines) + "\n"


def _paired_lines(p: dict) -> list[str]:
    first = next(iter(p["rows"])).split("/")[0]
    lines = ["", f"Paired bits/dim ({_train_steps(first, p):,} training steps): the same {p['images']} held-out "
                 f"images and the same draws of t and noise for every row ({p['terms']} terms); a difference's "
                 "interval is over per-image differences.",
             "", "| model / variance in the bound | bits/dim (95% CI) |", "|---|---|"]  # fmt: skip
    for key, row in p["rows"].items():
        lines.append(f"| {key} | {row['bits_per_dim']:+.4f} ({row['ci95'][0]:+.4f} to {row['ci95'][1]:+.4f}) |")
    return lines


def _headroom_lines(h: dict) -> list[str]:
    lines = ["", "Headroom (`--headroom`): the terms L_0..L_999 of the bound (every t < 100, 100 stratified t above) "
                 "with beta_t, with the best variance that depends on t only (log beta_t + c, c chosen per t on these "
                 "same images: optimistic), and with a learned model's own per-pixel variance, on the same draws.",
             "", "| model (train steps) | images | beta_t | best t-only | own learned |", "|---|---|---|---|---|"]  # fmt: skip
    for name, row in h.items():
        own = f"{row['learned']:.4f}" if "learned" in row else "-"
        lines.append(f"| {name} ({_train_steps(name, row):,}) | {row['images']} | {row['beta']:.4f} | "
                     f"{row['best_t_only']:.4f} | {own} |")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, choices=sorted(PAIRS))
    ap.add_argument("--json", type=Path, help="where results accumulate")
    ap.add_argument("--only", help="one model of the pair (to run the two in parallel processes)")
    ap.add_argument("--num", type=int, default=300, help="samples per FD")
    ap.add_argument("--nll-images", type=int, default=300)
    ap.add_argument("--terms", type=int, default=100, help="KL terms of the bound (of T - 1)")
    ap.add_argument("--report", type=Path, nargs="*", help="JSON files to turn into a RESULTS.md section")
    ap.add_argument("--markdown", type=Path, help="write (or replace) the section in this file")
    ap.add_argument("--commands", help="the commands that made the --report files, for the section")
    ap.add_argument("--paired", action="store_true", help="paired bits/dim of the pair of --size into --json")
    ap.add_argument("--train-steps", type=int, help="train both models of the pair this many steps (default: SPECS')")
    ap.add_argument("--headroom", action="store_true", help="the best t-only variance against beta_t, into --json")
    ap.add_argument("--picture", type=Path, help="write the pair of --size side by side (DDPM, 25 steps) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.report:
        text = markdown(args.report, args.commands or "see the module docstring")
        print(text)
        if args.markdown:
            replace_section(args.markdown, text + SECTION_END, SECTION, SECTION_END)
        return
    if args.picture:
        picture(args.size, args.picture)
        return
    if args.headroom:
        headroom(args.size, args.json, args.nll_images, train_steps=args.train_steps)
        return
    if args.paired:
        paired(args.size, args.json, args.nll_images, args.terms, train_steps=args.train_steps)
        return
    run(args.size, args.json, args.num, args.nll_images, args.terms, args.only, train_steps=args.train_steps)


if __name__ == "__main__":
    main()
