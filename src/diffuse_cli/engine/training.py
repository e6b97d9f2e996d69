"""The training loop: DDPM Algorithm 1 with AdamW, warmup, EMA, checkpoints, resume and torchrun/DDP.

Each step (Ho et al. 2020, Algorithm 1, the seed's summary):
    x0 ~ data, t ~ Uniform{0..T-1}, eps ~ N(0, I)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    gradient step on ||target - net(x_t, t)||^2      (target = eps, x0 or v)

Randomness. One generator (the "data generator", on the training device) draws,
for every step, the indices of the whole *global* batch, its t, its eps and its
flips; every rank draws the same numbers and keeps its own slice. So a run on N
processes sees exactly the batches of a single-process run, and a run can resume
on a different number of processes. Dropout uses torch's global RNG. Both RNG
states are saved in the training state, which makes resume bit-exact on CPU.

Batch size is **global**: ``--batch-size 128`` on 4 GPUs is 32 images per GPU.

The engine never prints: progress goes to ``callback(event: dict)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .data import to_model_range
from .datacache import place_images
from .diffusion import WEIGHTINGS, Diffusion, DiffusionConfig
from .errors import ConfigError, Interrupted, OutputError, TrainingDiverged
from .fileio import atomic_write_text, ensure_dir, remove_stale_temporaries

Callback = Callable[[dict], None]
RUN_FILES = ("config.json", "log.jsonl", ckpt.MODEL_FILE, ckpt.STATE_DIR, "samples")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000  # enough for recognisable samples on small data sets
    batch_size: int = 64  # global, over all processes
    lr: float = 2e-4  # DDPM's CIFAR-10 learning rate
    warmup: int = 200  # linear LR warmup steps (DDPM used 5000 on 800k steps)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # DDPM clipped the gradient norm at 1
    ema_decay: float = 0.999  # short runs need a shorter EMA than DDPM's 0.9999
    loss_weighting: str = "uniform"  # the seed's plain MSE; "min-snr" = Hang et al. 2023
    hflip: bool = False  # random horizontal flips (off for digits: a mirrored 2 is not a 2)
    save_every: int = 1000
    sample_every: int = 1000
    keep: int = 3  # periodic training states kept on disk
    log_every: int = 25  # host syncs happen only here
    num_preview: int = 16
    preview_steps: int = 50
    seed: int = 0
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number (got {self.lr})"),
            (self.warmup >= 0, f"--warmup must be >= 0 (got {self.warmup})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0 (got {self.grad_clip})"),
            (0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1) (got {self.ema_decay})"),
            (self.loss_weighting in WEIGHTINGS, f"--loss-weighting must be one of {', '.join(WEIGHTINGS)}"),
            (self.save_every >= 1, f"--save-every must be at least 1 (got {self.save_every})"),
            (self.sample_every >= 0, f"--sample-every must be >= 0 (got {self.sample_every})"),
            (self.keep >= 1, f"--keep must be at least 1 (got {self.keep})"),
            (self.log_every >= 1, f"log interval must be at least 1 (got {self.log_every})"),
            (self.precision in ("auto", "fp32", "bf16"), f"--precision must be auto, fp32 or bf16 (got {self.precision})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --- devices and processes ---------------------------------------------------------------
def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU. Asking for a missing backend is a ConfigError."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu or auto")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ConfigError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        raise ConfigError(f"bf16 is not supported on {device}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class Dist:
    """This process's place in a torchrun job (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank (a collective: call it on all ranks)."""
        if not self.enabled:
            return flag
        x = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return bool(x.item() > 0)

    def main_only(self, fn: Callable[[], None], device: torch.device) -> None:
        """Run ``fn`` on rank 0 only; if it fails there, every rank raises (a collective: call it on all ranks).

        Without the agreement the other ranks would wait for rank 0 in their next collective
        until torchrun killed them.
        """
        err: Exception | None = None
        if self.is_main:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised below once every rank knows
                err = e
        if self.any(err is not None, device):
            if err is not None:
                raise err
            raise OutputError("stopped because rank 0 failed (its error is reported above)")

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Set up the process group from torchrun's environment (NCCL on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    here = False
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
        here = True
    return Dist(rank, world, local_rank, here), device


# --- EMA ----------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's parameters (Polyak averaging), with warmup.

    decay_k = min(decay, (1 + k) / (10 + k)) so early averages are not dominated by the
    random initialisation (as in TensorFlow's ExponentialMovingAverage num_updates).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = _clone_module(model)
        self.model.requires_grad_(False).eval()

    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            ema_p = [p for p in self.model.parameters()]
            cur_p = [p.detach() for p in model.parameters()]
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - d)
            for eb, mb in zip(self.model.buffers(), model.buffers(), strict=True):
                eb.copy_(mb)


def _clone_module(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then constant (DDPM's schedule)."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr


# --- state (de)serialisation ------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
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


def _match_param_layouts(opt: torch.optim.Optimizer) -> None:
    """Give loaded moment buffers their parameter's strides.

    safetensors stores tensors contiguous (NCHW); a channels_last parameter needs
    channels_last moments, or fused/foreach kernels that walk raw storage would pair
    the wrong elements (and resume would not be bit-exact).
    """
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _rng_bytes(state: torch.Tensor) -> torch.Tensor:
    return state.detach().to("cpu", torch.uint8).clone()


# --- the run ------------------------------------------------------------------------------
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


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; clear our own files with ``overwrite``."""
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


def newest_state(out: Path) -> ckpt.Checkpoint:
    """The newest training state that loads; damaged newer ones are skipped (a crash can't leave one,
    but a disk can)."""
    errors = []
    for p in reversed(ckpt.list_states(out)):
        try:
            return ckpt.load(p, expect_kind="state")
        except Exception as err:  # noqa: BLE001 - we report every failure below
            errors.append(f"{p.name}: {err}")
    raise OutputError(f"no loadable training state in {out / ckpt.STATE_DIR} ({'; '.join(errors) or 'none found'})")


def _truncate_log(path: Path, step: int) -> None:
    """Cut the log back to the resumed ``step``: after a kill it can run past the newest state (and end
    in a torn line), and the resumed run would log those steps again."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return
    except OSError as err:
        from .fileio import describe_os_error

        raise OutputError(describe_os_error(err, path)) from err
    keep = []
    for line in lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in keep))


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so it can save before exiting."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            # Except under torchrun: a terminal's Ctrl-C can reach a worker twice (directly, and
            # forwarded by the agent), and the agent itself kills workers that outlive its timeout.
            if "TORCHELASTIC_RUN_ID" in os.environ:
                return
            if callable(self._old.get(signum)):  # what the signal did before us (the CLI's SIGTERM -> exit 143)
                self._old[signum](signum, frame)
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(
    data,  # data.ImageDataset
    out_dir: str | os.PathLike,
    model_config,  # unet.UNetConfig
    diffusion_config: DiffusionConfig,
    config: TrainConfig,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
) -> dict:
    """Train a U-Net on ``data``; write checkpoints, previews and logs into ``out_dir``.

    Returns a summary dict (paths, final step, last loss). Raises DiffuseError subclasses
    for user-facing problems; ``Interrupted`` after saving on Ctrl-C/SIGTERM.
    """
    from . import perf
    from .unet import UNet, UNetConfig

    emit = callback or (lambda e: None)
    dist, dev = init_distributed(device)
    perf.enable_tf32(dev)
    out = Path(out_dir)
    paths = RunPaths(out)

    def prepare() -> None:
        prepare_out_dir(out, resume=resume, overwrite=overwrite)
        remove_stale_temporaries(out)
        remove_stale_temporaries(out / ckpt.STATE_DIR)
        remove_stale_temporaries(paths.samples)  # a preview being written when the process was killed

    try:
        dist.main_only(prepare, dev)

        state = None
        if resume:
            state = newest_state(out)
            model_config = UNetConfig.from_dict(state.model)
            diffusion_config = DiffusionConfig.from_dict(state.diffusion)
            # Training options given now override the stored ones (e.g. a larger --steps).
        if model_config.image_size != data.images.shape[-1] or model_config.in_channels != data.images.shape[1]:
            raise ConfigError(
                f"the data are {data.images.shape[1]}x{data.images.shape[-1]}x{data.images.shape[-1]} "
                f"but the model expects {model_config.in_channels}x{model_config.image_size}x{model_config.image_size}"
            )
        if config.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} (global) must be divisible by the {dist.world_size} processes")
        local_bs = config.batch_size // dist.world_size

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        diffusion = Diffusion(diffusion_config).to(dev)
        model = UNet(model_config).to(dev)
        torch.manual_seed(config.seed + dist.rank)  # dropout masks differ between ranks
        model = perf.optimize_for_device(model, dev)
        opt = perf.make_optimizer(model.parameters(), lr=config.lr, device=dev, weight_decay=config.weight_decay)
        ema = EMA(model, config.ema_decay)
        gen = torch.Generator(device=dev)
        gen.manual_seed(config.seed)
        start_step = 0
        if state is not None:
            ckpt.load_weights_into(model, ckpt.prefixed(state.tensors, "model."), state.path)
            ckpt.load_weights_into(ema.model, ckpt.prefixed(state.tensors, "ema."), state.path)
            opt.load_state_dict(_optimizer_state_dict(state.tensors, state.extra["optimizer"]))
            _match_param_layouts(opt)
            gen.set_state(state.tensors["rng.data"].to("cpu"))
            torch.set_rng_state(state.tensors["rng.torch"].to("cpu"))
            if dev.type == "cuda" and "rng.cuda" in state.tensors:
                torch.cuda.set_rng_state(state.tensors["rng.cuda"].to("cpu"), dev)
            if dist.rank:  # the saved dropout RNG is rank 0's; the others derive their own streams from it
                torch.manual_seed(int(torch.randint(0, 2**62, ())) + dist.rank)
            start_step = state.step
            dist.main_only(functools.partial(_truncate_log, paths.log, start_step), dev)
        if start_step >= config.steps:
            raise ConfigError(f"the run in {out} is already at step {start_step}; pass a larger --steps to continue")

        net: torch.nn.Module = model
        if dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        fwd = net
        if config.compile:  # compile the DDP wrapper, not the bare model, so DDP can overlap its all-reduces
            fwd, why = perf.compile_model(net, dev)
            if dist.any(why is not None, dev):
                fwd = net
                emit({"event": "warning", "message": f"--compile does not work on {dev} here "
                      f"({why or 'it failed on another rank'}); training without it"})
        amp = autocast_dtype(config.precision, dev)
        images = place_images(data, dev)  # uint8 on the device when it fits, else read per batch (datacache.py)
        n_images = images.shape[0]
        meta = dict(
            model=model_config.to_dict(),
            diffusion=diffusion_config.to_dict(),
            train=config.to_dict(),
            dataset=data.summary.to_dict(),
        )
        if dist.is_main:
            atomic_write_text(paths.config, json.dumps({**meta, "world_size": dist.world_size}, indent=2) + "\n")
        emit({
            "event": "start", "step": start_step, "steps": config.steps, "device": str(dev),
            "precision": str(amp).replace("torch.", "") if amp else "fp32", "world_size": dist.world_size,
            "parameters": sum(p.numel() for p in model.parameters()), "resumed": state is not None,
            "images": n_images, "local_batch": local_bs, "is_main": dist.is_main, "data": images.where,
        })

        def save(step: int) -> None:
            """Rank 0 writes the training state and the EMA model; every rank waits for it."""

            def write() -> None:
                opt_tensors, opt_extra = _optimizer_tensors(opt)
                tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
                tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
                tensors.update(opt_tensors)
                tensors["rng.data"] = _rng_bytes(gen.get_state())
                tensors["rng.torch"] = _rng_bytes(torch.get_rng_state())
                if dev.type == "cuda":
                    tensors["rng.cuda"] = _rng_bytes(torch.cuda.get_rng_state(dev))
                sp = ckpt.save(ckpt.state_path(out, step), tensors, kind="state", step=step,
                               extra={"optimizer": opt_extra}, **meta)
                ckpt.save(paths.model, ema.model.state_dict(), kind="model", step=step, **meta)
                for old in ckpt.list_states(out)[: -config.keep]:
                    with contextlib.suppress(OSError):
                        old.unlink()
                emit({"event": "save", "step": step, "path": str(sp), "model": str(paths.model)})

            dist.main_only(write, dev)

        def preview(step: int) -> None:
            if not dist.is_main or config.num_preview <= 0:
                return
            from . import images as img
            from . import samplers

            pgen = torch.Generator(device=dev).manual_seed(config.seed + 12345)  # same noise every preview
            c, s = model_config.in_channels, model_config.image_size
            x_T = torch.randn((config.num_preview, c, s, s), generator=pgen, device=dev)
            with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                x0 = samplers.sample(ema_call, diffusion, x_T, sampler=samplers.DEFAULT_SAMPLER,
                                     steps=min(config.preview_steps, diffusion.num_timesteps), generator=pgen,
                                     clip_x0=True)
            p = paths.samples / f"step-{step:06d}.png"
            grid = img.make_grid(x0.float().cpu(), nrow=int(math.ceil(math.sqrt(config.num_preview))))
            img.save_image(img.upscale(grid, 256), p)
            emit({"event": "preview", "step": step, "path": str(p)})

        def ema_call(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return ema.model(x_t, t)

        def log_line(rec: dict) -> None:
            if dist.is_main:
                try:
                    with open(paths.log, "a", encoding="utf-8") as f:
                        f.write(json.dumps(rec) + "\n")
                except OSError as err:
                    from .fileio import describe_os_error

                    raise OutputError(describe_os_error(err, paths.log)) from err

        loss_sum = torch.zeros((), device=dev)
        loss_count = 0
        last_loss = float("nan")
        last_saved = start_step
        t0 = time.perf_counter()
        t_log = t0
        data_s = 0.0  # host time spent fetching batches since the last log line
        step = start_step
        model.train()
        with _StopFlag() as stop:
            while step < config.steps:
                # --- one global batch, this rank's slice ---------------------------------
                idx = torch.randint(0, n_images, (config.batch_size,), generator=gen, device=dev)
                t = torch.randint(0, diffusion.num_timesteps, (config.batch_size,), generator=gen, device=dev)
                shape = (config.batch_size, *images.shape[1:])
                eps = torch.randn(shape, generator=gen, device=dev)
                flip = torch.rand((config.batch_size,), generator=gen, device=dev) < 0.5 if config.hflip else None
                sl = slice(dist.rank * local_bs, (dist.rank + 1) * local_bs)
                t_data = time.perf_counter()
                x0 = to_model_range(images[idx[sl]])
                if flip is not None:
                    x0 = torch.where(flip[sl, None, None, None], x0.flip(-1), x0)
                x0 = x0.contiguous(memory_format=perf.memory_format(dev))
                data_s += time.perf_counter() - t_data
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, config)
                with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                    losses = diffusion.training_losses(fwd, x0, t=t[sl], eps=eps[sl],
                                                       weighting=config.loss_weighting)
                loss = losses.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
                opt.step()
                ema.update(model, step)
                loss_sum += loss.detach()
                loss_count += 1
                step += 1

                want_log = step % config.log_every == 0 or step == config.steps
                want_save = step % config.save_every == 0 or step == config.steps
                if want_log or want_save:
                    mean_loss = loss_sum / max(loss_count, 1)
                    if dist.enabled:
                        torch.distributed.all_reduce(mean_loss)
                        mean_loss = mean_loss / dist.world_size
                    last_loss = float(mean_loss)  # the only host sync of the loop
                    if not math.isfinite(last_loss):
                        raise TrainingDiverged(
                            f"the loss became {last_loss} near step {step}; stopped without saving, the last good "
                            f"checkpoint (step {last_saved}) is kept; try a lower --lr or --grad-clip 1"
                        )
                    now = time.perf_counter()
                    rec = {"step": step, "loss": last_loss, "lr": lr_at(step - 1, config),
                           "img_per_s": loss_count * config.batch_size / max(now - t_log, 1e-9),
                           "elapsed": now - t0, "data_ms": 1e3 * data_s / loss_count,
                           "step_ms": 1e3 * (now - t_log) / loss_count}
                    dist.main_only(functools.partial(log_line, rec), dev)
                    emit({"event": "log", **rec})
                    loss_sum.zero_()
                    loss_count = 0
                    t_log = now
                    data_s = 0.0
                if want_save:
                    save(step)
                    last_saved = step
                if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
                    dist.main_only(functools.partial(preview, step), dev)
                # Stop requests are agreed on by all ranks so no one waits in a collective alone.
                check = not dist.enabled or want_log
                if check and dist.any(stop.signal is not None, dev):
                    if step > last_saved:
                        save(step)
                        last_saved = step
                    name = "Ctrl-C" if stop.signal in (None, signal.SIGINT) else "SIGTERM"
                    raise Interrupted(f"stopped by {name} at step {step}; the state is saved in {out} — "
                                      f"continue with the same command plus --resume", signum=stop.signal or signal.SIGINT)
                emit({"event": "step", "step": step})
        if os.environ.get("DIFFUSE_DEBUG_DUMP_RANKS"):  # tests: every rank's final weights, to compare ranks
            from safetensors.torch import save_file

            sd = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                  **{f"ema.{k}": v for k, v in ema.model.state_dict().items()}}
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()},
                      str(Path(os.environ["DIFFUSE_DEBUG_DUMP_RANKS"]) / f"rank{dist.rank}.safetensors"))
        return {"out": str(out), "model": str(paths.model), "step": step, "loss": last_loss,
                "samples": str(paths.samples), "elapsed": time.perf_counter() - t0, "is_main": dist.is_main}
    finally:
        dist.close()
