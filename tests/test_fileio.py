"""Atomic writes and the JSON-lines log (engine/fileio.py): a failure leaves the old file or none, never a
temporary; OS errors become one-line OutputErrors; names of classes become safe pieces of file names."""

from __future__ import annotations

import errno
import json
import os

import pytest

from diffuse_cli.engine import fileio
from diffuse_cli.engine.errors import OutputError

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a" / "b" / "f.txt"
    fileio.atomic_write_text(p, "one")
    fileio.atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert not list(tmp_path.rglob(f"{fileio.TMP_PREFIX}*"))


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(ZeroDivisionError), fileio.atomic_path(p) as tmp:
        tmp.write_text("half")
        assert tmp.name == f"{fileio.TMP_PREFIX}{os.getpid()}-f.txt" and tmp.parent == tmp_path
        raise ZeroDivisionError
    assert p.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_a_directory_is_not_a_file_path(tmp_path):
    with pytest.raises(OutputError, match="is a directory, expected a file path"):
        fileio.atomic_write_text(tmp_path, "x")


@pytest.mark.parametrize(
    "code, words",
    [(errno.ENOSPC, "no space left on device while writing"), (errno.EACCES, "permission denied: cannot write"),
     (errno.EPERM, "permission denied"), (errno.EROFS, "read-only file system"), (errno.ENOTDIR, "is a file"),
     (errno.EDQUOT, "disk quota exceeded"), (errno.EFBIG, "file too large"), (errno.EISDIR, "is a directory"),
     (errno.EIO, "cannot write")],
)  # fmt: skip
def test_os_errors_are_described_in_one_line(code, words):
    msg = fileio.describe_os_error(OSError(code, os.strerror(code)), "/x/f.png")
    assert words in msg and "/x/f.png" in msg and "\n" not in msg


def test_ensure_dir(tmp_path):
    assert fileio.ensure_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        fileio.ensure_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="a parent of .* is a file"):
        fileio.ensure_dir(tmp_path / "file" / "sub")


def test_remove_stale_temporaries_removes_only_ours(tmp_path):
    for name in (f"{fileio.TMP_PREFIX}1-a", f"{fileio.TMP_PREFIX}2-b", "keep.txt", ".hidden"):
        (tmp_path / name).write_text("x")
    assert fileio.remove_stale_temporaries(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == [".hidden", "keep.txt"]
    assert fileio.remove_stale_temporaries(tmp_path / "missing") == 0


def test_append_jsonl_appends_one_line_per_record(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1}\n')
    fileio.append_jsonl(p, {"step": 2, "loss": 0.5, "name": "a\nb"})
    fileio.append_jsonl(p, {"step": 3})
    lines = p.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[1])["name"] == "a\nb"  # a newline in a value stays inside its record
    with pytest.raises(OutputError, match="cannot write|is a directory"):
        fileio.append_jsonl(tmp_path, {"step": 4})


def test_check_appendable(tmp_path):
    assert fileio.check_appendable(tmp_path / "new" / "e.jsonl") == tmp_path / "new" / "e.jsonl"
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "e.jsonl").exists()  # nothing written yet
    with pytest.raises(OutputError, match="cannot append to .*; choose another file with --log"):
        fileio.check_appendable(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        fileio.check_appendable(tmp_path / "afile" / "e.jsonl")


@pytest.mark.skipif(ROOT, reason="root can write whatever the mode")
def test_check_appendable_refuses_a_read_only_file(tmp_path):
    p = tmp_path / "ro.jsonl"
    p.write_text("")
    p.chmod(0o444)
    with pytest.raises(OutputError, match="cannot append to"):
        fileio.check_appendable(p)


@pytest.mark.parametrize(
    "name, safe",
    [("red", "red"), ("sea lion", "sea_lion"), ("a/b\\c", "a_b_c"), ("../etc", "etc"), ("..", "class"),
     ("", "class"), ("  ", "class"), ("x.y-z_1", "x.y-z_1"), ("ünï", "ünï"), ("a:*?<>|b", "a_b")],
)  # fmt: skip
def test_safe_name(name, safe):
    assert fileio.safe_name(name) == safe
    assert "/" not in safe and "\\" not in safe and safe not in (".", "..")
