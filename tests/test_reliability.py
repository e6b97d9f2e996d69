"""The whole tool against the real world: kills, full disks, junk input, damaged checkpoints, determinism.

Every test drives the CLI, in-process through Typer's CliRunner or as a real `python -m diffuse_cli`
subprocess (signals need a process of their own). What is promised, and checked here:

* SIGKILL at any moment, also in the middle of a checkpoint write, loses at most one save interval
  of steps; `--resume` continues, and the finished run is bit-identical to one never killed.
* Ctrl-C (SIGINT) and SIGTERM save the state and exit 130 and 143 (128 + the signal number, as a
  shell reports them) with one line on stderr; other commands leave no temporary files behind.
* A full disk, a read-only folder or a permission error while writing a checkpoint, a preview, the
  log or a picture is one line and exit 1; the previous checkpoint is left intact.
* A folder of junk trains on its good images and counts the rest by reason; a damaged, edited or
  foreign checkpoint, or a pickle, is refused in one line and never unpickled.
* The same seed on the CPU gives the same bytes: weights, states and PNGs.

Fuzzing the options of every command lives in test_fuzz_cli.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffuse_cli.cli import app
from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import data as data_mod
from diffuse_cli.engine import fileio, models, rundir
from diffuse_cli.engine.config import UNetConfig
from diffuse_cli.engine.unet import UNet
from helpers import runner

# A 1M-parameter U-Net on 8x8 digits: a training step takes milliseconds on one CPU thread.
TINY = ["--preset", "tiny", "--batch-size", "8", "--device", "cpu", "-T", "50", "--kind", "cosine"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ENV.pop("DIFFUSE_DEBUG", None)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def no_crash(r) -> None:
    """Exit 0, 1 or 2, never an exception escaping the app, never a traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{r.exception!r}\n{r.output}"
    assert r.exit_code in (0, 1, 2), r.output
    assert "Traceback" not in r.output


def one_line_error(r, pattern: str = "", code: int = 1) -> str:
    """The command failed with exit ``code`` and exactly one line on stderr that matches ``pattern``."""
    no_crash(r)
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def temporaries(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob(f"{fileio.TMP_PREFIX}*")]


def diffuse(*args, **kw) -> subprocess.Popen:
    """`diffuse ARGS` as a separate process, through the real entry point (`main`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "diffuse_cli", *map(str, args)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 120.0, poll: float = 0.0005) -> bool:
    """Poll until ``predicate()`` holds; False if ``proc`` ended or time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


def state_steps(run: Path) -> list[int]:
    return [int(p.name[len("state-") : -len(".safetensors")]) for p in ckpt.list_states(run)]


def flip_byte(path: Path, index: int) -> None:
    b = bytearray(path.read_bytes())
    b[index] ^= 0xFF
    path.write_bytes(bytes(b))


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Commands that write to a default place (samples/, runs/) write into the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run: states at steps 2 and 4, model.safetensors at step 4."""
    out = tmp_path_factory.mktemp("run") / "r"
    r = invoke(
        "train", "builtin:digits", *TINY, "--steps", "4", "--save-every", "2", "--sample-every", "0", "--out", out
    )
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


# =========================================================================== 1. kills and signals


def _kill_target_seen(run: Path, pid: int, target: str) -> bool:
    prefix = f"{fileio.TMP_PREFIX}{pid}-{target}"
    for folder in (run, run / ckpt.STATE_DIR, run / "samples"):
        try:
            if any(name.startswith(prefix) for name in os.listdir(folder)):
                return True
        except OSError:
            pass
    return False


def _progress(run: Path) -> int:
    """The furthest step the run has shown: its newest state file or log line."""
    steps = state_steps(run)
    try:
        for line in (run / "log.jsonl").read_text().splitlines():
            steps.append(json.loads(line)["step"])
    except (OSError, ValueError, KeyError):
        pass
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    """SIGKILL during state, model, config and preview writes and at random times; resume each time."""
    steps, every = 300, 10
    run = tmp_path / "run"
    args = [
        "train",
        "builtin:digits",
        *TINY,
        "--steps",
        steps,
        "--save-every",
        every,
        "--sample-every",
        50,
        "--keep",
        2,
        "--out",
        run,
    ]
    rng = random.Random(20240611)
    # "state-"/"model."/"config."/"step-" are the temporaries of the state, the EMA model, config.json, a preview.
    targets = ["state-", "model.", "time", "state-", "config.", "time", "step-", "state-"]
    resumable = 0
    kills = []  # (target, whether it was caught in the act, resumable step after the kill)
    for target in targets:
        has_state = bool(ckpt.list_states(run))
        p = diffuse(*args, *(["--resume"] if has_state else ["--overwrite"] if run.exists() else []))
        if target == "time":
            wait_for(lambda: False, p, timeout=rng.uniform(0.5, 6.0))  # anywhere: imports, data, steps, saves
            caught = p.poll() is None
        else:
            caught = wait_for(lambda t=target, pid=p.pid: _kill_target_seen(run, pid, t), p, timeout=120)
        seen_states, seen = state_steps(run), _progress(run)
        p.kill()
        p.communicate()
        if p.returncode == 0:
            break  # the run finished before this kill: nothing left to attack
        assert p.returncode == -signal.SIGKILL
        if not ckpt.list_states(run):
            assert seen <= every, "more than one save interval lost"
            kills.append((target, caught, 0))
            continue
        now = rundir.newest_state(run).step
        assert now >= max(seen_states, default=0), "a saved state was lost"
        assert now >= seen - every, f"lost more than one save interval: showed step {seen}, resumes at {now}"
        assert now >= resumable, "completed steps went backwards"
        resumable = now
        kills.append((target, caught, now))
    # every write but the (tiny, quick) preview PNG was caught in the act
    assert len(kills) >= 6 and all(caught for t, caught, _ in kills if t in ("state-", "model.", "config.")), kills

    p = diffuse(*args, "--resume")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out + err
    assert "Traceback" not in out + err
    assert not temporaries(run), temporaries(run)
    model = run / "model.safetensors"
    ck = ckpt.load(model)
    assert ck.step == steps
    models.load_for_sampling(model)
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)) and log[-1] == steps, "the log repeats or skips back"
    assert state_steps(run) == [steps - every, steps]  # --keep 2

    # Resume is bit-exact on the CPU, so the kills changed nothing at all.
    ref = tmp_path / "ref"
    p = diffuse(*[ref if a == run else a for a in args])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out + err
    assert (ref / "model.safetensors").read_bytes() == model.read_bytes()


def test_sigkill_during_state_write_then_resume(tmp_path):
    """The fast version: one kill while a state file is being written; resume finishes the run."""
    run = tmp_path / "run"
    args = ["train", "builtin:digits", *TINY, "--steps", 40, "--save-every", 5, "--sample-every", 0, "--out", run]
    p = diffuse(*args)
    # Not the first state: its predecessor must survive the kill.
    assert wait_for(lambda: _kill_target_seen(run, p.pid, "state-00000010"), p, timeout=180), p.communicate()
    p.kill()
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert state_steps(run)[-1] == 5 and rundir.newest_state(run).step == 5
    assert temporaries(run)  # the torn write is still there, hidden ...
    p = diffuse(*args, "--resume")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert "resuming at step 5" in out
    assert not temporaries(run)  # ... and the resumed run removed it
    assert ckpt.load(run / "model.safetensors").step == 40
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)), "steps logged after state 5 were logged again after the resume"


def resume_to_6(run):
    """`diffuse train --resume` of the tiny run to step 6, saving every 2 steps."""
    return invoke(
        "train", "builtin:digits", *TINY, "--steps", 6, "--save-every", 2, "--sample-every", 0, "--out", run, "--resume"
    )


def test_resume_removes_torn_writes_everywhere(run_copy):
    """What a SIGKILL can leave: hidden temporaries beside the model, the states and the previews, a torn log line."""
    run = run_copy
    (run / "samples").mkdir(exist_ok=True)
    for folder, name in (
        (run, "model.safetensors"),
        (run / "checkpoints", "state-00000006.safetensors"),
        (run / "samples", "step-000006.png"),
    ):
        (folder / f"{fileio.TMP_PREFIX}4242-{name}").write_bytes(b"half a file")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.9}\n{"step": 6, "lo')  # past the newest state (4), then torn
    r = resume_to_6(run)
    assert r.exit_code == 0, r.output
    assert not temporaries(run)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2, 4, 6]


def _stop_training(tmp_path: Path, sig: int):
    run = tmp_path / "run"
    p = diffuse(
        "train",
        "builtin:digits",
        *TINY,
        "--steps",
        1_000_000,
        "--save-every",
        100_000,
        "--sample-every",
        0,
        "--out",
        run,
    )
    assert wait_for(lambda: (run / "log.jsonl").exists(), p, timeout=180), p.communicate()
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return run, p.returncode, out, err


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_sigint_and_sigterm_save_and_exit(tmp_path, sig, code, name):
    run, rc, out, err = _stop_training(tmp_path, sig)
    assert rc == code, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(rf"stopped: {name} at step (\d+); the state is saved in .* --resume", lines[0])
    assert m, lines[0]
    step = int(m.group(1))
    assert step >= 10  # the first log line (step 10) was written: it trained
    assert state_steps(run) == [step]
    assert ckpt.load(run / "model.safetensors").step == step
    assert not temporaries(run)
    assert "Traceback" not in out

    r = invoke("train", "builtin:digits", *TINY, "--steps", step + 3, "--sample-every", 0, "--out", run, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming at step {step}" in r.output
    assert ckpt.load(run / "model.safetensors").step == step + 3


@pytest.mark.parametrize(
    "sig, code, message",
    [
        (signal.SIGTERM, 143, "terminated"),
        pytest.param(signal.SIGINT, 130, "interrupted", marks=pytest.mark.slow),
    ],
)
def test_signal_while_writing_pictures_leaves_no_temporaries(tmp_path, run_dir, sig, code, message):
    """Outside the training loop a signal unwinds the writes: every PNG left is whole, no temporary remains."""
    out = tmp_path / "pics"
    p = diffuse("sample", run_dir, "--num", 3000, "--batch-size", 3000, "--steps", 1, "--out", out, "--device", "cpu")
    assert wait_for(lambda: out.is_dir() and len(os.listdir(out)) > 30, p, timeout=180), p.communicate()
    p.send_signal(sig)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == code, stdout + err
    assert err.strip() == f"stopped: {message}"
    assert not temporaries(out)
    names = sorted(os.listdir(out))
    assert 30 <= len(names) < 3000
    for name in names:
        with Image.open(out / name) as im:
            im.load()


# =========================================================================== 2. storage faults

FAULTS = {
    errno.ENOSPC: "no space left on device while writing",
    errno.EACCES: "permission denied: cannot write",
    errno.EROFS: "read-only file system: cannot write",
}


@pytest.fixture
def disk(monkeypatch):
    """``disk.fail(errno, suffix)``: renames onto (or, with how="write", writes of) files ending in ``suffix`` fail."""

    class Disk:
        def fail(self, code: int, suffix: str, how: str = "rename") -> None:
            if how == "rename":
                real = os.replace

                def replace(src, dst, *a, **k):
                    if str(dst).endswith(suffix):
                        raise OSError(code, os.strerror(code), str(dst))
                    return real(src, dst, *a, **k)

                monkeypatch.setattr(os, "replace", replace)
            else:  # the disk fills up half-way through the data
                import safetensors.torch as st

                real_save, real_open = st.save_file, open

                def save_file_(tensors, filename, metadata=None):
                    real_save(tensors, filename, metadata=metadata)
                    with real_open(filename, "r+b") as f:
                        f.truncate(os.path.getsize(filename) // 2)
                    raise OSError(code, os.strerror(code))

                class HalfFile(io.FileIO):
                    def write(self, b):
                        super().write(bytes(b)[: len(b) // 2])
                        raise OSError(code, os.strerror(code))

                def open_(path, mode="r", *a, **k):
                    if "w" in mode and Path(path).name.endswith(suffix):
                        return HalfFile(path, "w")
                    return real_open(path, mode, *a, **k)

                monkeypatch.setattr(st, "save_file", save_file_)
                monkeypatch.setattr(fileio, "open", open_, raising=False)  # fileio's own `open`

    return Disk()


@pytest.mark.parametrize(
    "code, how", [(errno.ENOSPC, "rename"), (errno.EACCES, "rename"), (errno.EROFS, "rename"), (errno.ENOSPC, "write")]
)
def test_checkpoint_write_fault_keeps_previous(run_copy, disk, code, how):
    run = run_copy
    model_before = (run / "model.safetensors").read_bytes()
    states_before = {p.name: p.read_bytes() for p in ckpt.list_states(run)}
    disk.fail(code, ".safetensors", how)
    r = resume_to_6(run)
    line = one_line_error(r, FAULTS[code])
    assert "state-00000006.safetensors" in line
    assert (run / "model.safetensors").read_bytes() == model_before
    assert {p.name: p.read_bytes() for p in ckpt.list_states(run)} == states_before
    assert rundir.newest_state(run).step == 4
    assert not temporaries(run)


@pytest.mark.parametrize("what", ["preview", "log", "config"])
def test_run_file_write_fault_keeps_checkpoint(run_copy, disk, monkeypatch, what):
    run = run_copy
    model_before = (run / "model.safetensors").read_bytes()
    if what == "preview":
        disk.fail(errno.ENOSPC, ".png")
    elif what == "config":
        disk.fail(errno.ENOSPC, "config.json")
    else:
        real_open = open

        def open_(path, mode="r", *a, **k):
            if Path(path).name == "log.jsonl" and "a" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_open(path, mode, *a, **k)

        monkeypatch.setattr(fileio, "open", open_, raising=False)  # the log is appended by fileio.append_jsonl
    r = invoke(
        "train",
        "builtin:digits",
        *TINY,
        "--steps",
        "8",
        "--save-every",
        "2",
        "--sample-every",
        "1",
        "--out",
        run,
        "--resume",
    )
    one_line_error(
        r,
        "no space left on device while writing .*"
        + {"preview": r"step-0+5\.png", "log": "log.jsonl", "config": "config.json"}[what],
    )
    assert (run / "model.safetensors").read_bytes() == model_before
    assert rundir.newest_state(run).step == 4
    assert not temporaries(run)


@pytest.mark.parametrize("option, suffix", [("--out", "0000.png"), ("--grid", "grid.png"), ("--gif", "anim.gif")])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_sample_output_fault(run_dir, tmp_path, disk, option, suffix, code):
    disk.fail(code, suffix)
    target = {"--out": tmp_path / "imgs", "--grid": tmp_path / "grid.png", "--gif": tmp_path / "anim.gif"}[option]
    extra = [] if option == "--out" else ["--out", tmp_path / "imgs"]
    r = invoke("sample", run_dir, "--num", "2", "--steps", "2", option, target, *extra)
    one_line_error(r, FAULTS[code] + ".*" + re.escape(suffix))
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("option, suffix", [("--out", "strip.png"), ("--frames", "t0003.png"), ("--gif", "n.gif")])
def test_noise_output_fault(tmp_path, disk, option, suffix):
    Image.new("RGB", (12, 10), (200, 30, 60)).save(tmp_path / "photo.png")
    disk.fail(errno.ENOSPC, suffix)
    target = {"--out": tmp_path / "strip.png", "--frames": tmp_path / "frames", "--gif": tmp_path / "n.gif"}[option]
    extra = [] if option == "--out" else ["--out", tmp_path / "strip.png"]
    r = invoke("noise", tmp_path / "photo.png", "--t", "3,7", "--size", "8", option, target, *extra)
    one_line_error(r, FAULTS[errno.ENOSPC] + ".*" + re.escape(suffix))
    assert not temporaries(tmp_path)


def test_schedule_plot_fault(tmp_path, disk):
    disk.fail(errno.EROFS, "plot.png")
    one_line_error(invoke("schedule", "-T", "20", "--plot", tmp_path / "plot.png"), FAULTS[errno.EROFS])
    assert not temporaries(tmp_path)


def test_read_only_and_occupied_output_folders(run_dir, tmp_path, monkeypatch):
    """Root can write anywhere, so a read-only folder is simulated where the check happens."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access, real_mkdir = os.access, Path.mkdir

    def access(p, mode, *a, **k):  # readable, not writable
        return not (Path(p) == locked and mode & os.W_OK) and real_access(p, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    r = invoke("sample", run_dir, "--num", "1", "--steps", "1", "--out", locked)
    one_line_error(r, "permission denied: cannot write into .*locked")

    def mkdir(self, *a, **k):
        if self.name == "ro":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    one_line_error(
        invoke("sample", run_dir, "--num", "1", "--steps", "1", "--out", tmp_path / "ro"), "read-only file system"
    )
    one_line_error(
        invoke("train", "builtin:digits", *TINY, "--steps", "1", "--out", tmp_path / "ro"), "read-only file system"
    )
    (tmp_path / "afile").write_text("x")
    one_line_error(
        invoke("sample", run_dir, "--num", "1", "--grid", tmp_path / "afile" / "g.png"),
        "not a directory|is not a directory",
    )
    one_line_error(invoke("train", "builtin:digits", *TINY, "--steps", "1", "--out", tmp_path / "afile"), "is a file")


# =========================================================================== 3. hostile files


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_img(w: int = 24, h: int = 20, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _bomb(w: int, h: int) -> bytes:
    """A valid PNG header that claims w x h pixels, with almost no data: Pillow's decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _every_mode() -> dict[str, bytes]:
    """One file per Pillow mode that some format can store (HSV only as WebP, which stores it as RGB)."""
    base = _noise_img(10, 12)
    out = {}
    for mode in (
        "1",
        "L",
        "LA",
        "La",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBa",
        "RGBX",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I",
        "F",
    ):
        img = base.convert(mode) if mode not in ("La", "RGBa", "PA") else Image.new(mode, (10, 12))
        for fmt, ext in (("PNG", "png"), ("TIFF", "tif"), ("WEBP", "webp")):
            try:
                out[f"mode-{mode}.{ext}"] = _png(img, fmt)
                break
            except (OSError, ValueError, KeyError):
                continue
    return out


GOOD = {
    **_every_mode(),
    "sixteen-bit.png": _png(Image.fromarray(np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16))),
    "sixteen-bit.tiff": _png(Image.fromarray(np.full((9, 9), 40000, np.uint16)), "TIFF"),
    "float.tif": _png(Image.fromarray(np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)), "TIFF"),
    "animated.gif": _png(_noise_img(), "GIF", save_all=True, append_images=[_noise_img(seed=1)], duration=50),
    "animated.webp": _png(_noise_img(), "WEBP", save_all=True, append_images=[_noise_img(seed=1)], lossless=True),
    "one-pixel.png": _png(Image.new("RGB", (1, 1), (0, 0, 255))),
    "very-wide.png": _png(Image.new("L", (6000, 2), 128)),
    "very-tall.jpg": _png(_noise_img(3, 2000), "JPEG"),
    "photo.jpeg": _png(_noise_img(), "JPEG"),
    "upper.PNG": _png(_noise_img(seed=3)),
    "deep/er/nested.bmp": _png(_noise_img(seed=4), "BMP"),
    "日本語 – ünïcödé.png": _png(_noise_img(seed=5)),
}
BAD = {  # reason (as the summary words it) -> files
    "corrupt or truncated": {
        "truncated.png": _png(_noise_img(64, 64))[:2000],
        "truncated.jpg": _png(_noise_img(64, 64), "JPEG")[:700],
        "truncated.gif": _png(_noise_img(64, 64), "GIF")[:300],
        "flipped.png": (lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:300]) + b[300:])(_png(_noise_img(64, 64))),
    },
    "empty": {"zero.png": b"", "zero.jpg": b"", "zero.tif": b""},
    "not an image": {
        "random.png": random.Random(1).randbytes(3000),
        "random.webp": random.Random(2).randbytes(50),
        "text.jpg": b"a shopping list, not a photo\n",
        "html.gif": b"<html><body>404 not found</body></html>",
    },
    "too large": {"bomb.png": _bomb(30000, 30000), "big.png": _bomb(10000, 10000)},
}
IGNORED = {"notes.txt": b"hello", "data.csv": b"a,b\n", "archive.zip": b"PK\x03\x04"}


@pytest.fixture
def hostile(tmp_path, monkeypatch) -> tuple[Path, int]:
    """A folder with every kind of good and bad file; returns it and the number of good images."""
    root = tmp_path / "camera-roll"
    for rel, payload in {**GOOD, **{k: v for files in BAD.values() for k, v in files.items()}, **IGNORED}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(payload)
    good = len(GOOD)
    with open(os.path.join(os.fsencode(root), b"latin1-\xe9t\xe9.png"), "wb") as f:  # a name that is not UTF-8
        f.write(_png(_noise_img(seed=6)))
    good += 1
    (root / ".hidden.png").write_bytes(b"junk")  # hidden: neither used nor counted
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.png").write_bytes(_png(_noise_img(seed=7)))
    (root / "link-to-elsewhere").symlink_to(elsewhere, target_is_directory=True)
    good += 1
    (root / "deep" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop: each folder once
    (root / "self-loop.png").symlink_to(root / "self-loop.png")  # ELOOP
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "locked.png").write_bytes(_png(_noise_img(seed=8)))
    (root / "private").mkdir()
    (root / "private" / "secret.png").write_bytes(_png(_noise_img(seed=9)))

    # Root reads every file whatever its mode: make two things unreadable where they are opened.
    real_open, real_scandir = open, os.scandir

    def open_(path, *a, **k):
        if Path(os.fsdecode(path)).name == "locked.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    def scandir(path="."):
        if Path(os.fsdecode(path)).name == "private":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(data_mod.folders, "open", open_, raising=False)
    monkeypatch.setattr(os, "scandir", scandir)
    return root, good


def test_hostile_folder_trains_on_good_images_and_counts_the_rest(hostile, tmp_path):
    root, good = hostile
    out = tmp_path / "run"
    r = invoke(
        "train",
        root,
        *TINY,
        "--image-size",
        "8",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--sample-every",
        "0",
        "--out",
        out,
    )
    no_crash(r)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps long lines
    assert f"{good} images used, 3x8x8" in text
    expected = {reason: len(files) for reason, files in BAD.items()}
    expected["unreadable"] = 3  # locked.png, the dangling link and the self-loop
    for line in (
        "skipped 4 corrupt or truncated files (e.g. flipped.png, truncated.gif, truncated.jpg)",
        "skipped 3 empty files",
        "skipped 4 files that are not images",
        "skipped 2 images too large to decode safely (e.g. big.png, bomb.png)",
        "skipped 3 unreadable files (e.g. dangling.jpg, locked.png, self-loop.png)",
        "skipped 1 unreadable folder",
        f"ignored {len(IGNORED)} files without an image extension",
    ):
        assert line in text, f"{line!r} not in:\n{r.output}"
    ds = ckpt.load(out / "model.safetensors").dataset
    assert ds["used"] == good
    assert ds["found"] == good + sum(expected.values())
    assert ds["skipped"] == {k: expected[k] for k in data_mod.SKIP_REASONS if k in expected}
    assert ds["unreadable_folders"] == 1 and ds["ignored"] == len(IGNORED)


@pytest.mark.parametrize("kind", ["only-junk", "empty-folder", "only-text", "missing", "file-not-image"])
def test_folders_without_a_usable_image(tmp_path, kind):
    root = tmp_path / "d"
    root.mkdir()
    if kind == "only-junk":
        for files in BAD.values():
            for name, payload in files.items():
                (root / name).write_bytes(payload)
        pattern = r"none of the \d+ images in .* could be decoded: .*corrupt or truncated"
    elif kind == "empty-folder":
        pattern = "no images found in"
    elif kind == "only-text":
        (root / "a.txt").write_text("x")
        pattern = r"no images found in .*1 other file ignored"
    elif kind == "missing":
        root = tmp_path / "nope"
        pattern = "no such file or folder"
    else:
        root = tmp_path / "x.pdf"
        root.write_bytes(b"%PDF-1.4")
        pattern = "neither a folder nor an image file"
    one_line_error(invoke("train", root, *TINY, "--steps", "1", "--out", tmp_path / "run"), pattern)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# --- damaged checkpoints --------------------------------------------------------------------------

MARKER = "UNPICKLED-MARKER"


class _Armed:
    """Unpickling this creates the file MARKER in the current folder: proof that something unpickled it."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


def _rewrite(src: Path, dst: Path, *, meta=None, tensors=None) -> Path:
    """Copy a checkpoint, changing its metadata (dict -> dict) and/or tensors (dict -> dict)."""
    with safe_open(str(src), "pt") as f:
        m = dict(f.metadata())
    t = load_file(str(src))
    save_file(tensors(t) if tensors else t, str(dst), metadata=meta(m) if meta else m)
    return dst


def _edit_json(key: str, **changes):
    def meta(m):
        d = json.loads(m[key])
        d.update(changes)
        return {**m, key: json.dumps(d)}

    return meta


def _other_model(src: Path, dst: Path) -> Path:
    """A checkpoint that says it is the model of ``src`` but holds the weights of a narrower U-Net."""
    dst = dst / "m.safetensors"
    ck = ckpt.load(src)
    other = UNet(
        UNetConfig(
            **{
                **ck.model,
                "base_channels": 16,
                "channel_mults": tuple(ck.model["channel_mults"]),
                "attention_resolutions": tuple(ck.model["attention_resolutions"]),
            }
        )
    )
    return ckpt.save(dst, other.state_dict(), kind="model", model=ck.model, diffusion=ck.diffusion, dataset=ck.dataset)


def _nan_weights(src: Path, dst: Path) -> Path:
    dst = dst / "m.safetensors"
    ck = ckpt.load(src)
    w = {k: v.clone() for k, v in ck.tensors.items()}
    w["conv_out.weight"][0].fill_(float("nan"))
    return ckpt.save(dst, w, kind="model", model=ck.model, diffusion=ck.diffusion, dataset=ck.dataset)


def _diffusers_like(src: Path, dst: Path) -> Path:
    dst = dst / "m.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(dst), metadata={"format": "pt"})
    return dst


DAMAGED = {  # name -> (make(model_path, tmp_dir) -> path, what the one line must say)
    "truncated-to-8-bytes": (
        lambda s, d: _write(d / "m.safetensors", s.read_bytes()[:8]),
        "corrupt or truncated|not a",
    ),
    "truncated-half": (
        lambda s, d: _write(d / "m.safetensors", s.read_bytes()[: s.stat().st_size // 2]),
        "corrupt or truncated",
    ),
    "truncated-last-byte": (lambda s, d: _write(d / "m.safetensors", s.read_bytes()[:-1]), "corrupt or truncated"),
    "zero-bytes": (lambda s, d: _write(d / "m.safetensors", b""), "only 0 bytes"),
    "flipped-length-byte": (lambda s, d: _flipped(s, d, 2), "corrupt or truncated"),
    "flipped-header-byte": (lambda s, d: _flipped(s, d, 8 + header_length(s) // 2), "corrupt or truncated"),
    "flipped-first-json-byte": (lambda s, d: _flipped(s, d, 8), "corrupt or truncated"),
    "flipped-tensor-byte": (lambda s, d: _flipped(s, d, s.stat().st_size - 3), "checksum"),
    "not-a-diffuse-file": (_diffusers_like, "not a diffuse checkpoint"),
    "another-models-weights": (_other_model, "do not match its model config"),
    "edited-width": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=_edit_json("model", base_channels=64)),
        "do not match its model config",
    ),
    "edited-levels": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=_edit_json("model", channel_mults=[1, 2])),
        "do not match its model config",
    ),
    "edited-image-size": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=_edit_json("model", image_size=10**12)),
        "inconsistent model config",
    ),
    "edited-channels": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=_edit_json("model", in_channels=3)),
        "inconsistent model config|do not match",
    ),
    "edited-timesteps": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=_edit_json("diffusion", timesteps="abc")),
        "invalid diffusion config",
    ),
    "edited-schedule": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=_edit_json("diffusion", schedule=None)),
        "invalid diffusion config",
    ),
    "model-config-not-an-object": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=lambda m: {**m, "model": "[]"}),
        "damaged diffuse metadata",
    ),
    "model-config-not-json": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=lambda m: {**m, "model": "{oops"}),
        "damaged diffuse metadata",
    ),
    "unknown-kind": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=lambda m: {**m, "diffuse.kind": "lora"}),
        "damaged diffuse metadata",
    ),
    "future-format": (
        lambda s, d: _rewrite(s, d / "m.safetensors", meta=lambda m: {**m, "diffuse.format": "9"}),
        "checkpoint format '9'",
    ),
    "nan-weights": (_nan_weights, "NaN or infinity"),
    "png-renamed": (lambda s, d: _write(d / "m.safetensors", _png(_noise_img())), "corrupt or truncated"),
    "folder-without-model": (lambda s, d: d, "has no model.safetensors"),
    "pickle.pt": (lambda s, d: _write(d / "m.pt", pickle.dumps(_Armed(), protocol=2)), "unpickl"),
    "pickle.ckpt": (lambda s, d: _write(d / "m.ckpt", pickle.dumps(_Armed(), protocol=4)), "unpickl"),
    "torch-save.pth": (lambda s, d: _torch_save(d / "m.pth"), "unpickl"),
    "pickle-renamed.safetensors": (
        lambda s, d: _write(d / "m.safetensors", pickle.dumps(_Armed(), protocol=5)),
        "pickle",
    ),
    "old-pickle-renamed.safetensors": (
        lambda s, d: _write(d / "m.safetensors", pickle.dumps(_Armed(), protocol=0)),
        "corrupt or truncated|pickle",
    ),
    "torch-save-renamed.safetensors": (lambda s, d: _torch_save(d / "m.safetensors"), "pickle"),
}


def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def _flipped(src: Path, d: Path, index: int) -> Path:
    dst = d / "m.safetensors"
    shutil.copyfile(src, dst)
    flip_byte(dst, index)
    return dst


def _torch_save(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Armed()}, path)
    return path


def test_the_pickles_are_armed(tmp_path):
    """The pickles below really do run code when unpickled, so the marker's absence means something."""
    for payload in (pickle.dumps(_Armed(), protocol=p) for p in (0, 2, 5)):
        pickle.loads(payload)
        assert Path(MARKER).exists()
        Path(MARKER).unlink()
    torch.load(_torch_save(tmp_path / "t.pth"), weights_only=False)
    assert Path(MARKER).exists()


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_checkpoint_is_refused_in_one_line(run_dir, tmp_path, name):
    make, pattern = DAMAGED[name]
    d = tmp_path / "ck"
    d.mkdir()
    path = make(run_dir / "model.safetensors", d)
    r = invoke("sample", path, "--num", "2", "--steps", "2", "--out", tmp_path / "imgs")
    one_line_error(r, pattern)
    assert not Path(MARKER).exists(), "a pickle was unpickled"
    assert not (tmp_path / "imgs").exists(), "outputs were started before the checkpoint was accepted"


def test_resume_skips_a_damaged_newest_state(run_copy):
    run = run_copy
    flip_byte(ckpt.list_states(run)[-1], -1)  # state-4: one bit-rotted byte of tensor data
    r = resume_to_6(run)
    assert r.exit_code == 0, r.output
    assert "resuming at step 2" in r.output
    assert ckpt.load(run / "model.safetensors").step == 6


def test_resume_with_every_state_damaged(run_copy):
    run = run_copy
    for p in ckpt.list_states(run):
        p.write_bytes(p.read_bytes()[:100])
    r = invoke("train", "builtin:digits", *TINY, "--steps", "6", "--out", run, "--resume")
    one_line_error(r, r"no loadable training state .*state-00000002.safetensors: .*corrupt")


# =========================================================================== 5. determinism


def test_same_seed_same_bytes_in_process(tmp_path):
    for name in ("a", "b"):
        r = invoke(
            "train",
            "builtin:digits",
            *TINY,
            "--steps",
            "3",
            "--save-every",
            "3",
            "--sample-every",
            "3",
            "--seed",
            "7",
            "--out",
            tmp_path / name,
        )
        assert r.exit_code == 0, r.output
        r = invoke(
            "sample",
            tmp_path / name,
            "--num",
            "3",
            "--steps",
            "4",
            "--seed",
            "5",
            "--sampler",
            "ddim",
            "--eta",
            "1",
            "--out",
            tmp_path / f"{name}-imgs",
            "--grid",
            tmp_path / f"{name}-grid.png",
        )
        assert r.exit_code == 0, r.output
    for rel in ("model.safetensors", "checkpoints/state-00000003.safetensors", "samples/step-000003.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    for rel in ("imgs/0000.png", "imgs/0002.png"):
        assert (tmp_path / f"a-{rel}").read_bytes() == (tmp_path / f"b-{rel}").read_bytes(), rel
    assert (tmp_path / "a-grid.png").read_bytes() == (tmp_path / "b-grid.png").read_bytes()
    # ... and the seed matters
    r = invoke(
        "sample",
        tmp_path / "a",
        "--num",
        "1",
        "--steps",
        "4",
        "--seed",
        "6",
        "--sampler",
        "ddim",
        "--eta",
        "1",
        "--out",
        tmp_path / "c-imgs",
    )
    assert (tmp_path / "c-imgs" / "0000.png").read_bytes() != (tmp_path / "a-imgs" / "0000.png").read_bytes()


def test_same_checkpoint_same_bytes(tmp_path):
    """safetensors writes its metadata in hash-map order, which changes between calls; ours is sorted."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    meta = dict(
        kind="model", model={"m": 1}, diffusion={"d": 2}, train={"t": 3}, dataset={"s": 4}, step=5, extra={"e": 6}
    )
    blobs = {ckpt.save(tmp_path / f"{i}.safetensors", tensors, **meta).read_bytes() for i in range(8)}
    assert len(blobs) == 1
    assert ckpt.load(tmp_path / "0.safetensors").step == 5


@pytest.mark.slow
def test_same_seed_same_bytes_across_processes(tmp_path):
    Image.new("RGB", (30, 20), (10, 200, 90)).save(tmp_path / "photo.png")
    for name in ("a", "b"):
        cmds = [
            (
                "train",
                "builtin:digits",
                *TINY,
                "--steps",
                "6",
                "--save-every",
                "3",
                "--sample-every",
                "6",
                "--seed",
                "11",
                "--out",
                tmp_path / name,
            ),
            (
                "sample",
                tmp_path / name,
                "--num",
                "4",
                "--seed",
                "3",
                "--sampler",
                "ddpm",
                "--out",
                tmp_path / name / "imgs",
                "--grid",
                tmp_path / name / "grid.png",
                "--device",
                "cpu",
            ),
            (
                "noise",
                tmp_path / "photo.png",
                "--t",
                "5,500",
                "--size",
                "16",
                "--seed",
                "2",
                "--out",
                tmp_path / name / "strip.png",
                "--frames",
                tmp_path / name / "frames",
            ),
        ]
        for cmd in cmds:
            p = diffuse(*cmd)
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, out + err
    files = sorted(
        p.relative_to(tmp_path / "a")
        for p in (tmp_path / "a").rglob("*")
        if p.is_file() and p.name not in ("log.jsonl",)
    )  # the log holds timings
    assert len(files) >= 12
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_real_write_failure_in_a_subprocess(run_copy):
    """No monkeypatching: the kernel refuses the write (a file size limit, EFBIG) inside safetensors' own
    writer, which reports it as its own error type, not as an OSError."""
    import resource

    run = run_copy
    model_before = (run / "model.safetensors").read_bytes()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB: a state file is ~17 MB

    p = diffuse(
        "train",
        "builtin:digits",
        *TINY,
        "--steps",
        6,
        "--save-every",
        2,
        "--sample-every",
        0,
        "--out",
        run,
        "--resume",
        preexec_fn=limit,
    )
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, out + err
    assert err.strip().count("\n") == 0 and "Traceback" not in out + err
    assert re.fullmatch(r"error: file too large .*: cannot write .*state-00000006\.safetensors", err.strip()), err
    assert (run / "model.safetensors").read_bytes() == model_before
    assert rundir.newest_state(run).step == 4
    assert not temporaries(run)
