"""Checkpoints: safetensors only, self-describing, written atomically.

A checkpoint is a safetensors file whose string metadata carries, as JSON:

    diffuse.format   "1"
    diffuse.kind     "model" (EMA weights for sampling) or "state" (everything to resume training)
    model            UNetConfig          diffusion  DiffusionConfig
    train            TrainConfig         dataset    DataSummary (+ "classes": names, for class-conditional models)
    step             int                 extra      kind-specific JSON (optimizer groups, ...)

Loading never unpickles: a ``.pt``/``.ckpt`` file (zip or pickle) is refused with the reason.
``diffuse.crc32`` (CRC-32 of every tensor's name, dtype, shape and bytes) lets loading refuse a
file whose tensor data a disk or a copy damaged; files without it are loaded unchecked.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .fileio import atomic_path

FORMAT_VERSION = "1"
MODEL_FILE = "model.safetensors"
STATE_DIR = "checkpoints"
STATE_PATTERN = "state-*.safetensors"
# A safetensors header is 8 bytes of little-endian length followed by that much JSON.
MAX_HEADER = 100 * 1024 * 1024
CHECKPOINT_KINDS = ("model", "state")


@dataclass
class Checkpoint:
    """What a checkpoint file holds, parsed."""

    path: Path
    kind: str
    tensors: dict[str, torch.Tensor]
    model: dict
    diffusion: dict
    train: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    step: int = 0
    extra: dict = field(default_factory=dict)


def state_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / STATE_DIR / f"state-{step:08d}.safetensors"


def list_states(out_dir: Path) -> list[Path]:
    """Training-state files of a run folder, oldest first (by step in the name)."""
    folder = Path(out_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    return sorted(folder.glob(STATE_PATTERN))


def _crc32(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 over each tensor's name, dtype, shape and raw bytes, in name order (hex)."""
    crc = 0
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        crc = zlib.crc32(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def save(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    model: dict,
    diffusion: dict,
    train: dict | None = None,
    dataset: dict | None = None,
    step: int = 0,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file, fsync, rename). Returns the path."""
    meta = {
        "diffuse.format": FORMAT_VERSION,
        "diffuse.kind": kind,
        "model": json.dumps(model),
        "diffusion": json.dumps(diffusion),
        "train": json.dumps(train or {}),
        "dataset": json.dumps(dataset or {}),
        "step": str(int(step)),
        "extra": json.dumps(extra or {}),
    }
    # safetensors wants contiguous CPU tensors that do not share memory.
    flat = {
        k: v.detach().to("cpu").contiguous().clone() if v.is_cuda or not v.is_contiguous() else v.detach().contiguous()
        for k, v in tensors.items()
    }
    meta["diffuse.crc32"] = _crc32(flat)
    path = Path(path)
    write_safetensors(path, flat, meta, canonical=True)
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict, *, canonical: bool = False) -> None:
    """``save_file`` into a temporary file that replaces ``path`` only when complete (:func:`atomic_path`);
    safetensors' own I/O errors (a full disk...) become OSErrors, which ``atomic_path`` words for a person."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:  # not an OSError: make it one
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
        if canonical:
            _canonical_header(tmp)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header in place with its keys sorted (same length, space-padded).

    safetensors writes the metadata from a hash map whose order changes from run to run; with a
    fixed order the same weights and metadata are the same bytes, so runs can be compared by hash.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # always, as the content is the same; otherwise keep safetensors' own order
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def sniff(path: Path) -> None:
    """Refuse pickles and obviously broken files before safetensors parses them."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as err:
        raise CheckpointError(f"no such checkpoint: {path}") from err
    except IsADirectoryError as err:
        raise CheckpointError(f"{path} is a folder without {MODEL_FILE}") from err
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    pickle_hint = (
        "it looks like a PyTorch pickle ({}); diffuse loads only .safetensors checkpoints because "
        "unpickling a file can run arbitrary code, so it was not opened"
    )
    if head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"refusing {path}: " + pickle_hint.format("zip archive, as written by torch.save"))
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        raise CheckpointError(f"refusing {path}: " + pickle_hint.format("raw pickle"))
    if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"):
        raise CheckpointError(
            f"refusing {path}: {path.suffix} files are usually PyTorch pickles; diffuse loads only .safetensors "
            "checkpoints because unpickling can run arbitrary code"
        )
    if size < 8:
        raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path} is corrupt or truncated (its safetensors header length does not fit the file)")


def load(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", expect_kind: str | None = None, tensors: bool = True
) -> Checkpoint:
    """Read and validate a diffuse checkpoint. A run folder means its ``model.safetensors``.

    ``tensors=False`` reads the metadata only (configs, step): cheap, and the tensor checksum is
    then not verified.
    """
    read_tensors = tensors
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        if expect_kind == "state":
            raise CheckpointError(f"{path} is a folder; expected a state file")
        path = path / MODEL_FILE
        if not path.exists():
            raise CheckpointError(f"{path.parent} has no {MODEL_FILE} (is it a diffuse run folder?)")
    sniff(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("diffuse.format") is None:
                raise CheckpointError(
                    f"{path} is a safetensors file but not a diffuse checkpoint (no diffuse metadata; "
                    "was it written by another program?)"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}  # noqa: SIM118
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt data
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is corrupt or truncated: {msg}") from err
    if meta["diffuse.format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {meta['diffuse.format']!r}; this diffuse reads {FORMAT_VERSION!r}"
        )
    try:
        ck = Checkpoint(
            path=path,
            kind=meta.get("diffuse.kind", "model"),
            tensors=tensors,
            model=json.loads(meta["model"]),
            diffusion=json.loads(meta["diffusion"]),
            train=json.loads(meta.get("train", "{}")),
            dataset=json.loads(meta.get("dataset", "{}")),
            step=int(meta.get("step", "0")),
            extra=json.loads(meta.get("extra", "{}")),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} has damaged diffuse metadata ({type(err).__name__}: {err})") from err
    for name in ("model", "diffusion", "train", "dataset", "extra"):
        if not isinstance(getattr(ck, name), dict):
            raise CheckpointError(f"{path} has damaged diffuse metadata ({name!r} is not a JSON object)")
    if ck.kind not in CHECKPOINT_KINDS:
        raise CheckpointError(f"{path} has damaged diffuse metadata (unknown checkpoint kind {ck.kind!r})")
    if read_tensors and "diffuse.crc32" in meta and meta["diffuse.crc32"] != _crc32(tensors):
        raise CheckpointError(
            f"{path} is corrupt: its tensor data does not match the checksum stored with it "
            "(damaged on disk or in a copy)"
        )
    if expect_kind and ck.kind != expect_kind:
        raise CheckpointError(f"{path} is a {ck.kind!r} checkpoint; expected {expect_kind!r}")
    return ck


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_weights_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` that explains a mismatch in one line instead of a traceback."""
    check_weights(module.state_dict(), weights, path)
    module.load_state_dict(weights, strict=True)


def check_weights(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], path: Path) -> None:
    """Raise CheckpointError unless ``weights`` has exactly the names and shapes of ``own``, all finite."""
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise CheckpointError(f"weights in {path} do not match its model config: " + "; ".join(parts))
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"weights in {path} contain NaN or infinity (e.g. {bad}); the checkpoint is damaged")
