"""Storage faults, system test: a full disk, a read-only folder or a permission error while writing a
checkpoint, a preview, the log or a picture is one line and exit 1; the previous checkpoint is left intact.
Faults are injected in-process (the `disk` fixture), and once for real: a file size limit in a subprocess.
"""

from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import fileio, rundir
from helpers import TINY_DIGITS as TINY
from helpers import diffuse, invoke, one_line_stderr, resume_to_6, temporaries

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
def test_checkpoint_write_fault_keeps_previous(shared_run_copy, disk, code, how):
    run = shared_run_copy
    model_before = (run / "model.safetensors").read_bytes()
    states_before = {p.name: p.read_bytes() for p in ckpt.list_states(run)}
    disk.fail(code, ".safetensors", how)
    r = resume_to_6(run)
    line = one_line_stderr(r, FAULTS[code])
    assert "state-00000006.safetensors" in line
    assert (run / "model.safetensors").read_bytes() == model_before
    assert {p.name: p.read_bytes() for p in ckpt.list_states(run)} == states_before
    assert rundir.newest_state(run).step == 4
    assert not temporaries(run)


@pytest.mark.parametrize("what", ["preview", "log", "config"])
def test_run_file_write_fault_keeps_checkpoint(shared_run_copy, disk, monkeypatch, what):
    run = shared_run_copy
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
    one_line_stderr(
        r,
        "no space left on device while writing .*"
        + {"preview": r"step-0+5\.png", "log": "log.jsonl", "config": "config.json"}[what],
    )
    assert (run / "model.safetensors").read_bytes() == model_before
    assert rundir.newest_state(run).step == 4
    assert not temporaries(run)


@pytest.mark.parametrize("option, suffix", [("--out", "0000.png"), ("--grid", "grid.png"), ("--gif", "anim.gif")])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_sample_output_fault(shared_run, tmp_path, disk, option, suffix, code):
    disk.fail(code, suffix)
    target = {"--out": tmp_path / "imgs", "--grid": tmp_path / "grid.png", "--gif": tmp_path / "anim.gif"}[option]
    extra = [] if option == "--out" else ["--out", tmp_path / "imgs"]
    r = invoke("sample", shared_run, "--num", "2", "--steps", "2", option, target, *extra)
    one_line_stderr(r, FAULTS[code] + ".*" + re.escape(suffix))
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("option, suffix", [("--out", "strip.png"), ("--frames", "t0003.png"), ("--gif", "n.gif")])
def test_noise_output_fault(tmp_path, disk, option, suffix):
    Image.new("RGB", (12, 10), (200, 30, 60)).save(tmp_path / "photo.png")
    disk.fail(errno.ENOSPC, suffix)
    target = {"--out": tmp_path / "strip.png", "--frames": tmp_path / "frames", "--gif": tmp_path / "n.gif"}[option]
    extra = [] if option == "--out" else ["--out", tmp_path / "strip.png"]
    r = invoke("noise", tmp_path / "photo.png", "--t", "3,7", "--size", "8", option, target, *extra)
    one_line_stderr(r, FAULTS[errno.ENOSPC] + ".*" + re.escape(suffix))
    assert not temporaries(tmp_path)


def test_schedule_plot_fault(tmp_path, disk):
    disk.fail(errno.EROFS, "plot.png")
    one_line_stderr(invoke("schedule", "-T", "20", "--plot", tmp_path / "plot.png"), FAULTS[errno.EROFS])
    assert not temporaries(tmp_path)


def test_read_only_and_occupied_output_folders(shared_run, tmp_path, monkeypatch):
    """Root can write anywhere, so a read-only folder is simulated where the check happens."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access, real_mkdir = os.access, Path.mkdir

    def access(p, mode, *a, **k):  # readable, not writable
        return not (Path(p) == locked and mode & os.W_OK) and real_access(p, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    r = invoke("sample", shared_run, "--num", "1", "--steps", "1", "--out", locked)
    one_line_stderr(r, "permission denied: cannot write into .*locked")

    def mkdir(self, *a, **k):
        if self.name == "ro":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    one_line_stderr(
        invoke("sample", shared_run, "--num", "1", "--steps", "1", "--out", tmp_path / "ro"), "read-only file system"
    )
    one_line_stderr(
        invoke("train", "builtin:digits", *TINY, "--steps", "1", "--out", tmp_path / "ro"), "read-only file system"
    )
    (tmp_path / "afile").write_text("x")
    one_line_stderr(
        invoke("sample", shared_run, "--num", "1", "--grid", tmp_path / "afile" / "g.png"),
        "not a directory|is not a directory",
    )
    one_line_stderr(invoke("train", "builtin:digits", *TINY, "--steps", "1", "--out", tmp_path / "afile"), "is a file")


def test_real_write_failure_in_a_subprocess(shared_run_copy):
    """No monkeypatching: the kernel refuses the write (a file size limit, EFBIG) inside safetensors' own
    writer, which reports it as its own error type, not as an OSError."""
    import resource

    run = shared_run_copy
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
