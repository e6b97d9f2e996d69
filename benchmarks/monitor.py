"""Issue 20: is the in-training evaluation (engine/monitor.py) worth its cost, and does it catch copying?

Three runs through ``engine.training.train`` (what ``diffuse train`` runs), each with the CPU
defaults (preset ``cpu``, batch 32, the default in-training evaluation: 256 EMA samples at 500,
1000, ... steps and at the end), one thread, a fixed step budget (so load does not change results),
and a resumable state every 250 steps:

1. ``digits16``: the 1,797 digits as a folder of 16x16 PNGs (benchmarks/defaults.py's folder);
2. ``builtin``: ``builtin:digits`` at its 8x8;
3. ``copy32``: the first 32 digits as a folder of 8x8 PNGs, flips off (the default), trained
   long enough to copy.

Measured: the in-training FD at each default evaluation (does it fall?); the evaluation's share
of the run's wall time (eval_s summed over elapsed); the near-copy share at the end. For the
first two, every saved state (each 250 steps) is then scored twice: by the monitor itself (the
same 256 seeds) and as ``diffuse eval`` scores it (500 samples with another seed against 500
real images: ``evaluate.sample_quality``); the Spearman correlation of the two rankings says
whether the cheap number picks the same checkpoints.

    python -m benchmarks.monitor --markdown benchmarks/RESULTS.md        # ~40 min on one busy core
    python -m benchmarks.monitor --only builtin --steps-scale 0.2         # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import evaluate, report
from diffuse_cli.engine.config import DiffusionConfig, TrainConfig, UNetConfig
from diffuse_cli.engine.data import from_model_range, load_builtin, load_dataset
from diffuse_cli.engine.generate import generate
from diffuse_cli.engine.models import load_for_sampling
from diffuse_cli.engine.monitor import Monitor, eval_due, stats_location
from diffuse_cli.engine.training import train

from ._common import cpu_name, replace_section
from ._trained import cache_dir
from .defaults import digit_folder

MARK_START, MARK_END = "<!-- monitor:start -->", "<!-- monitor:end -->"
STATE_EVERY = 250
FINAL_NUM = 500  # diffuse eval's default --num-images


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected in continuous distances)."""
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def copy_folder(n: int = 32, size: int = 8) -> Path:
    """The first ``n`` digits of the ``size`` px folder, as a folder of their own."""
    src = digit_folder(size)
    folder = cache_dir() / f"digits-{size}px-first{n}"
    if len(list(folder.glob("*.png"))) != n:
        folder.mkdir(parents=True, exist_ok=True)
        for p in sorted(src.glob("*.png"))[:n]:
            shutil.copy(p, folder / p.name)
    return folder


def run(name: str, data, out: Path, steps: int, log) -> dict:
    model = UNetConfig.preset("cpu", data.images.shape[-1], data.images.shape[1], "cpu", num_classes=0)
    cfg = TrainConfig(steps=steps, batch_size=32, save_every=STATE_EVERY, keep=10_000, threads=1, seed=0)
    evals: list[dict] = []

    def on(e: dict) -> None:
        if e["event"] == "eval":
            evals.append(e)
            log(f"  {name} step {e['step']}: FD {e['fd']:.3f} (floor {e['fd_floor']:.3f}), KID {e['kid']:.4f}, "
                f"near-copies {e['near_copy']:.0%} (real {e['near_copy_ref']:.0%}), {e['eval_s']:.1f} s")  # fmt: skip
        elif e["event"] == "warning":
            log(f"  {name} warning: {e['message']}")
        elif e["event"] == "log" and e["step"] % 500 == 0:
            log(f"  {name} step {e['step']} loss {e['loss']:.4f} ({e['elapsed']:.0f} s)")

    res = train(data, out, model, DiffusionConfig(), cfg, device="cpu", overwrite=True, callback=on)
    return {"name": name, "steps": steps, "elapsed": res["elapsed"], "evals": evals,
            "eval_s": sum(e["eval_s"] for e in evals), "best_step": res["best_step"],
            "warned": any(e["copying"] for e in evals)}  # fmt: skip


def from_folder(name: str, out: Path, steps: int) -> dict:
    """What :func:`run` returns, read back from a finished run's log.jsonl."""
    train_recs, evals = report.read_log(out)
    return {"name": name, "steps": steps, "elapsed": train_recs[-1]["elapsed"], "evals": evals,
            "eval_s": sum(e["eval_s"] for e in evals), "best_step": min(evals, key=lambda e: e["fd"])["step"],
            "warned": any(e["copying"] for e in evals)}  # fmt: skip


def rank_states(data, out: Path, log) -> dict:
    """Each saved state scored by the monitor (256 fixed seeds) and as diffuse eval does (500 vs 500)."""
    store, key = stats_location(data)
    mon = Monitor(data.images, store=store, key=key)
    gen = torch.Generator().manual_seed(1)
    real = data.images[torch.randperm(data.images.shape[0], generator=gen)[:FINAL_NUM].sort().values]
    rows = []
    for path in ckpt.list_states(out):
        model, diffusion, ck = load_for_sampling(path, "cpu")
        m = mon(model, diffusion, ck.step)["fd"]
        fake = from_model_range(generate(model, diffusion, FINAL_NUM, tuple(data.images.shape[1:]), seed=1,
                                         batch_size=256, clip_x0=True))  # fmt: skip
        final = evaluate.sample_quality(real, fake)["frechet_distance"]
        rows.append({"step": ck.step, "monitor_fd": m, "eval_fd": final})
        log(f"  state {ck.step}: monitor FD {m:.3f}, eval FD ({FINAL_NUM}) {final:.3f}")
    return {"states": rows, "spearman": spearman([r["monitor_fd"] for r in rows], [r["eval_fd"] for r in rows])}


def eval_in_steps(out: Path) -> list[float]:
    """Each evaluation's time in training steps: eval_s over the median step time logged within 100 steps of it
    (the two measured side by side in one process, so the ratio holds under any load)."""
    train, evals = report.read_log(out)
    ratios = []
    for e in evals:
        near = sorted(r["step_ms"] for r in train if abs(r["step"] - e["step"]) <= 100 and "step_ms" in r)
        if near:
            ratios.append(1e3 * e["eval_s"] / near[len(near) // 2])
    return ratios


def default_share(eval_steps: float, steps: int, every: int = TrainConfig().eval_every) -> float:
    """The evaluation's share of a run's time with the default schedule, one evaluation costing ``eval_steps``."""
    n = sum(eval_due(s, every, s == steps) for s in range(1, steps + 1))
    return n * eval_steps / (steps + n * eval_steps)


def markdown(results: list[dict], command: str, started: str) -> str:
    lines = [MARK_START, "## In-training evaluation and memorisation (`benchmarks/monitor.py`, issue 20)", "",
             f"- command: `{command}`",
             f"- date: {started} (UTC); CPU: {cpu_name()}, 2 cores SHARED with other engineers' jobs (quality numbers "
             "do not depend on load; the cost is a ratio of two times measured in the same process); torch "
             f"{torch.__version__}, one thread",
             "- every run: `engine.training.train` with the CPU defaults (preset cpu, 1.6M parameters at 16x16, batch "
             "32, linear schedule, T = 1000) and the default in-training evaluation (256 EMA samples, DPM-Solver++ "
             "20 steps, randconv features; at 500, 1000, ... steps and at the end); states every 250 steps",
             "", "| run | steps | in-training FD at each evaluation (floor) | eval share of wall time | near-copies "
             "at the end (real images) | best step | copying warning |", "|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        fds = ", ".join(f"{e['step']}: {e['fd']:.3g}" for e in r["evals"])
        floor = r["evals"][-1]["fd_floor"] if r["evals"] else float("nan")
        last = r["evals"][-1] if r["evals"] else {}
        lines.append(f"| {r['name']} | {r['steps']} | {fds} ({floor:.3g}) | {r['eval_s'] / r['elapsed']:.1%} "
                     f"({r['eval_s']:.0f} of {r['elapsed']:.0f} s) | {last.get('near_copy', 0):.1%} "
                     f"({last.get('near_copy_ref', 0):.1%}) | {r['best_step']} | {'yes' if r['warned'] else 'no'} |")  # fmt: skip
    lines.append("")
    for r in results:
        ratios = r.get("eval_in_steps") or []
        if ratios:
            med = sorted(ratios)[len(ratios) // 2]
            shares = ", ".join(f"{n} steps {default_share(med, n):.1%}" for n in (600, 1000, 1500, 2500, 5000))
            lines.append(f"- {r['name']}: one evaluation costs {', '.join(f'{x:.0f}' for x in ratios)} training steps "
                         f"(eval_s over the median step time logged within 100 steps of it); with the median, the "
                         f"default schedule's share of a run of {shares}")  # fmt: skip
    for r in results:
        if "ranking" in r:
            rk = r["ranking"]
            pairs = ", ".join(f"{s['step']}: {s['monitor_fd']:.3g} / {s['eval_fd']:.3g}" for s in rk["states"])
            lines.append(f"- {r['name']}, every state (step: monitor FD / diffuse-eval FD with {FINAL_NUM} samples): "
                         f"{pairs}; Spearman {rk['spearman']:.3f}")  # fmt: skip
    lines += ["", "Report picture of the digits16 run: `docs/report.png`.", MARK_END]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=["digits16", "copy32", "builtin"])
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--work", type=Path, default=cache_dir() / "monitor-runs")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    p.add_argument("--collect", action="store_true", help="only write the section from the runs' saved JSON")
    p.add_argument("--reuse", action="store_true", help="take a finished run from its folder; only rank its states")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    cache = cache_dir() / "monitor-datacache"
    plan = {
        "digits16": (lambda: load_dataset(digit_folder(16), cache_dir=cache), 1500, True),
        "copy32": (lambda: load_dataset(copy_folder(32), cache_dir=cache), 1500, False),
        "builtin": (lambda: load_builtin("digits"), 2000, True),
    }
    results = []
    for name in args.only:
        if args.collect:
            results.append(json.loads((args.work / f"{name}.json").read_text()))
            results[-1]["eval_in_steps"] = eval_in_steps(args.work / name)
            continue
        load, steps, ranked = plan[name]
        data = load()
        out = args.work / name
        log(
            f"{name}: {data.images.shape[0]} images {tuple(data.images.shape[1:])}, {int(steps * args.steps_scale)} steps"
        )
        steps = max(STATE_EVERY, int(steps * args.steps_scale))
        r = from_folder(name, out, steps) if args.reuse else run(name, data, out, steps, log)
        r["eval_in_steps"] = eval_in_steps(out)
        if ranked:
            r["ranking"] = rank_states(data, out, log)
        results.append(r)
        (args.work / f"{name}.json").write_text(json.dumps(r, indent=1, default=str))
        if name == "digits16":
            args.docs.mkdir(exist_ok=True)
            shutil.copy(out / "report.png", args.docs / "report.png")
    command = "python -m benchmarks.monitor " + " ".join(a for a in sys.argv[1:] if a != "--collect")
    text = markdown(results, command, started)
    print(text)
    if args.markdown:
        replace_section(args.markdown, text, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
