"""Tests for diffuse_cli.engine.data: folder scanning, decoding every image mode, skips, errors, digits."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import data as D
from diffuse_cli.engine.data import MAX_AUTO_IMAGE_SIZE, infer_image_size, load_folder
from diffuse_cli.engine.errors import ConfigError, DataError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------- file makers


def _noise(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims to be w x h (8-bit gray) but holds almost no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _p_transparent() -> Image.Image:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    img.paste(1, (8, 0, 16, 16))
    img.info["transparency"] = 0
    return img


def _animated(fmt: str, **kw) -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def _exif_rotated_jpeg() -> bytes:
    """40 wide x 20 high, top half white, bottom half black, EXIF orientation 6 (rotate 90 degrees clockwise)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(Image.fromarray(a), "JPEG", quality=95, exif=exif)


def _wide() -> Image.Image:
    a = np.zeros((3, 4000), np.uint8)
    a[:, 1990:2010] = 255  # only the centre is white
    return Image.fromarray(a, "L")


GOOD = {
    "mode_1.png": lambda: _encoded(Image.new("1", (16, 16), 1), "PNG"),
    "mode_L.PNG": lambda: _encoded(Image.new("L", (20, 16), 77), "PNG"),
    "mode_LA.png": lambda: _encoded(Image.new("LA", (16, 16), (0, 0)), "PNG"),
    "mode_P.png": lambda: _encoded(_noise().quantize(16), "PNG"),
    "mode_P_transparent.png": lambda: _encoded(_p_transparent(), "PNG", transparency=0),
    "rgb.JPG": lambda: _encoded(_noise(), "JPEG"),
    "rgba.png": lambda: _encoded(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "PNG"),
    "cmyk.tif": lambda: _encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF"),
    "ycbcr.tiff": lambda: _encoded(Image.new("YCbCr", (16, 16), (100, 90, 160)), "TIFF"),
    "i16.png": lambda: _encoded(Image.fromarray(np.full((16, 16), 65535, np.uint16)), "PNG"),
    "i16b.TIF": lambda: _encoded(Image.frombytes("I;16B", (4, 4), np.full(16, 32768, ">u2").tobytes()), "TIFF"),
    "i32.tif": lambda: _encoded(Image.fromarray(np.full((16, 16), 65535, np.int32)), "TIFF"),
    "float.tif": lambda: _encoded(Image.fromarray(np.full((16, 16), 0.5, np.float32)), "TIFF"),
    "animated.gif": lambda: _animated("GIF"),
    "animated.webp": lambda: _animated("WEBP", lossless=True),
    "lossless.WEBP": lambda: _encoded(_noise(), "WEBP", lossless=True),
    "pic.BMP": lambda: _encoded(_noise((30, 50)), "BMP"),
    "tiny_1x1.bmp": lambda: _encoded(Image.new("RGB", (1, 1), BLUE), "BMP"),
    "wide_4000x3.png": lambda: _encoded(_wide(), "PNG"),
    "photo_exif.jpeg": _exif_rotated_jpeg,
    "sub/dir/nested.png": lambda: _encoded(_noise(seed=1), "PNG"),
    "日本語 ünï.png": lambda: _encoded(_noise(seed=2), "PNG"),
}
BAD = {
    "corrupt or truncated": {
        "truncated.png": lambda: _encoded(_noise(), "PNG")[:3000],
        "truncated.jpg": lambda: _encoded(_noise(), "JPEG")[:1500],
        "garbled.png": lambda: (lambda b: b[:200] + bytes(x ^ 0x5A for x in b[200:400]) + b[400:])(
            _encoded(_noise(), "PNG")
        ),
    },
    "empty": {"empty.png": lambda: b"", "empty.JPG": lambda: b""},
    "not an image": {
        "random.png": lambda: random.Random(0).randbytes(1000),
        "notes.jpg": lambda: b"this is a text file, not a picture\n",
    },
    "too large": {
        "bomb_error.png": lambda: _png_header(20000, 20000),  # 4e8 pixels: Pillow's DecompressionBombError
        "bomb_warning.png": lambda: _png_header(10000, 10000),  # 1e8 pixels: Pillow's warning, made an error
    },
}
IGNORED = {"readme.txt": b"hello", "labels.csv": b"a,b\n"}
HIDDEN = {".hidden.png", ".cache/x.png", "sub/.thumbs/t.png"}


def _write(root: Path, rel: str, payload: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(payload)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A folder with every kind of good and bad file, hidden files, symlinks and a loop."""
    root = tmp_path_factory.mktemp("zoo")
    for rel, make in GOOD.items():
        _write(root, rel, make())
    for files in BAD.values():
        for rel, make in files.items():
            _write(root, rel, make())
    for rel, payload in IGNORED.items():
        _write(root, rel, payload)
    for rel in HIDDEN:
        _write(root, rel, _encoded(_noise(), "PNG"))
    outside = tmp_path_factory.mktemp("outside")
    _write(outside, "target.png", _encoded(Image.new("RGB", (8, 8), BLUE), "PNG"))
    (root / "linked").symlink_to(outside, target_is_directory=True)  # a symlinked folder: followed
    (root / "sub" / "dir" / "loop").symlink_to(root, target_is_directory=True)  # a loop: visited once
    (root / "dangling.png").symlink_to(root / "does-not-exist.png")  # unreadable
    (root / "private").mkdir()
    _write(root, "private/secret.png", _encoded(_noise(), "PNG"))  # made unreadable in the test
    _write(root, "locked.png", _encoded(_noise(), "PNG"))  # made unreadable in the test
    return root


@pytest.fixture
def locked(monkeypatch, zoo):
    """Make zoo/locked.png and zoo/private unreadable; chmod does not stop root, who runs the tests here."""
    real_open, real_scandir = open, os.scandir

    def fake_open(path, *args, **kwargs):
        if Path(path).name == "locked.png":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def fake_scandir(path="."):
        if Path(os.fsdecode(path)).name == "private":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(D.folders, "open", fake_open, raising=False)  # the module's own `open`, not builtins
    monkeypatch.setattr(os, "scandir", fake_scandir)


# --------------------------------------------------------------------------- the zoo folder


def _undecodable(zoo: Path) -> set[str]:
    """GOOD files that this Pillow build itself cannot decode (a build without WebP or libtiff, say):
    the loader must skip them, so the expectations below follow this Pillow, not one version of it."""
    bad = set()
    for rel in GOOD:
        try:
            with Image.open(zoo / rel) as im:
                im.load()
        except Exception:  # noqa: BLE001 - any failure means this build cannot read it
            bad.add(rel)
    return bad


def test_zoo_counts_every_reason(zoo, locked):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing (a DecompressionBombWarning, an EXIF warning) may leak out
        ds = D.load_folder(zoo, 16, workers=3)
    s = ds.summary
    expected_skips = {reason: len(files) for reason, files in BAD.items()}
    expected_skips["unreadable"] = 2  # dangling.png, locked.png
    missing = _undecodable(zoo)
    n_good = len(GOOD) - len(missing) + 1  # + linked/target.png
    assert s.used == n_good
    if missing:  # skipped for a reason this build decides (not an image / corrupt); the other counts hold
        assert sum(s.skipped.values()) == sum(expected_skips.values()) + len(missing)
        assert all(s.skipped.get(r, 0) >= n for r, n in expected_skips.items())
    else:
        assert s.skipped == {r: expected_skips[r] for r in D.SKIP_REASONS}
    assert list(s.skipped) == list(D.SKIP_REASONS)  # a fixed order
    assert s.found == n_good + sum(expected_skips.values()) + len(missing)
    assert s.ignored == len(IGNORED)
    assert s.unreadable_folders == 1
    assert (s.channels, s.image_size) == (3, 16)
    assert ds.images.shape == (n_good, 3, 16, 16)
    assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
    assert set(s.examples["empty"]) == {"empty.JPG", "empty.png"}
    assert s.examples["unreadable"] == ("dangling.png", "locked.png")
    lines = s.lines()
    assert "skipped 2 empty files (e.g. empty.JPG, empty.png)" in lines
    if not missing:
        assert "skipped 2 files that are not images (e.g. notes.jpg, random.png)" in lines
        assert any(line.startswith("skipped 3 corrupt or truncated files (e.g. ") for line in lines)
    assert any(line.startswith("skipped 2 images too large") for line in lines)
    assert "skipped 1 unreadable folder" in lines and "ignored 2 files without an image extension" in lines
    assert (s.used, s.source, s.image_size, s.channels) == (n_good, str(zoo), 16, 3)
    meta = json.loads(json.dumps(s.to_dict()))
    assert meta["skipped"]["too large"] == 2 and meta["used"] == n_good


def test_zoo_scan_order_hidden_and_symlinks(zoo):
    files = [Path(p) for p in D.list_files(zoo)[0]]
    rel = [p.relative_to(zoo).as_posix() for p in files]
    assert rel == sorted(rel, key=lambda r: tuple(os.fsencode(part) for part in r.split("/")))
    assert not any(part.startswith(".") for r in rel for part in r.split("/"))
    assert "linked/target.png" in rel
    assert not any("/loop/" in r for r in rel)  # the loop back to the root is not walked again
    assert len(rel) == len(set(rel))
    assert "readme.txt" not in rel and "private/secret.png" in rel
    assert [Path(p) for p in D.list_files(zoo)[0]] == files


def test_zoo_values(zoo, locked):
    ds = D.load_folder(zoo, 16)
    missing = _undecodable(zoo)
    used = [
        r
        for p in [Path(p) for p in D.list_files(zoo)[0]]
        if p.name not in _bad() and (r := p.relative_to(zoo).as_posix()) not in missing
    ]
    assert len(used) == len(ds)
    at = dict(zip(used, ds.images, strict=True))
    at.update(dict.fromkeys(missing, torch.tensor([])))  # nothing to check for files this build cannot read
    assert (at["rgba.png"] == 255).all()  # fully transparent red on white -> white
    assert (at["mode_LA.png"] == 255).all()
    assert (at["tiny_1x1.bmp"].flatten(1).T == torch.tensor(BLUE, dtype=torch.uint8)).all()  # upscaled
    assert (at["i16.png"] == 255).all()  # 65535 -> 255, not clipped garbage
    assert (at["float.tif"] == 128).all()  # 0.5 -> 127.5 -> 128
    assert (at["mode_L.PNG"] == 77).all()
    assert (at["wide_4000x3.png"] == 255).all()  # the centred crop of a 4000x3 strip is its white middle
    assert (at["animated.gif"].flatten(1).T == torch.tensor(RED, dtype=torch.uint8)).all()  # the first frame


def _bad() -> set[str]:
    return {Path(r).name for files in BAD.values() for r in files} | {"dangling.png", "locked.png"}


def test_threads_do_not_change_the_result(zoo, locked):
    a = D.load_folder(zoo, 12, workers=1)
    b = D.load_folder(zoo, 12, workers=4)
    assert torch.equal(a.images, b.images) and a.summary == b.summary


def test_progress_callback(zoo):
    calls = []
    ds = D.load_folder(zoo, 8, progress=lambda done, total: calls.append((done, total)))
    n = ds.summary.found
    assert calls == [(i, n) for i in range(n + 1)]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read files whatever their mode")
def test_real_permissions(tmp_path):
    _write(tmp_path, "ok.png", _encoded(_noise(), "PNG"))
    _write(tmp_path, "no.png", _encoded(_noise(), "PNG"))
    (tmp_path / "no.png").chmod(0)
    try:
        ds = D.load_folder(tmp_path, 8)
    finally:
        (tmp_path / "no.png").chmod(0o600)
    assert ds.summary.skipped == {"unreadable": 1}


# --------------------------------------------------------------------------- decoding, one file at a time


def _one(tmp_path: Path, name: str, payload: bytes, size: int = 8, channels=None, **kw) -> torch.Tensor:
    p = tmp_path / name
    p.write_bytes(payload)
    return D.decode_image(p, size, channels, **kw)


@pytest.mark.parametrize(
    ("name", "make", "value"),
    [
        ("max.png", lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), 255),
        ("half.png", lambda: Image.fromarray(np.full((8, 8), 32768, np.uint16)), 128),  # 32768 / 257 = 127.5
        ("low.png", lambda: Image.fromarray(np.full((8, 8), 257, np.uint16)), 1),  # not 255 (clipping would say so)
        ("big.tif", lambda: Image.frombytes("I;16B", (8, 8), np.full(64, 65535, ">u2").tobytes()), 255),
        ("i32.tif", lambda: Image.fromarray(np.full((8, 8), 32768, np.int32)), 128),
        ("f01.tif", lambda: Image.fromarray(np.full((8, 8), 1.0, np.float32)), 255),
        ("f255.tif", lambda: Image.fromarray(np.full((8, 8), 100.0, np.float32)), 100),
        ("one.png", lambda: Image.new("1", (8, 8), 1), 255),
    ],
)
def test_high_bit_depth_and_float_scaling(tmp_path, name, make, value):
    img = make()
    out = _one(tmp_path, name, _encoded(img, "PNG" if name.endswith("png") else "TIFF"))
    assert out.shape == (1, 8, 8) and out.dtype == torch.uint8
    assert (out == value).all(), (img.mode, out.unique())


@pytest.mark.parametrize("mode", ["I", "F"])
def test_out_of_range_values_are_stretched(tmp_path, mode):
    a = np.full((32, 32), -1000.0)
    a[:, 16:] = 100000.0
    a[0, 0] = np.nan if mode == "F" else a[0, 0]
    img = Image.fromarray(a.astype(np.float32 if mode == "F" else np.int32))
    out = _one(tmp_path, f"{mode}.tif", _encoded(img, "TIFF"))[0]
    assert (out[:, :2] <= 2).all() and (out[:, -2:] >= 253).all()  # Lanczos rings by a level or two at the edge


def test_alpha_is_composited_on_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :, 3] = 128  # half-transparent black
    a[:, 4:] = (255, 0, 0, 0)  # fully transparent red
    out = _one(tmp_path, "a.png", _encoded(Image.fromarray(a, "RGBA"), "PNG"), channels=3)
    assert (out[:, :, :3] - 127).abs().max() <= 1
    assert (out[:, :, 5:] == 255).all()


def test_palette_transparency(tmp_path):
    out = _one(tmp_path, "p.png", _encoded(_p_transparent(), "PNG", transparency=0), size=16)
    assert (out[:, :, :6] == 255).all()  # transparent index -> white
    assert (out[:, :, 10:].flatten(1).T == torch.tensor(BLUE, dtype=torch.uint8)).all()


def test_cmyk_and_animated_webp(tmp_path):
    out = _one(tmp_path, "c.tif", _encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF"))
    assert (out.flatten(1).T == torch.tensor(RED, dtype=torch.uint8)).all()
    payload = _animated("WEBP", lossless=True)
    assert Image.open(io.BytesIO(payload)).n_frames == 2
    out = _one(tmp_path, "anim.webp", payload)
    assert (out.flatten(1).T == torch.tensor(RED, dtype=torch.uint8)).all()


def test_exif_orientation_is_applied(tmp_path):
    # Stored top half white; orientation 6 turns it 90 degrees clockwise, so the white goes right.
    out = _one(tmp_path, "r.jpg", _exif_rotated_jpeg(), size=16, channels=1)[0].float()
    assert out[:, :5].mean() < 30 and out[:, -5:].mean() > 225


def test_channels_forced_and_auto(tmp_path):
    rgb = _encoded(Image.new("RGB", (8, 8), (200, 100, 50)), "PNG")
    assert _one(tmp_path, "c.png", rgb).shape == (3, 8, 8)
    gray_l = _one(tmp_path, "c.png", rgb, channels=1)
    assert gray_l.shape == (1, 8, 8) and (gray_l == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)).all()
    gray_rgb = _encoded(Image.new("RGB", (8, 8), (90, 90, 90)), "PNG")
    assert _one(tmp_path, "g.png", gray_rgb).shape == (1, 8, 8)  # colourless content counts as gray
    assert _one(tmp_path, "l.png", _encoded(Image.new("L", (8, 8), 9), "PNG"), channels=3).shape == (3, 8, 8)


def test_folder_channel_auto_detection(tmp_path):
    _write(tmp_path, "a.png", _encoded(Image.new("L", (8, 8), 10), "PNG"))
    _write(tmp_path, "b.png", _encoded(Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG"))
    _write(tmp_path, "c.tif", _encoded(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"))
    _write(tmp_path, "d.png", _encoded(Image.new("RGB", (8, 8), (70, 70, 70)), "PNG"))
    ds = D.load_folder(tmp_path, 8)
    assert ds.images.shape == (4, 1, 8, 8) and ds.summary.channels == 1
    assert ds.images[:, 0, 0, 0].tolist() == [10, 255, 128, 70]
    _write(tmp_path, "e.png", _encoded(Image.new("RGB", (8, 8), RED), "PNG"))
    ds = D.load_folder(tmp_path, 8)
    assert ds.images.shape == (5, 3, 8, 8) and ds.summary.channels == 3
    assert (ds.images[0] == 10).all()  # gray images fill all three planes
    assert D.load_folder(tmp_path, 8, channels=1).images.shape == (5, 1, 8, 8)


def test_resize_shorter_side_then_centre_crop(tmp_path):
    a = np.zeros((40, 120), np.uint8)
    a[:, 40:80] = 255  # the centred 40x40 square is white, the sides black
    out = _one(tmp_path, "w.png", _encoded(Image.fromarray(a), "PNG"), size=10)
    # As when resizing the whole strip to 30x10 and cropping: only the filter's reach at
    # the crop's edges sees the black sides (squashing would make three columns black).
    assert out.shape == (1, 10, 10) and (out[:, :, 1:-1] >= 250).all() and (out > 200).all()


def test_max_pixels_and_bomb_warning(tmp_path):
    with pytest.raises(D.ImageSkipped) as err:
        _one(tmp_path, "big.png", _encoded(Image.new("L", (100, 100)), "PNG"), max_pixels=5000)
    assert err.value.reason == "too large"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(D.ImageSkipped) as err:
            _one(tmp_path, "bomb.png", _png_header(10000, 10000))
    assert err.value.reason == "too large"


@pytest.mark.parametrize(
    ("reason", "payload"),
    [(reason, make()) for reason, files in BAD.items() for make in files.values()],
)
def test_decode_image_reasons(tmp_path, reason, payload):
    with pytest.raises(D.ImageSkipped) as err:
        _one(tmp_path, "x.png", payload)
    assert err.value.reason == reason and isinstance(err.value, DataError)


# --------------------------------------------------------------------------- order, names, errors


def test_order_is_deterministic_bytewise(tmp_path):
    names = ["b.png", "B.png", "a.png", "a/z.png", "a0.png", "Z/a.png", "é.png"]
    for i, name in enumerate(names):
        _write(tmp_path, name, _encoded(Image.new("L", (4, 4), 10 * (i + 1)), "PNG"))
    expected = sorted(names, key=lambda r: tuple(part.encode() for part in r.split("/")))
    ds = D.load_folder(tmp_path, 4)
    assert ds.images[:, 0, 0, 0].tolist() == [10 * (names.index(n) + 1) for n in expected]
    assert [p.relative_to(tmp_path).as_posix() for p in [Path(p) for p in D.list_files(tmp_path)[0]]] == expected


def test_non_utf8_file_names(tmp_path):
    root = os.fsencode(tmp_path)
    try:
        with open(os.path.join(root, b"caf\xe9.png"), "wb") as f:
            f.write(_encoded(Image.new("L", (4, 4), 5), "PNG"))
        with open(os.path.join(root, b"bad\xff.png"), "wb"):
            pass
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    ds = D.load_folder(tmp_path, 4)
    assert ds.summary.used == 1 and ds.summary.examples == {"empty": ("bad\\xff.png",)}
    for line in ds.summary.lines():
        line.encode("utf-8")  # printable: no lone surrogates
    json.dumps(ds.summary.to_dict()).encode("utf-8")


def test_single_image_file(tmp_path):
    _write(tmp_path, "one.png", _encoded(Image.new("RGB", (20, 10), RED), "PNG"))
    ds = D.load_folder(tmp_path / "one.png", 8)
    assert ds.images.shape == (1, 3, 8, 8) and ds.summary.found == 1
    _write(tmp_path, "broken.png", _encoded(_noise(), "PNG")[:3000])
    with pytest.raises(DataError, match="broken.png: corrupt or truncated"):
        D.load_folder(tmp_path / "broken.png", 8)
    _write(tmp_path, "notes.txt", b"x")
    with pytest.raises(DataError, match="neither a folder nor an image file"):
        D.load_folder(tmp_path / "notes.txt", 8)


def test_errors(tmp_path):
    with pytest.raises(DataError, match=r"^no such file or folder: .*nowhere$"):
        D.load_dataset(str(tmp_path / "nowhere"), 8, None)
    _write(tmp_path, "empty/readme.md", b"x")
    _write(tmp_path, "empty/.hidden.png", _encoded(_noise(), "PNG"))
    with pytest.raises(DataError) as err:
        D.load_folder(tmp_path / "empty", 8)
    msg = str(err.value)
    assert msg.startswith("no images found in ") and ".png .jpg .jpeg .webp .bmp .gif .tif .tiff" in msg
    assert "1 other file ignored" in msg
    _write(tmp_path, "bad/a.png", b"")
    _write(tmp_path, "bad/b.png", b"not an image")
    _write(tmp_path, "bad/c.jpg", b"")
    with pytest.raises(DataError) as err:
        D.load_folder(tmp_path / "bad", 8)
    msg = str(err.value)
    assert msg.startswith("none of the 3 images in ") and "could be decoded" in msg
    assert "2 empty (e.g. a.png, c.jpg)" in msg and "1 not an image (e.g. b.png)" in msg
    with pytest.raises(ConfigError):
        D.load_folder(tmp_path / "bad", 8, channels=2)
    with pytest.raises(ConfigError):
        D.load_folder(tmp_path / "bad", 0)


def test_load_dataset_folder_default_size(tmp_path):
    _write(tmp_path, "a.jpg", _encoded(_noise((48, 40)), "JPEG"))
    _write(tmp_path, "b.jpg", _encoded(_noise((40, 48)), "JPEG"))
    ds = D.load_dataset(tmp_path, None, None)  # two aspect ratios: the shorter side, 40, square
    assert ds.images.shape == (2, 3, 40, 40) and ds.labels is None and ds.summary.size_note == "the images' own size"
    (tmp_path / "b.jpg").unlink()
    ds = D.load_dataset(tmp_path, None, None)  # one aspect ratio: kept, 40 high and 48 wide
    assert ds.images.shape == (1, 3, 40, 48) and ds.summary.size_note == "the images' own size"
    assert ds.image_size == (40, 48)


# --------------------------------------------------------------------------- value ranges and flips


def test_model_range_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8)
    x = D.to_model_range(u8)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(D.from_model_range(x), u8)
    assert D.from_model_range(torch.tensor([-5.0, 0.0, 7.0])).tolist() == [0, 128, 255]  # clamped; 127.5 -> 128


# --------------------------------------------------------------------------- digits

# Printed by scripts/make_digits.py from scikit-learn 1.9.1's load_digits() when the file was generated.
DIGITS_SHA256 = "b41ca9fd335466eee997366c2e6f6bbe0a1b4582afe091fc4eba35f4a254182f"
DIGITS_LABEL_SUM = 8070


def test_digits_file():
    images, labels = D.load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == 0 and images.max() == 255
    levels = {(k * 255 + 8) // 16 for k in range(17)}
    assert set(images.unique().tolist()) <= levels
    counts = torch.bincount(labels, minlength=10)
    assert counts.numel() == 10 and (counts >= 170).all() and (counts <= 190).all()
    assert int(labels.sum()) == DIGITS_LABEL_SUM
    assert hashlib.sha256(images.numpy().tobytes()).hexdigest() == DIGITS_SHA256
    assert images[:, :, :, 0].float().mean() < images[:, :, :, 3:5].float().mean()  # white ink, centred


def test_digits_match_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    images, labels = D.load_digits()
    expected = (torch.from_numpy(bunch.images.astype(np.int64)) * 255 + 8) // 16
    assert torch.equal(images[:, 0].long(), expected)
    assert torch.equal(labels, torch.from_numpy(bunch.target.astype(np.int64)))


def test_builtin_digits_dataset():
    ds = D.load_dataset("builtin:digits", None, None)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.labels is not None
    assert ds.summary.source == "builtin:digits" and ds.summary.image_size == 8 and ds.summary.used == 1797
    assert ds.summary.lines() == []
    big = D.load_dataset("builtin:digits", 16, 3)
    assert big.images.shape == (1797, 3, 16, 16) and big.images.is_contiguous()
    assert torch.equal(big.images[:, 0], big.images[:, 2])
    # bicubic upsampling keeps the mean brightness (within rounding and clamping)
    assert abs(big.images.float().mean() - ds.images.float().mean()) < 3
    with pytest.raises(DataError, match=r"unknown built-in dataset builtin:nope \(available: builtin:digits\)"):
        D.load_dataset("builtin:nope", None, None)


# --------------------------------------------------------------------------- classes from sub-folders


def _img(seed: int) -> bytes:
    return _encoded(_noise((10, 10), seed), "PNG")


def test_classes_from_sub_folders_nested_and_sorted(tmp_path):
    files = ["zebra/a.png", "cat/x/y/deep.png", "cat/b.png", "dog/2024/c.png", "dog/d.png", "dog/e.png"]
    for i, rel in enumerate(files):
        _write(tmp_path, rel, _img(i))
    (tmp_path / "empty").mkdir()  # no images: not a class
    _write(tmp_path, "notes/readme.txt", b"text only: not a class either")
    _write(tmp_path, "dog/broken.png", b"\x89PNG\r\n\x1a\n garbage")  # skipped, so not counted
    ds = D.load_folder(tmp_path, 8)
    assert ds.classes == ("cat", "dog", "zebra")  # sorted names, stable ids
    # scan order: cat/b, cat/x/y/deep, dog/2024/c, dog/d, dog/e, zebra/a; nested files belong to their top folder
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert torch.bincount(ds.labels).tolist() == [2, 3, 1] and ds.notes == ()


def test_one_class_folder_or_loose_images_train_unconditionally_with_a_note(tmp_path):
    _write(tmp_path / "one", "only/a.png", _img(0))
    _write(tmp_path / "one", "only/deeper/b.png", _img(1))
    ds = D.load_folder(tmp_path / "one", 8)
    assert ds.labels is None and ds.classes == ()
    assert len(ds.notes) == 1 and "one sub-folder (only)" in ds.notes[0] and "unconditional" in ds.notes[0]
    for rel in ("a/x.png", "b/y.png", "loose.png"):
        _write(tmp_path / "mixed", rel, _img(2))
    ds = D.load_folder(tmp_path / "mixed", 8)
    assert ds.labels is None and "1 image directly in" in ds.notes[0]
    _write(tmp_path / "flat", "x.png", _img(3))
    ds = D.load_folder(tmp_path / "flat", 8)
    assert ds.labels is None and ds.notes == ()  # nothing to explain
    assert D.load_folder(tmp_path / "flat" / "x.png", 8).labels is None


def test_builtin_digits_are_labelled_by_digit():
    ds = D.load_dataset("builtin:digits")
    assert ds.classes == tuple("0123456789") and ds.labels.shape == (1797,)


def _folder(tmp_path, sizes):
    root = tmp_path / "imgs"
    root.mkdir(exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("L", (w, h), 128 + i % 50).save(root / f"{i:03d}.png")
    return root


@pytest.mark.parametrize(
    "sizes, want, note",
    [
        ([(16, 16)] * 5, 16, "own size"),
        ([(28, 28)] * 3 + [(64, 64)], 28, "own size"),  # the most common size wins
        ([(30, 40)] * 4, (44, 32), "40x30; 44x32 keeps their aspect ratio"),  # one aspect ratio: H x W, rounded
        ([(30, 40), (40, 30)] * 2, 32, "30 px rounded to 32"),  # mixed shapes: the shorter side, square
        ([(3, 3)] * 2, 8, "3 px rounded to 8"),  # tiny images: at least 8
        ([(1024, 768)] * 2, (MAX_AUTO_IMAGE_SIZE, 88), "capped"),  # huge images: a cap and how to change it
        ([(1024, 768), (1000, 1000)], MAX_AUTO_IMAGE_SIZE, "capped"),
        ([(16, 16), (20, 20), (20, 20), (16, 16)], 20, "own size"),  # a tie: the larger
    ],
)
def test_image_size_from_the_folder(tmp_path, sizes, want, note):
    root = _folder(tmp_path, sizes)
    size, why = infer_image_size(sorted(root.iterdir()))
    assert size == want and note in why
    if "capped" in why:
        assert "--image-size" in why
    ds = load_folder(root)  # no size given: the same choice, said in the summary
    assert ds.image_size == want and ds.summary.size_note == why and note in ds.summary.size_note


def test_given_size_wins_and_says_nothing(tmp_path):
    ds = load_folder(_folder(tmp_path, [(30, 30)] * 2), 12)
    assert ds.image_size == 12 and ds.summary.size_note == ""
