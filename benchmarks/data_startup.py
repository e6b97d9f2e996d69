"""Data start-up: decoding a PNG folder in every process vs the decoded-dataset cache, 1 and 2 torchrun processes.

A synthetic folder of ``--images`` 32x32 RGB PNGs (default 50,000: smooth colour
gradients plus noise, so they compress like small photos, not like pure noise) is made
once, in parallel, and kept under ``--folder`` (default: the temp dir) between runs.
Each configuration then starts fresh Python processes that do what ``diffuse train``
does before its first step, and one epoch of what it does after:

* ``decode``: every process decodes the folder into its own memory (``--no-cache``, the old way);
* ``first run``: an empty cache directory: the local leader decodes into the cache file,
  the other rank waits, then both map it;
* ``cached``: the cache file exists: every process maps it (the leader checks its CRC first).

After loading, each process reads one epoch of batches the way training does (a random
permutation shared by the ranks; each rank gathers its half of each global batch of 256)
and reports from /proc: start-up (process start to dataset ready, including
``import torch``), the data call alone, peak resident memory (VmHWM), and at the end the
resident memory split into anonymous (private) and file-backed (page cache, shared) parts
and the proportional set size (PSS: each shared page divided among the processes
mapping it). Summed over the ranks, PSS says how many copies of the data the job holds.

    python -m benchmarks.data_startup                                  # 50,000 images, prints the table
    python -m benchmarks.data_startup --images 300 --nproc 1           # seconds: smoke test
    python -m benchmarks.data_startup --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: start-up includes `import torch`

import argparse  # noqa: E402 - after T_START
import json  # noqa: E402 - after T_START
import os  # noqa: E402 - after T_START
import platform  # noqa: E402 - after T_START
import shutil  # noqa: E402 - after T_START
import subprocess  # noqa: E402 - after T_START
import sys  # noqa: E402 - after T_START
import tempfile  # noqa: E402 - after T_START
from concurrent.futures import ProcessPoolExecutor  # noqa: E402 - after T_START
from pathlib import Path  # noqa: E402 - after T_START

from ._common import replace_section, write_synthetic_pngs  # noqa: E402 - after T_START

MARK_START, MARK_END = "<!-- data:start -->", "<!-- data:end -->"
SIZE = 32
BATCH = 256


# --------------------------------------------------------------------------- the folder


def make_folder(folder: Path, n: int, workers: int) -> float:
    """Generate the folder unless a complete one is there; returns seconds spent."""
    done = folder / f".complete-{n}"
    if done.exists():
        return 0.0
    t0 = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    for k in range((n + 999) // 1000):
        (folder / f"{k:03d}").mkdir(parents=True, exist_ok=True)
    chunks = [(str(folder), s, min(n, s + 500), SIZE, True) for s in range(0, n, 500)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_synthetic_pngs, chunks))
    done.write_text("ok\n")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- one process (child)


def _proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _mapping_pss(suffix: str) -> int:
    """PSS of this process's mappings of files whose path ends with ``suffix`` (the cache file)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode path"
            inside = line.rstrip().endswith(suffix)
        elif inside and first == "Pss:":
            total += int(line.split()[1]) * 1024
    return total


def child(args: argparse.Namespace) -> None:
    import torch

    from diffuse_cli.engine import data
    from diffuse_cli.engine.data.placement import place_images

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    t0 = time.time()
    ds = data.load_dataset(str(args.folder), SIZE, None, cache=args.mode != "decode", cache_dir=args.cache_dir)
    t_ready = time.time()
    at_ready = _proc_status()
    images = place_images(ds, torch.device("cpu"))
    n = len(images)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    checksum = 0
    local = BATCH // world
    for start in range(0, n, BATCH):  # one epoch, each rank gathering its slice of each global batch
        idx = perm[start : start + BATCH][rank * local : (rank + 1) * local]
        checksum += int(images[idx].sum(dtype=torch.int64))
    t_epoch = time.time()
    res = {
        "rank": rank,
        "world": world,
        "mode": args.mode,
        "status": ds.cache.status if ds.cache else "in memory",
        "images": n,
        "bytes": ds.images.numel(),
        "startup_s": t_ready - T_START,
        "load_s": t_ready - t0,
        "epoch_s": t_epoch - t_ready,
        "at_ready": at_ready,
        "end": {**_proc_status(), "cache_pss": _mapping_pss(".u8")},
        "checksum": checksum,
    }
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------- the driver


def run_config(args, mode: str, nproc: int, cache_dir: Path, work: Path) -> dict:
    result_dir = work / f"{mode}-{nproc}"
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.mkdir(parents=True)
    if mode == "first":
        shutil.rmtree(cache_dir, ignore_errors=True)
    # As a module: the script imports ._common.
    script = ["-m", "benchmarks.data_startup", "--child", "--mode", mode, "--folder", str(args.folder),
              "--cache-dir", str(cache_dir), "--result-dir", str(result_dir)]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*launch, *script] if nproc > 1 else [sys.executable, *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "src"), str(root), env.get("PYTHONPATH", "")) if p)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} x{nproc} failed:\n{proc.stdout}\n{proc.stderr}")
    ranks = [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert len({r["checksum"] for r in ranks}) == 1 or nproc > 1
    return {"mode": mode, "nproc": nproc, "wall_s": wall, "ranks": ranks}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


LABELS = {"decode": "decode in every process (`--no-cache`)", "first": "first run (decode into the cache)",
          "cached": "cached run (map the cache)"}  # fmt: skip


def _copies(r: dict) -> float:
    """(private memory above a data-less process + the cache file's PSS), summed over ranks, / data size."""
    size = r["ranks"][0]["bytes"]
    held = sum(max(0, x["end"].get("Pss_Anon", 0) - r["baseline"]) + x["end"]["cache_pss"] for x in r["ranks"])
    return held / size


def table(results: list[dict]) -> tuple[str, list[str]]:
    head = ("| configuration | processes | start-up s (max over ranks) | data call s | epoch s | peak RSS MiB "
            "(sum) | RSS anon MiB (sum) | RSS file MiB (sum) | PSS MiB (sum) | copies of the data held |")  # fmt: skip
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["mode"], r["nproc"]): r for r in results}
    for r in results:
        ranks = r["ranks"]
        size = ranks[0]["bytes"]

        def total(key, ranks=ranks):
            return sum(x["end"].get(key, 0) for x in ranks)

        pss = total("Pss")
        rows.append(
            f"| {LABELS[r['mode']]} | {r['nproc']} | {max(x['startup_s'] for x in ranks):.2f} | "
            f"{max(x['load_s'] for x in ranks):.2f} | {max(x['epoch_s'] for x in ranks):.2f} | "
            f"{_mb(sum(x['end']['VmHWM'] for x in ranks))} | {_mb(total('RssAnon'))} | {_mb(total('RssFile'))} | "
            f"{_mb(pss)} | {_copies(r):.2f} |"
        )
    lines = []
    size = results[0]["ranks"][0]["bytes"]
    lines.append(f"data: {results[0]['ranks'][0]['images']:,} images of 3x{SIZE}x{SIZE} = {_mb(size)} MiB of uint8")
    for n in sorted({r["nproc"] for r in results}):
        if ("decode", n) in by and ("cached", n) in by:
            d, c = by[("decode", n)], by[("cached", n)]
            dl, cl = max(x["load_s"] for x in d["ranks"]), max(x["load_s"] for x in c["ranks"])
            ds_, cs = max(x["startup_s"] for x in d["ranks"]), max(x["startup_s"] for x in c["ranks"])
            lines.append(f"{n} process{'es' if n > 1 else ''}: data call {dl:.2f} s decoding vs {cl:.2f} s cached = {dl / cl:.0f}x faster "
                         f"(target >= 10x: {'met' if dl / cl >= 10 else 'missed'}); start-up including `import torch` "
                         f"{ds_:.2f} s vs {cs:.2f} s = {ds_ / cs:.1f}x")  # fmt: skip
    if ("decode", 2) in by and ("cached", 2) in by:
        for mode in ("decode", "cached"):
            r = by[(mode, 2)]
            lines.append(f"2 processes, {LABELS[mode]}: {_copies(r):.2f} copies of the data in memory, "
                         f"1 process: {_copies(by[(mode, 1)]):.2f}" if (mode, 1) in by else "")  # fmt: skip
    return "\n".join(rows), lines


def baseline_pss(args, work: Path) -> int:
    """Pss_Anon of one process that imports torch and the engine but loads no data (subtracted per rank)."""
    code = (
        "import json, torch; from diffuse_cli.engine import data; torch.set_num_threads(1); "
        "print(json.dumps({'Pss_Anon': [int(l.split()[1]) * 1024 for l in open('/proc/self/smaps_rollup') "
        "if l.startswith('Pss_Anon:')][0]}))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["Pss_Anon"]


def write_markdown(path: Path, table_md: str, lines: list[str], command: str, meta: dict) -> None:
    section = "\n".join([
        MARK_START,
        "## Data start-up and memory (`benchmarks/data_startup.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}; machine: {meta['cpu']}, {meta['cores']} cores, {meta['mem']} RAM, Linux; "
        f"Python {platform.python_version()}, torch {meta['torch']}; load average before/after: "
        f"{meta['load_before']} / {meta['load_after']} (the machine is shared with other jobs)",
        f"- folder: {meta['images']:,} synthetic {SIZE}x{SIZE} RGB PNGs in 1,000-file sub-folders; decoded at "
        f"{SIZE}x{SIZE} with the default thread pool; page cache warm (the PNGs and the cache file were read "
        "before), so both sides are measured without disk latency",
        "- start-up: process start to dataset ready, including `import torch`; data call: the load call alone; "
        "epoch: every rank gathers its half of each global batch of 256 over one random permutation; memory at "
        "the end of the epoch, from /proc (VmHWM, RssAnon, RssFile, smaps_rollup Pss), summed over the ranks; "
        "copies of the data = what the ranks hold of it, summed, over its size: each rank's private (anonymous) PSS "
        "above that of a process that imports the same modules and loads no data, plus its PSS of the cache "
        "file's mapping (a page shared by two processes counts half in each)",
        "",
        table_md,
        "",
        *[f"- {line}" for line in lines],
        "- the first run's extra memory is the decoder's: heap that the decoding threads freed but the C "
        "allocator keeps, in the process that decoded; every later run maps the file and holds none of it",
        MARK_END,
    ])  # fmt: skip
    replace_section(path, section, MARK_START, MARK_END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50_000, help="PNGs in the synthetic folder (default 50,000)")
    p.add_argument("--folder", type=Path, help="where the folder is made and kept [default: TMP/diffuse-bench-pngs-N]")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to run (default 1 2)")
    p.add_argument("--markdown", type=Path, help="write/replace the data section of this markdown file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["decode", "first", "cached"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    args.folder = args.folder or Path(tempfile.gettempdir()) / f"diffuse-bench-pngs-{args.images}"
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    made = make_folder(args.folder, args.images, os.cpu_count() or 1)
    if made:
        print(f"made {args.images} PNGs in {args.folder} in {made:.0f} s")
    work = Path(tempfile.mkdtemp(prefix="diffuse-bench-data-"))
    try:
        base = baseline_pss(args, work)
        results = []
        for nproc in args.nproc:
            for mode in ("decode", "first", "cached"):
                r = run_config(args, mode, nproc, work / "cache", work)
                r["baseline"] = base
                results.append(r)
                ranks = r["ranks"]
                print(f"{mode:>7} x{nproc}: start-up {max(x['startup_s'] for x in ranks):.2f} s, data call "
                      f"{max(x['load_s'] for x in ranks):.2f} s ({', '.join(x['status'] for x in ranks)}), "
                      f"PSS {_mb(sum(x['end'].get('Pss', 0) for x in ranks))} MiB", flush=True)  # fmt: skip
        sums = {r["ranks"][0]["checksum"] for r in results if r["nproc"] == 1}
        assert len(sums) <= 1, "the cached data differ from the decoded data"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table_md, lines = table(results)
    print(table_md)
    for line in lines:
        print("- " + line)
    if args.markdown:
        import torch

        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cpu = "unknown CPU"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
                "mem": f"{mem / 2**30:.0f} GiB", "torch": torch.__version__, "images": args.images,
                "load_before": load_before,
                "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3])}  # fmt: skip
        command = "python -m benchmarks.data_startup " + " ".join(argv if argv is not None else sys.argv[1:])
        write_markdown(args.markdown, table_md, lines, command.strip(), meta)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
