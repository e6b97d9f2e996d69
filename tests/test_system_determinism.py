"""Determinism, system test: the same seed on the CPU gives the same bytes: weights, states and PNGs, in one
process, across processes, and from the same checkpoint."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from helpers import TINY_DIGITS as TINY
from helpers import diffuse, invoke


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
        if p.is_file() and p.name not in ("log.jsonl", "report.png")
    )  # the log and the report picture hold timings (img/s, loss against time)
    assert len(files) >= 12
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
