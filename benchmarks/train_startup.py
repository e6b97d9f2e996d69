"""Start-up of `diffuse train FOLDER --steps 1`: the first run (decoding into the cache) vs later runs (cache warm).

A flat folder of ``--images`` 32x32 RGB PNGs (default 20,000; the pictures of ``data_startup.py``) is made once
under ``--folder``. Each round runs, as fresh processes, the first run (an empty cache directory: the folder is
decoded into the cache; the PNGs are first dropped from the page cache, as on a user's first run, unless
``--page-cache``) and then a warm run (the cache file exists), and measures each from the command to its
exit (wall clock) and the CPU time it used. ``--before SRC`` runs the same rounds with another checkout's
``src/`` (e.g. ``git archive main src | tar -x -C /tmp/before``), interleaved, so both see the same load.

The breakdown is one warm run in this process under cProfile with a CPU-time clock (so other processes'
load does not change it): python and the CLI, ``import torch``, the data (walk, fingerprint, mapping the
cache), the optimizer (whose first step imports ``torch._dynamo``), the model and EMA, the first step,
the checkpoint writes and the final preview.

    python -m benchmarks.train_startup --rounds 3                                   # prints the table
    flock /tmp/diffuse-timing.lock python -m benchmarks.train_startup --before /tmp/before/src --markdown x.md
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ._common import replace_section, write_synthetic_pngs

ROOT = Path(__file__).resolve().parent.parent

MARK_START, MARK_END = "<!-- startup:start -->", "<!-- startup:end -->"
SIZE = 32


def make_folder(folder: Path, n: int) -> None:
    done = folder / f".complete-{n}"
    if done.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(write_synthetic_pngs, [(str(folder), s, min(n, s + 500), SIZE, False) for s in range(0, n, 500)]))
    done.write_text("ok\n")


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (posix_fadvise DONTNEED, no root needed): a first run reads
    them from the disk, as a user's first run on a folder does (here 20,000 files: about 3 s more)."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(src: Path, folder: Path, cache: Path, out: Path, threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `diffuse train FOLDER --steps 1` as a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "diffuse_cli", "train", str(folder), "--steps", "1", "--out", str(out),
           "--cache-dir", str(cache), "--overwrite", "--threads", str(threads), "--device", "cpu"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder.parent)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stdout}\n{r.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def rounds(versions: dict[str, Path], folder: Path, work: Path, n: int, threads: int, cold_disk: bool) -> dict:
    res = {name: {"cold": [], "warm": []} for name in versions}
    for k in range(n):
        for name, src in versions.items():  # interleaved: both versions see the same load
            cache = work / f"cache-{name}-{k}"
            for kind in ("cold", "warm"):
                if kind == "cold" and cold_disk:
                    evict(folder)
                res[name][kind].append(timed(src, folder, cache, work / f"run-{name}", threads))
            shutil.rmtree(cache, ignore_errors=True)
    return res


# Phases of the breakdown: (label, file, function); a phase's time is that function's cumulative CPU time.
PHASES = [
    ("import torch (with numpy, safetensors)", "diffuse_cli/engine/training.py", "<module>"),
    ("data: walk, fingerprint, cache check and mapping", "diffuse_cli/engine/plan.py", "plan_training"),
    ("set-up: run folder, model, EMA, optimizer", "diffuse_cli/engine/training.py", "_set_up"),
    (
        "  of which the optimizer (torch.optim's imported torch._dynamo)",
        "diffuse_cli/engine/device.py",
        "make_optimizer",
    ),
    ("first training step (forward, backward, AdamW, EMA)", "diffuse_cli/engine/step.py", "__call__"),
    ("checkpoint writes (state, model)", "diffuse_cli/engine/training.py", "_save"),
    ("final preview (16 images, 50 DPM++ steps)", "diffuse_cli/engine/training.py", "_preview"),
]


def breakdown(src: Path, folder: Path, work: Path, threads: int) -> list[tuple[str, float]]:
    """CPU seconds per phase of one warm run of ``src``'s code, profiled in a child process."""
    cache = work / f"cache-profile-{abs(hash(str(src)))}"
    timed(src, folder, cache, work / "run-profile", threads)  # make the cache warm
    out = work / "breakdown.json"
    cmd = [sys.executable, "-m", "benchmarks.train_startup", "--profile-child", str(out), "--folder", str(folder),
           "--cache-dir", str(cache), "--out", str(work / "run-profile"), "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
    env.pop("OMP_NUM_THREADS", None)
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    return [tuple(x) for x in json.loads(out.read_text())]


def profile_child(result: Path, folder: Path, cache: Path, run_dir: Path, threads: int) -> None:
    """In this process: one warm run under cProfile with a CPU clock; the phases go to ``result`` as JSON."""
    argv = ["diffuse", "train", str(folder), "--steps", "1", "--out", str(run_dir),
            "--cache-dir", str(cache), "--overwrite", "--threads", str(threads), "--device", "cpu"]  # fmt: skip
    old, sys.argv = sys.argv, argv
    prof = cProfile.Profile(time.process_time)
    t0 = time.process_time()
    prof.enable()
    try:
        from diffuse_cli.cli import main

        main()
    except SystemExit as e:
        assert not e.code, e.code
    finally:
        prof.disable()
        sys.argv = old
    total = time.process_time() - t0
    stats = pstats.Stats(prof).stats
    out = []
    for label, file, fn in PHASES:
        cum = [ct for (f, _, name), (_, _, _, ct, _) in stats.items() if f.endswith(file) and name == fn]
        out.append((label, max(cum, default=0.0)))
    top = sum(c for label, c in out if not label.startswith("  "))
    out.append(("the rest: python, the CLI, typer and rich, logging", total - top))
    out.append(("total", total))
    result.write_text(json.dumps(out))


def markdown(res: dict, parts: dict[str, list], meta: dict) -> str:
    lines = ["| code | first run (cold cache): wall / CPU | cache warm: wall / CPU | cold / warm (wall) |",
             "|---|---|---|---|"]  # fmt: skip
    for name, r in res.items():
        cw, cc = statistics.median(w for w, _ in r["cold"]), statistics.median(c for _, c in r["cold"])
        ww, wc = statistics.median(w for w, _ in r["warm"]), statistics.median(c for _, c in r["warm"])
        lines.append(f"| {name} | {cw:.1f} s / {cc:.1f} s | {ww:.1f} s / {wc:.1f} s | {cw / ww:.1f}x |")
    names = list(parts)
    lines += ["", "Breakdown of one warm run (CPU seconds, cProfile with a CPU clock, so other work does not count):",
              "", "| phase | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]  # fmt: skip
    for i, (label, _) in enumerate(parts[names[-1]]):
        lines.append(f"| {label} | " + " | ".join(f"{parts[n][i][1]:.2f}" for n in names) + " |")
    return (
        "\n".join(lines) + "\n\n" + f"Machine: {meta['machine']}. Date: {meta['date']}. Command: `{meta['command']}`.\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "diffuse-startup-pngs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="--threads for every run (the same for both versions)")
    p.add_argument("--before", type=Path, help="another checkout's src/ to compare with")
    p.add_argument("--page-cache", action="store_true", help="first runs find the PNGs in the page cache (no evict)")
    p.add_argument("--markdown", type=Path, help="append or replace this benchmark's section in this file")
    p.add_argument("--json", type=Path)
    p.add_argument("--profile-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.profile_child:
        profile_child(args.profile_child, args.folder, args.cache_dir, args.out, args.threads)
        return 0
    make_folder(args.folder, args.images)
    work = Path(tempfile.mkdtemp(prefix="diffuse-startup-"))
    load_start = os.getloadavg()[0]
    try:
        versions = {"this branch": ROOT / "src"}
        if args.before:
            versions = {"before (main)": args.before, **versions}
        res = rounds(versions, args.folder, work, args.rounds, args.threads, not args.page_cache)
        parts = {name: breakdown(src, args.folder, work, args.threads) for name, src in versions.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
                       f"work: load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m benchmarks.train_startup " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    text = markdown(res, parts, meta)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rounds": res, "breakdown": parts, **meta}, indent=1))
    if args.markdown:
        title = "## Start-up of `diffuse train FOLDER --steps 1` (`benchmarks/train_startup.py`)"
        replace_section(args.markdown, f"{MARK_START}\n{title}\n\n{text}{MARK_END}", MARK_START, MARK_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
