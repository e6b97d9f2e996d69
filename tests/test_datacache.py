"""Tests for diffuse_cli.engine.data (cache, sharing, placement): the decoded-dataset cache, its checks, concurrent openers, placement."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffuse_cli.engine import data as D
from diffuse_cli.engine.config import TrainConfig
from diffuse_cli.engine.data import cache as C
from diffuse_cli.engine.data import placement
from diffuse_cli.engine.errors import DataError, OutputError

SIZE = 8


def _make_folder(root: Path, n: int = 12, seed: int = 0, gray: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (10 + i % 5, 9 + i % 3) if gray else (10 + i % 5, 9 + i % 3, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    d = _make_folder(tmp_path / "imgs")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (d / "notes.txt").write_text("not an image")
    return d


def _load(folder, cache_dir, **kw) -> D.ImageDataset:
    return D.load_dataset(str(folder), SIZE, cache_dir=cache_dir, **kw)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- hit, miss, rebuild


def test_first_run_builds_then_every_run_maps_the_same_data(folder, tmp_path):
    ref = D.load_folder(folder, SIZE)
    first = _load(folder, tmp_path / "cache")
    again = _load(folder, tmp_path / "cache")
    assert (first.cache.status, again.cache.status) == ("built", "hit")
    assert first.cache.path == again.cache.path and first.cache.path.parent == tmp_path / "cache"
    for ds in (first, again):
        assert torch.equal(ds.images, ref.images)
        assert ds.summary == ref.summary  # skip counts and examples survive the cache
    assert ref.summary.skipped == {"corrupt or truncated": 1} and ref.summary.ignored == 1
    assert isinstance(again.images.untyped_storage(), torch.UntypedStorage)
    assert again.images.data_ptr() != ref.images.data_ptr()


def _add(d: Path) -> None:
    Image.new("RGB", (12, 12), (1, 2, 3)).save(d / "zzz-new.png")


def _remove(d: Path) -> None:
    (d / "img003.png").unlink()


def _touch(d: Path) -> None:
    p = d / "img005.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _rewrite_same_size(d: Path) -> None:
    """New pixels, same byte count, an mtime a second later: the content changed, the size did not."""
    p = d / "img005.png"
    st = p.stat()
    img = np.asarray(Image.open(p)).copy()
    img[0, 0] ^= 0xFF
    Image.fromarray(img).save(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


@pytest.mark.parametrize("change", [_add, _remove, _touch, _rewrite_same_size])
def test_a_changed_folder_misses_and_is_decoded_again(folder, tmp_path, change):
    before = _load(folder, tmp_path / "cache")
    change(folder)
    after = _load(folder, tmp_path / "cache")
    assert after.cache.status == "rebuilt" and "folder changed" in after.cache.reason
    assert after.cache.path == before.cache.path  # one file per (folder, size, channels), replaced
    ref = D.load_folder(folder, SIZE)
    assert torch.equal(after.images, ref.images) and after.summary == ref.summary
    assert _load(folder, tmp_path / "cache").cache.status == "hit"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [
        before.cache.path.name
    ]  # no temporaries or old versions left behind


def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 7)


def _flip_data_byte(p: Path) -> None:
    with open(p, "r+b") as f:
        f.seek(C.DATA_OFFSET + 100)
        b = f.read(1)
        f.seek(C.DATA_OFFSET + 100)
        f.write(bytes([b[0] ^ 0x01]))


def _flip_header_byte(p: Path) -> None:
    """A byte of the JSON header, which ends the file."""
    with open(p, "r+b") as f:
        f.seek(-10, os.SEEK_END)
        b = f.read(1)
        f.seek(-10, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x20]))


def _wrong_magic(p: Path) -> None:
    with open(p, "r+b") as f:
        f.write(b"NOTACACHE")


def _append(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"\0" * 64)


def _empty(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize(
    "damage, why",
    [(_truncate, "truncated"), (_flip_data_byte, "checksum"), (_flip_header_byte, "header is damaged"),
     (_wrong_magic, "not a diffuse cache"), (_append, "bytes"), (_empty, "truncated")],
)  # fmt: skip
def test_a_damaged_cache_is_detected_and_rebuilt(folder, tmp_path, damage, why):
    ds = _load(folder, tmp_path / "cache")
    path = ds.cache.path
    del ds
    damage(path)
    with pytest.raises(C.CacheInvalid, match=why):
        C.open_cache(path, verify_data=True)
    again = _load(folder, tmp_path / "cache")
    assert again.cache.status == "rebuilt" and why in again.cache.reason
    assert torch.equal(again.images, D.load_folder(folder, SIZE).images)


def test_quick_open_checks_size_and_header_but_not_every_byte(folder, tmp_path):
    """Other ranks open with the quick checks only: a truncated file fails them, a flipped data byte needs the CRC."""
    path = _load(folder, tmp_path / "cache").cache.path
    _flip_data_byte(path)
    C.open_cache(path)  # the quick checks pass...
    with pytest.raises(C.CacheInvalid, match="checksum"):  # ...the full one does not
        C.open_cache(path, verify_data=True)
    _truncate(path)
    with pytest.raises(C.CacheInvalid, match="truncated"):
        C.open_cache(path)


def test_a_header_larger_than_64_kib_round_trips_and_leaves_the_data_intact(tmp_path):
    """Version 2 kept the header in a fixed 64 KiB slot: 20,000 labelled images overflowed it into the data."""
    n, row = 40_000, 3 * 2 * 2
    data = np.random.default_rng(0).integers(0, 256, n * row, dtype=np.uint8)
    labels = [i % 7 for i in range(n)]
    head = {"shape": [n, 3, 2, 2], "dtype": "uint8", "fingerprint": "f", "data_crc32": zlib.crc32(data),
            "summary": D.DataSummary("src", n, n, 3, 2).to_dict(), "classes": [f"c{i}" for i in range(7)],
            "notes": [], "labels": labels}  # fmt: skip
    assert len(json.dumps(head)) > 65536
    path = tmp_path / "big-header.u8"
    with open(path, "w+b") as f:
        f.seek(C.DATA_OFFSET)
        f.write(data.tobytes())
        C.write_header(f, head)
    ds = C.open_cache(path, "f", verify_data=True)
    assert ds.images.flatten().numpy().tobytes() == data.tobytes()
    assert ds.labels.tolist() == labels and ds.classes == tuple(head["classes"])


def test_a_class_folder_whose_header_exceeds_64_kib_is_built_once_then_hit(tmp_path):
    """Many long class names (the header holds them all): built, then a hit, equal to the in-memory decode."""
    root = tmp_path / "classes"
    for i in range(300):  # 300 names of 240 characters: about 72 KiB of names alone
        _make_folder(root / (f"{i:03d}-" + "x" * 236), n=1, seed=i)
    first = _load(root, tmp_path / "cache")
    header_bytes = os.path.getsize(first.cache.path) - C.DATA_OFFSET - first.images.numel()
    assert header_bytes > 65536
    again = _load(root, tmp_path / "cache")
    ref = D.load_folder(root, SIZE)
    assert (first.cache.status, again.cache.status) == ("built", "hit")
    assert torch.equal(again.images, ref.images) and torch.equal(again.labels, ref.labels)
    assert again.classes == ref.classes and len(again.classes) == 300


def test_a_cache_of_an_older_format_is_decoded_again(folder, tmp_path):
    """A cache is disposable: a file of format version 2 (header before the data) is rebuilt, not an error."""
    path = _load(folder, tmp_path / "cache").cache.path
    with open(path, "r+b") as f:
        f.seek(len(C.MAGIC))
        f.write((2).to_bytes(4, "little"))
    again = _load(folder, tmp_path / "cache")
    assert again.cache.status == "rebuilt" and "format version 2" in again.cache.reason
    assert torch.equal(again.images, D.load_folder(folder, SIZE).images)


def test_a_temporary_left_by_a_killed_build_is_removed(folder, tmp_path):
    cache = tmp_path / "cache"
    path = C.cache_path(cache, folder, SIZE, None)
    cache.mkdir()
    left = cache / f".diffuse-tmp-999999-{path.name}"  # what atomic_path names a build's temporary
    left.write_bytes(b"\0" * 4096)
    other = cache / ".diffuse-tmp-999999-another-folder.u8"  # another cache file's build: not ours to touch
    other.write_bytes(b"x")
    assert _load(folder, cache).cache.status == "built"
    assert not left.exists() and other.exists()


def _memory_limit() -> int:
    """RAM + swap in bytes: a private mapping larger than this is refused under Linux's default overcommit."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) + int(info["SwapTotal"].split()[0])) * 1024


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux only")
def test_a_cache_larger_than_memory_maps_and_reads(folder, tmp_path):
    """A sparse cache file of twice RAM + swap: mapping it works, and a batch reads only its rows."""
    built = _load(folder, tmp_path / "cache")
    head = C.read_header(open(built.cache.path, "rb"))
    row = 3 * 64 * 64
    n = 2 * _memory_limit() // row + 1
    big = tmp_path / "big.u8"
    with open(big, "wb") as f:
        f.truncate(C.DATA_OFFSET + n * row)
        if os.fstat(f.fileno()).st_blocks * 512 > 1 << 30:
            pytest.skip("this file system has no sparse files")
        head = {**head, "shape": [n, 3, 64, 64], "summary": {**head["summary"], "used": n, "image_size": 64}}
        C.write_header(f, head)
        f.seek(C.DATA_OFFSET + (n - 1) * row)
        f.write(bytes(range(256)) * (row // 256))  # the last row
    ds = C.open_cache(big, head["fingerprint"])  # the quick checks only: the CRC would read it all
    assert ds.images.shape == (n, 3, 64, 64) and ds.images.numel() > _memory_limit()
    placed = placement.place_images(ds, torch.device("cpu"))
    batch = placed[torch.tensor([n - 1, 0, n // 2])]
    assert batch[0].flatten()[:256].tolist() == list(range(256)) and int(batch[1:].sum()) == 0


def test_size_channels_and_folder_each_get_their_own_file(folder, tmp_path):
    cache = tmp_path / "cache"
    a = _load(folder, cache)
    b = D.load_dataset(str(folder), SIZE * 2, cache_dir=cache)
    c = D.load_dataset(str(folder), SIZE, 1, cache_dir=cache)
    other = _make_folder(tmp_path / "other" / "imgs", n=3, seed=1)  # same base name, other folder
    d = D.load_dataset(str(other), SIZE, cache_dir=cache)
    assert len({a.cache.path, b.cache.path, c.cache.path, d.cache.path}) == 4
    assert b.images.shape[-1] == 2 * SIZE and c.images.shape[1] == 1 and len(d) == 3
    # The same folder spelled differently (relative, trailing slash) is the same cache.
    rel = os.path.relpath(folder) + os.sep
    e = D.load_dataset(rel, SIZE, cache_dir=cache)
    assert e.cache.path == a.cache.path and e.cache.status == "hit"
    assert e.summary.source == D.display_path(Path(rel))  # the data line shows the folder as given


def test_grayscale_folder_with_skips_is_compacted_like_the_in_memory_decode(tmp_path):
    """channels=None decodes three planes; an all-gray folder keeps one, and skipped rows are squeezed out."""
    d = _make_folder(tmp_path / "gray", n=40, gray=True)
    for i in (0, 17, 39):
        (d / f"img{i:03d}.png").write_bytes(b"garbage")
    ref = D.load_folder(d, 16)
    ds = D.load_dataset(str(d), 16, cache_dir=tmp_path / "cache")
    assert ds.images.shape == ref.images.shape == (37, 1, 16, 16)
    assert torch.equal(ds.images, ref.images) and ds.summary == ref.summary
    assert torch.equal(C.open_cache(ds.cache.path, verify_data=True).images, ref.images)


def test_builtin_and_no_cache_write_nothing(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSE_CACHE_DIR", str(tmp_path / "cache"))
    assert D.load_dataset("builtin:digits").cache is None
    ds = D.load_dataset(str(folder), SIZE, cache=False)
    assert ds.cache is None and torch.equal(ds.images, D.load_folder(folder, SIZE).images)
    assert not (tmp_path / "cache").exists()


def test_bad_input_is_a_one_line_error_and_leaves_no_file(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        D.load_dataset(str(tmp_path / "nowhere"), SIZE, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"junk")
    (bad / "b.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 2 images"):
        D.load_dataset(str(bad), SIZE, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_cache_dir_is_a_one_line_error(folder, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="permission denied"):
            _load(folder, ro)
    finally:
        ro.chmod(0o700)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFUSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.default_cache_dir() == tmp_path / "xdg" / "diffuse"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
    assert C.default_cache_dir() == Path.home() / ".cache" / "diffuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert C.default_cache_dir() == Path.home() / ".cache" / "diffuse"
    monkeypatch.setenv("DIFFUSE_CACHE_DIR", str(tmp_path / "mine"))
    assert C.default_cache_dir() == tmp_path / "mine"


# --------------------------------------------------------------------------- same batches


def test_memory_mapped_dataset_yields_the_same_batches_as_in_memory(folder, tmp_path):
    ram = D.load_folder(folder, SIZE)
    mapped = _load(folder, tmp_path / "cache")
    mapped = _load(folder, tmp_path / "cache")  # a hit: straight from the file
    assert mapped.cache.status == "hit"
    a, b = placement.place_images(ram, torch.device("cpu")), placement.place_images(mapped, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(0, len(ram), (7,), generator=gen)
        xa, xb = a[idx], b[idx]
        assert xa.dtype == xb.dtype == torch.uint8 and torch.equal(xa, xb)
    assert "memory-mapped" in b.where and "memory-mapped" not in a.where


def test_training_on_the_cache_is_bit_identical_to_training_in_memory(folder, tmp_path):
    from safetensors.torch import load_file

    from diffuse_cli.engine import training
    from diffuse_cli.engine.config import DiffusionConfig, UNetConfig

    ucfg = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                      image_size=SIZE, in_channels=3, dropout=0.0)  # fmt: skip
    dcfg = DiffusionConfig(timesteps=50)
    cfg = TrainConfig(
        steps=3, batch_size=4, warmup=0, lr=1e-3, save_every=3, sample_every=0, hflip=True, threads=1
    )  # the same threads in both runs, whatever the load: the same sums
    events = []
    for name, ds in (("ram", D.load_folder(folder, SIZE)), ("map", _load(folder, tmp_path / "cache"))):
        training.train(ds, tmp_path / name, ucfg, dcfg, cfg, device="cpu", callback=events.append)
    a, b = load_file(tmp_path / "ram" / "model.safetensors"), load_file(tmp_path / "map" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [e for e in events if e["event"] == "log"]
    assert all(0 <= e["data_ms"] <= e["step_ms"] for e in logs)
    rec = json.loads((tmp_path / "map" / "log.jsonl").read_text().splitlines()[-1])
    assert rec["data_ms"] > 0 and rec["step_ms"] > rec["data_ms"]
    assert [e["data"] for e in events if e["event"] == "start"][1].endswith("batches read from the memory-mapped cache")


# --------------------------------------------------------------------------- concurrent openers


def _opener(folder, cache_dir, env, delay, slow, go, out):
    """One process opening the cache (as a plain process, or as a torchrun rank through ``env``)."""
    try:
        os.environ.update(env)
        go.wait()
        time.sleep(delay)
        progress = (lambda done, total: time.sleep(0.01)) if slow else None
        ds = D.load_dataset(str(folder), SIZE, progress=progress, cache_dir=cache_dir)
        out.put((env.get("LOCAL_RANK", "-"), ds.cache.status, _digest(ds.images), time.time()))
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put((env.get("LOCAL_RANK", "-"), "error", f"{type(err).__name__}: {err}", traceback.format_exc()))


def _watcher(path, go, stop, out):
    """Polls the cache path while others build it: every file it manages to open must be whole."""
    go.wait()
    seen = {"missing": 0, "whole": 0, "other": []}
    while not stop.is_set():
        try:
            C.open_cache(path, verify_data=True)
            seen["whole"] += 1
        except C.CacheInvalid as why:
            if str(why) == "missing":
                seen["missing"] += 1
            else:
                seen["other"].append(str(why))
        time.sleep(0.002)
    out.put(seen)


def _run_openers(folder, cache_dir, specs, watch: Path | None = None):
    ctx = mp.get_context("fork")
    go, out, stop = ctx.Barrier(len(specs) + (watch is not None)), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_opener, args=(folder, cache_dir, env, delay, slow, go, out)) for env, delay, slow in specs
    ]
    watch_out = ctx.Queue()
    if watch is not None:
        procs.append(ctx.Process(target=_watcher, args=(watch, go, stop, watch_out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in specs]
    stop.set()
    seen = watch_out.get(timeout=30) if watch is not None else None
    for p in procs:
        p.join(timeout=30)
    return results, seen


def test_concurrent_processes_build_once_and_never_read_a_half_written_cache(folder, tmp_path):
    cache = tmp_path / "cache"
    ref = _digest(D.load_folder(folder, SIZE).images)
    path = C.cache_path(cache, folder, SIZE, None)
    cache.mkdir()
    results, seen = _run_openers(folder, cache, [({}, 0.0, True)] * 3, watch=path)
    assert [r[1] for r in results].count("built") == 1, results
    assert sorted(r[1] for r in results) == ["built", "hit", "hit"], results
    assert all(r[2] == ref for r in results)
    assert seen["other"] == [] and seen["missing"] > 0 and seen["whole"] > 0, seen


def _rank_env(local_rank: int, run: str = "launch-1") -> dict:
    return {"TORCHELASTIC_RUN_ID": run, "WORLD_SIZE": "4", "LOCAL_RANK": str(local_rank), "RANK": str(local_rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "TORCHELASTIC_RESTART_COUNT": "0"}  # fmt: skip


def test_other_ranks_wait_for_local_rank_zero(folder, tmp_path):
    """Ranks 1-3 start first; they must wait until rank 0 has built the file, then map that same file."""
    cache = tmp_path / "cache"
    ref = _digest(D.load_folder(folder, SIZE).images)
    specs = [(_rank_env(r), 0.0, False) for r in (1, 2, 3)] + [(_rank_env(0), 0.5, True)]
    results, _ = _run_openers(folder, cache, specs)
    by_rank = {r[0]: r for r in results}
    assert by_rank["0"][1] == "built", results
    assert all(r[1] == "hit" and r[2] == ref for k, r in by_rank.items() if k != "0"), results
    assert all(by_rank[k][3] >= by_rank["0"][3] - 0.05 for k in "123")  # none finished before rank 0 had built

    # A later launch with the same file: rank 0 checks it (a hit), the others wait for that check again.
    specs = [(_rank_env(r, "launch-2"), 0.0, False) for r in (1, 2)] + [(_rank_env(0, "launch-2"), 0.3, False)]
    results, _ = _run_openers(folder, cache, specs)
    assert sorted(r[1] for r in results) == ["hit", "hit", "hit"] and all(r[2] == ref for r in results), results


def test_a_note_left_by_an_earlier_launch_with_the_same_id_is_not_trusted(folder, tmp_path):
    """A fixed --rdzv-id and port give two launches the same id; the old note (here: the folder changed since)
    must not send the other ranks to map the old file while local rank 0 decodes the new one."""
    cache = tmp_path / "cache"
    D.load_dataset(str(folder), SIZE, cache_dir=cache)  # an earlier run left a valid cache file...
    path = C.cache_path(cache, folder, SIZE, None)
    old_fp = C.read_header(open(path, "rb"))["fingerprint"]
    env = _rank_env(0)
    launch = "/".join(
        env[k] for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    )
    stale = {"launch": launch, "time": time.time() - 60, "fingerprint": old_fp}  # ...and a note, a minute ago
    (cache / (path.name + ".ready")).write_text(json.dumps(stale))
    _add(folder)  # the folder changed since
    ref = _digest(D.load_folder(folder, SIZE).images)
    specs = [(_rank_env(1), 0.0, False), (_rank_env(0), 0.3, True)]
    results, _ = _run_openers(folder, cache, specs)
    assert sorted(r[1] for r in results) == ["hit", "rebuilt"], results
    assert all(r[2] == ref for r in results), results


def test_when_rank_zero_fails_every_rank_reports_its_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    specs = [(_rank_env(1), 0.0, False), (_rank_env(0), 0.2, False)]
    results, _ = _run_openers(empty, tmp_path / "cache", specs)
    assert [r[1] for r in results] == ["error", "error"], results
    assert all(r[2].startswith("DataError: no images found in") for r in results), results


# --------------------------------------------------------------------------- placement


GB = 10**9


@pytest.mark.parametrize(
    "nbytes, free, fits",
    [(1 * GB, 80 * GB, True), (40 * GB, 80 * GB, True), (40 * GB + 1, 80 * GB, False), (16 * GB, 10 * GB, False),
     (0, 0, True)],
)  # fmt: skip
def test_fits_on_device(nbytes, free, fits):
    assert placement.fits_on_device(nbytes, free) is fits
    assert placement.DEVICE_FRACTION == 0.5


def test_cuda_placement_streams_when_the_data_do_not_fit(folder, tmp_path):
    """The decision needs no GPU when the answer is 'stream': the free memory is passed in."""
    ds = _load(folder, tmp_path / "cache")
    placed = placement.place_images(ds, torch.device("cuda", 0), free_bytes=2 * ds.images.numel() - 1)
    assert not placed.on_device and placed.images is ds.images
    assert "free on cuda:0: batches read from the memory-mapped cache" in placed.where


def test_cpu_placement_keeps_the_tensor_and_says_where(folder, tmp_path):
    ds = _load(folder, tmp_path / "cache")
    placed = placement.place_images(ds, torch.device("cpu"))
    assert placed.images is ds.images and not placed.on_device and len(placed) == len(ds)
    assert placed.shape == ds.images.shape


# --------------------------------------------------------------------------- the CLI


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def test_cli_cache_options_and_data_time(folder, tmp_path):
    from diffuse_cli.cli import app

    runner = CliRunner()
    args = ["train", str(folder), "--image-size", str(SIZE), "--preset", "tiny", "--steps", "2", "--batch-size", "2",
            "--sample-every", "0", "--save-every", "2", "--device", "cpu", "-T", "20", "--overwrite"]  # fmt: skip
    cache = tmp_path / "mycache"
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--cache-dir", str(cache)])
    assert first.exit_code == 0, first.output
    assert "decoded into the cache" in _text(first) and str(cache) in first.output.replace("\n", "")
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--cache-dir", str(cache)])
    assert second.exit_code == 0, second.output
    assert "memory-mapped from the cache" in _text(second)
    assert "batches read from the memory-mapped cache" in _text(second)
    assert "ms/step" in _text(second)
    rec = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[-1])
    assert rec["step_ms"] > rec["data_ms"] > 0

    before = sorted(p.name for p in cache.iterdir())
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--cache-dir", str(cache), "--no-cache"])
    assert plain.exit_code == 0, plain.output
    assert "decoded into memory" in _text(plain) and sorted(p.name for p in cache.iterdir()) == before


@pytest.mark.slow  # about 20 s here: four Python processes that import torch
def test_benchmark_script_runs_and_replaces_its_markdown_section(tmp_path):
    """benchmarks/data_startup.py on a tiny folder, one process: the script cannot rot."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n<!-- data:start -->\nstale\n<!-- data:end -->\n\ntrailer\n")
    cmd = [sys.executable, "-m", "benchmarks.data_startup", "--images", "40", "--nproc", "1", "--folder", str(tmp_path / "pngs"),
           "--markdown", str(md)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=root
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = md.read_text()
    assert "stale" not in text and text.count("<!-- data:start -->") == 1 and text.rstrip().endswith("trailer")
    assert "| cached run (map the cache) | 1 |" in text and "data call" in text
