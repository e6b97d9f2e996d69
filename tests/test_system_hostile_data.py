"""Hostile input, system test: a folder of junk trains on its good images and counts the rest by reason; a
damaged, edited or foreign checkpoint, or a pickle, is refused in one line and never unpickled.

Fuzzing the options of every command lives in test_cli_fuzz.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import data as data_mod
from diffuse_cli.engine.config import UNetConfig
from diffuse_cli.engine.unet import UNet
from helpers import TINY_DIGITS as TINY
from helpers import flip_byte, header_length, invoke, no_crash, one_line_stderr, resume_to_6


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
    one_line_stderr(invoke("train", root, *TINY, "--steps", "1", "--out", tmp_path / "run"), pattern)
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
        lambda s, d: _write_file(d / "m.safetensors", s.read_bytes()[:8]),
        "corrupt or truncated|not a",
    ),
    "truncated-half": (
        lambda s, d: _write_file(d / "m.safetensors", s.read_bytes()[: s.stat().st_size // 2]),
        "corrupt or truncated",
    ),
    "truncated-last-byte": (lambda s, d: _write_file(d / "m.safetensors", s.read_bytes()[:-1]), "corrupt or truncated"),
    "zero-bytes": (lambda s, d: _write_file(d / "m.safetensors", b""), "only 0 bytes"),
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
    "png-renamed": (lambda s, d: _write_file(d / "m.safetensors", _png(_noise_img())), "corrupt or truncated"),
    "folder-without-model": (lambda s, d: d, "has no model.safetensors"),
    "pickle.pt": (lambda s, d: _write_file(d / "m.pt", pickle.dumps(_Armed(), protocol=2)), "unpickl"),
    "pickle.ckpt": (lambda s, d: _write_file(d / "m.ckpt", pickle.dumps(_Armed(), protocol=4)), "unpickl"),
    "torch-save.pth": (lambda s, d: _torch_save(d / "m.pth"), "unpickl"),
    "pickle-renamed.safetensors": (
        lambda s, d: _write_file(d / "m.safetensors", pickle.dumps(_Armed(), protocol=5)),
        "pickle",
    ),
    "old-pickle-renamed.safetensors": (
        lambda s, d: _write_file(d / "m.safetensors", pickle.dumps(_Armed(), protocol=0)),
        "corrupt or truncated|pickle",
    ),
    "torch-save-renamed.safetensors": (lambda s, d: _torch_save(d / "m.safetensors"), "pickle"),
}


def _write_file(path: Path, payload: bytes) -> Path:
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
def test_damaged_checkpoint_is_refused_in_one_line(shared_run, tmp_path, name):
    make, pattern = DAMAGED[name]
    d = tmp_path / "ck"
    d.mkdir()
    path = make(shared_run / "model.safetensors", d)
    r = invoke("sample", path, "--num", "2", "--steps", "2", "--out", tmp_path / "imgs")
    one_line_stderr(r, pattern)
    assert not Path(MARKER).exists(), "a pickle was unpickled"
    assert not (tmp_path / "imgs").exists(), "outputs were started before the checkpoint was accepted"


def test_resume_skips_a_damaged_newest_state(shared_run_copy):
    run = shared_run_copy
    flip_byte(ckpt.list_states(run)[-1], -1)  # state-4: one bit-rotted byte of tensor data
    r = resume_to_6(run)
    assert r.exit_code == 0, r.output
    assert "resuming at step 2" in r.output
    assert ckpt.load(run / "model.safetensors").step == 6


def test_resume_with_every_state_damaged(shared_run_copy):
    run = shared_run_copy
    for p in ckpt.list_states(run):
        p.write_bytes(p.read_bytes()[:100])
    r = invoke("train", "builtin:digits", *TINY, "--steps", "6", "--out", run, "--resume")
    one_line_stderr(r, r"no loadable training state .*state-00000002.safetensors: .*corrupt")
