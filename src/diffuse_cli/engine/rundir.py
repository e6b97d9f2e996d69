"""The run folder: its files, the occupied-folder policy, and training states in and out.

A run folder holds ``model.safetensors`` (EMA weights + configs: all ``diffuse sample``
needs), ``checkpoints/state-*.safetensors`` (everything to resume), ``samples/`` (preview
grids), ``log.jsonl`` and ``config.json``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .adamw import AdamW
from .errors import ConfigError, OutputError
from .fileio import atomic_write_text, describe_os_error, ensure_dir, remove_stale_temporaries

RUN_FILES = ("config.json", "log.jsonl", ckpt.MODEL_FILE, ckpt.STATE_DIR, "samples", "best.safetensors", "report.png")


@dataclass
class RunPaths:
    out: Path

    @property
    def model(self) -> Path:
        return self.out / ckpt.MODEL_FILE

    @property
    def config(self) -> Path:
        return self.out / "config.json"

    @property
    def log(self) -> Path:
        return self.out / "log.jsonl"

    @property
    def samples(self) -> Path:
        return self.out / "samples"

    @property
    def best(self) -> Path:
        """The EMA model at the step with the lowest in-training Frechet distance (engine/monitor.py)."""
        return self.out / "best.safetensors"

    @property
    def report(self) -> Path:
        """The training report picture (engine/report.py), redrawn at each save."""
        return self.out / "report.png"


def check_mode(resume: bool, overwrite: bool) -> None:
    """--resume continues a run, --overwrite starts it over: both at once is a contradiction."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite starts it over; pass only one of them")


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; clear our own files with ``overwrite``."""
    check_mode(resume, overwrite)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    occupied = out.is_dir() and any(out.iterdir())
    if resume:
        if not ckpt.list_states(out):
            raise OutputError(f"nothing to resume in {out}: no training state in {out / ckpt.STATE_DIR}")
        return
    if occupied and not overwrite:
        what = "holds another run" if (out / "config.json").exists() else "is not empty"
        raise OutputError(f"--out {out} {what}; pass --resume to continue it or --overwrite to start over")
    if occupied and overwrite:
        for name in RUN_FILES:
            p = out / name
            try:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            except OSError as err:
                raise OutputError(f"cannot clear {p}: {err.strerror or err}") from err
    ensure_dir(out)


def newest_state(out: Path, tensors: bool = True) -> ckpt.Checkpoint:
    """The newest training state that loads; damaged newer ones are skipped (a crash can't leave one,
    but a disk can). ``tensors=False`` reads its metadata only (the stored configs)."""
    errors = []
    for p in reversed(ckpt.list_states(out)):
        try:
            return ckpt.load(p, expect_kind="state", tensors=tensors)
        except Exception as err:  # noqa: BLE001 - we report every failure below
            errors.append(f"{p.name}: {err}")
    raise OutputError(f"no loadable training state in {out / ckpt.STATE_DIR} ({'; '.join(errors) or 'none found'})")


def truncate_log(path: Path, step: int) -> None:
    """Cut the log back to the resumed ``step``: after a kill it can run past the newest state (and end
    in a torn line), and the resumed run would log those steps again."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return
    except OSError as err:
        raise OutputError(describe_os_error(err, path)) from err
    keep = []
    for line in lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _optimizer_tensors(opt: AdamW) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{name}"] = val
            else:
                scalars.setdefault(str(idx), {})[name] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], extra: dict) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in extra.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = extra["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _rng_bytes(state: torch.Tensor) -> torch.Tensor:
    return state.detach().to("cpu", torch.uint8).clone()


def default_out(data_spec: str) -> Path:
    """runs/<data name>: runs/digits for builtin:digits, runs/faces for ~/pictures/faces."""
    name = data_spec.split(":", 1)[1] if data_spec.startswith("builtin:") else (Path(data_spec).name or "run")
    return Path("runs") / name


def clean_stale(out: Path) -> None:
    """Remove temporaries a killed process left behind (a state or preview being written)."""
    for folder in (out, out / ckpt.STATE_DIR, RunPaths(out).samples):
        remove_stale_temporaries(folder)


def state_tensors(
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    opt: AdamW,
    gen: torch.Generator,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Everything a resumed run needs, as safetensors-ready tensors plus the optimizer's JSON extras."""
    opt_tensors, opt_extra = _optimizer_tensors(opt)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema_model.state_dict().items()})
    tensors.update(opt_tensors)
    tensors["rng.data"] = _rng_bytes(gen.get_state())
    tensors["rng.torch"] = _rng_bytes(torch.get_rng_state())
    if device.type == "cuda":
        tensors["rng.cuda"] = _rng_bytes(torch.cuda.get_rng_state(device))
    return tensors, {"optimizer": opt_extra}


def restore_state(
    state: ckpt.Checkpoint,
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    opt: AdamW,
    gen: torch.Generator,
    device: torch.device,
    rank: int,
) -> None:
    """Load a training state written by :func:`state_tensors` into the live objects."""
    ckpt.load_weights_into(model, ckpt.prefixed(state.tensors, "model."), state.path)
    ckpt.load_weights_into(ema_model, ckpt.prefixed(state.tensors, "ema."), state.path)
    opt.load_state_dict(_optimizer_state_dict(state.tensors, state.extra["optimizer"]))
    gen.set_state(state.tensors["rng.data"].to("cpu"))
    torch.set_rng_state(state.tensors["rng.torch"].to("cpu"))
    if device.type == "cuda" and "rng.cuda" in state.tensors:
        torch.cuda.set_rng_state(state.tensors["rng.cuda"].to("cpu"), device)
    if rank:  # the saved dropout RNG is rank 0's; the others derive their own streams from it
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + rank)


def drop_old_states(out: Path, keep: int) -> None:
    for old in ckpt.list_states(out)[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()


_NUMBERED_PNG = re.compile(r"\d{4,}(-[\w.-]+)?\.png")  # 0007.png, 0012-7.png (with --class)


def prepare_sample_dir(out: Path, overwrite: bool) -> None:
    """A folder for ``diffuse sample``'s 0000.png, 0001.png ...: images of an earlier run there would mix
    with the new ones (a run of 4 into a folder of 64 replaces 4 and leaves 60), so they are refused
    unless ``overwrite``, which removes them all first."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    old = sorted(p for p in out.iterdir() if _NUMBERED_PNG.fullmatch(p.name)) if out.is_dir() else []
    if old and not overwrite:
        raise OutputError(
            f"--out {out} already holds {len(old)} generated images ({old[0].name} ...); "
            "pass --overwrite to replace them or choose another --out"
        )
    for p in old:
        try:
            p.unlink()
        except OSError as err:
            raise OutputError(describe_os_error(err, p)) from err
    ensure_dir(out)
