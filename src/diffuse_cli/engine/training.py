"""The training loop: DDPM Algorithm 1 with AdamW, warmup, EMA, checkpoints, resume and torchrun/DDP.

``train()`` reads top to bottom: set up the processes and the run folder, build (or resume)
the step, then repeat it, logging, saving and previewing at fixed intervals. The step itself
(batch, q_sample, loss, backward, optimizer, EMA) lives in :mod:`step`; the run folder in
:mod:`rundir`; devices and processes in :mod:`device` and :mod:`distributed`.

Batch size is **global**: ``--batch-size 128`` on 4 GPUs is 32 images per GPU. Both RNG
states (the data generator and torch's, for dropout) are saved in the training state, which
makes resume bit-exact on CPU. The engine never prints: progress goes to
``callback(event: dict)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import device as devices
from . import rundir
from .budget import training_precision, worth_measuring
from .config import DEFAULT_GUIDANCE, DiffusionConfig, TrainConfig
from .data.placement import place_images
from .distributed import StopFlag, init_distributed
from .errors import ConfigError, Interrupted, TrainingDiverged
from .fileio import append_jsonl, atomic_write_text
from .monitor import Monitor, doubling_due, eval_due, read_history, stats_location
from .step import TrainStep, lr_at, make_train_step
from .unet import count_parameters

Callback = Callable[[dict], None]
_clock = time.perf_counter  # the loop's clock; tests replace it to check --time without waiting
FIRST_PREVIEW = 100  # previews at 100, 200, 400, ... steps until sample_every: early feedback on a CPU

__all__ = ["train"]


def preview_due(step: int, every: int, done: bool = False) -> bool:
    """Every ``every`` steps, and before that at 100, 200, 400, ... steps (``every`` = 0: never); and at the end
    (``done``) of a run of 100 steps or more: a shorter run's samples are still noise, and a 16-image preview
    would cost a 1-step run most of its time."""
    return bool(every) and (doubling_due(step, every, FIRST_PREVIEW) or (done and step >= FIRST_PREVIEW))


def _follow_load(ts: TrainStep, step: int, emit: Callback) -> None:
    """Re-check the CPU threads against the machine's load (now and then, see device.ThreadPolicy); say so on a change."""
    if (n := ts.threads.update()) is not None:
        emit({"event": "threads", "step": step, "threads": n})


def _save(ts: TrainStep, out: Path, step: int, meta: dict, keep: int, emit: Callback) -> None:
    """Write the training state and the EMA model (rank 0 only; see ``Dist.main_only``)."""
    tensors, extra = rundir.state_tensors(ts.model, ts.ema.model, ts.opt, ts.gen, ts.device)
    if ts.importance is not None:
        tensors.update(ts.importance.state_tensors())
    sp = ckpt.save(ckpt.state_path(out, step), tensors, kind="state", step=step, extra=extra, **meta)
    model_path = rundir.RunPaths(out).model
    ckpt.save(model_path, ts.ema.model.state_dict(), kind="model", step=step, **meta)
    rundir.drop_old_states(out, keep)
    emit({"event": "save", "step": step, "path": str(sp), "model": str(model_path)})


def _preview(ts: TrainStep, out: Path, step: int, config: TrainConfig, emit: Callback) -> None:
    """A grid of EMA samples, the same seeds every time so previews show progress, not luck."""
    from . import images as img
    from .generate import generate

    k = ts.model.config.num_classes
    nrow = math.ceil(math.sqrt(config.num_preview))
    # A conditional model previews its classes in turn, guided as `diffuse sample --class` is by default.
    classes = torch.arange(config.num_preview) % k if k else None
    x0 = generate(
        ts.ema.model,
        ts.diffusion,
        config.num_preview,
        tuple(ts.images.shape[1:]),
        steps=min(config.preview_steps, ts.diffusion.num_timesteps),
        seed=config.seed,
        batch_size=config.num_preview,
        device=ts.device,
        amp=ts.amp,
        clip_x0=True,
        classes=classes,
        guidance=DEFAULT_GUIDANCE,
    )
    p = rundir.RunPaths(out).samples / f"step-{step:06d}.png"
    img.save_image(img.upscale(img.make_grid(x0, nrow=nrow), 256), p)
    emit({"event": "preview", "step": step, "path": str(p)})


def _make_monitor(data, ts: TrainStep, config: TrainConfig, out: Path):
    """The in-training evaluation (rank 0 only), with this run's earlier records on resume."""
    store, key = stats_location(data)
    return Monitor(data.images, samples=config.eval_samples, seed=config.seed, device=ts.device, amp=ts.amp,
                   store=store, key=key, history=read_history(rundir.RunPaths(out).log))  # fmt: skip


def _evaluate(ts: TrainStep, out: Path, step: int, meta: dict, monitor, emit: Callback) -> None:
    """Run the monitor on the EMA model; log it, keep the best EMA model as best.safetensors, warn when copying."""
    paths = rundir.RunPaths(out)
    rec = monitor(ts.ema.model, ts.diffusion, step)
    best, warn = rec.pop("best"), rec.pop("warn", None)
    append_jsonl(paths.log, rec)
    if best:
        ckpt.save(paths.best, ts.ema.model.state_dict(), kind="model", step=step, extra={"fd": rec["fd"]}, **meta)
    emit({"event": "eval", **rec, "best": best, "path": str(paths.best)})
    if warn:
        emit({"event": "warning", "message": warn})


def _draw_report(out: Path) -> None:
    from .report import draw_report

    draw_report([out], rundir.RunPaths(out).report)


def _class_labels(data, model_config, state) -> tuple[torch.Tensor | None, dict]:
    """The labels a class-conditional model trains on, and the class names to store with it.

    An unconditional model ignores any labels (so an old run resumes as it was); a conditional
    one needs them, and on resume the data's classes must be the run's.
    """
    k = model_config.num_classes
    if not k:
        return None, {}
    names = list(getattr(data, "classes", ()) or ())
    if data.labels is None or not names:
        raise ConfigError(
            f"this model is class-conditional ({k} classes) but the data has no labels; "
            "give a folder with one sub-folder per class, or builtin:digits"
        )
    if state is not None and state.dataset.get("classes") not in (None, names):
        stored = state.dataset["classes"]
        raise ConfigError(f"the data's classes ({', '.join(names)}) are not the run's ({', '.join(map(str, stored))})")
    if len(names) != k:
        raise ConfigError(f"the data has {len(names)} classes but the model was built for {k}")
    return data.labels, {"classes": names}


def _precision(config: TrainConfig, model_config, state, dev: torch.device, processes: int):
    """The autocast dtype of this run and why (:func:`budget.training_precision`). A resumed ``auto`` run keeps
    the precision it was started with, so that stopping and resuming trains as one run would."""
    stored = state.train.get("autocast") if state is not None else None
    if config.precision == "auto" and dev.type == "cpu" and stored in ("fp32", "bfloat16"):
        bf16 = stored == "bfloat16"
        return (torch.bfloat16 if bf16 else None), f"auto: {'bf16' if bf16 else 'fp32'}, as the run was started"
    long_run = worth_measuring(config.steps, config.time_limit)
    return training_precision(
        config.precision, model_config, config.batch_size, dev, long_run=long_run, processes=processes
    )


def _set_up(
    data,
    out: Path,
    model_config,
    diffusion_config,
    config: TrainConfig,
    resume: bool,
    overwrite: bool,
    dist,
    dev: torch.device,
    emit: Callback,
) -> tuple[TrainStep, int, dict]:
    """Everything before the first step: the run folder, the configs (from the state on resume), the step
    (model, optimizer, EMA, data generator; restored on resume), config.json and the "start" event."""
    from .config import UNetConfig

    paths = rundir.RunPaths(out)
    # --- the run folder and the configs ----------------------------------------------
    devices.enable_tf32(dev)
    threads = devices.ThreadPolicy(config.threads, dev)  # decided once set-up is done, then re-checked
    dist.main_only(functools.partial(rundir.prepare_out_dir, out, resume=resume, overwrite=overwrite), dev)
    dist.main_only(functools.partial(rundir.clean_stale, out), dev)
    state = rundir.newest_state(out) if resume else None
    if state is not None:
        model_config = UNetConfig.from_dict(state.model)
        diffusion_config = DiffusionConfig.from_dict(state.diffusion)
    # the U-Net's output follows the diffusion: 2C channels for a learned variance (Improved DDPM)
    model_config = dataclasses.replace(model_config, learned_variance=diffusion_config.variance == "learned")
    n, c, h, w = data.images.shape
    if (model_config.in_channels, model_config.hw) != (c, (h, w)):
        m = model_config
        raise ConfigError(f"the data are {c}x{h}x{w} but the model expects {m.in_channels}x{m.hw[0]}x{m.hw[1]}")
    if config.batch_size % dist.world_size:
        raise ConfigError(
            f"--batch-size {config.batch_size} (global) must be divisible by the {dist.world_size} processes"
        )

    # --- the step: model, optimizer, EMA, data generator (restored on resume) --------
    labels, class_meta = _class_labels(data, model_config, state)
    amp, precision_note = _precision(config, model_config, state, dev, dist.world_size)
    amp_name = str(amp).replace("torch.", "") if amp else "fp32"
    images = place_images(data, dev)  # uint8 on the device when it fits, else read per batch (datacache.py)
    ts = make_train_step(model_config, diffusion_config, config, images, dev, dist, amp, labels)
    start = 0
    if state is not None:
        rundir.restore_state(state, ts.model, ts.ema.model, ts.opt, ts.gen, dev, dist.rank)
        if ts.importance is not None:
            ts.importance.load_state_tensors(state.tensors)
        start = state.step
        dist.main_only(functools.partial(rundir.truncate_log, paths.log, start), dev)
        del state  # the tensors now live in the model; free the copy
    if start >= config.steps:
        raise ConfigError(f"the run in {out} is already at step {start}; pass a larger --steps to continue")
    ts.distribute()
    if config.compile:
        why = ts.compile()
        if dist.any(why is not None, dev):
            ts.loss_fn = ts._losses
            emit(
                {
                    "event": "warning",
                    "message": f"--compile does not work on {dev} here "
                    f"({why or 'it failed on another rank'}); training without it",
                }
            )
    meta = dict(
        model=model_config.to_dict(),
        diffusion=diffusion_config.to_dict(),
        train={**config.to_dict(), "autocast": amp_name},
        dataset={**data.summary.to_dict(), **class_meta},
    )
    if dist.is_main:
        atomic_write_text(paths.config, json.dumps({**meta, "world_size": dist.world_size}, indent=2) + "\n")
    emit(
        {
            "event": "start",
            "step": start,
            "steps": config.steps,
            "device": str(dev),
            "precision": amp_name,
            "precision_note": precision_note,  # why, when --precision auto measured it (engine/budget.py)
            "world_size": dist.world_size,
            "parameters": count_parameters(ts.model),
            "resumed": resume,
            "images": n,
            "local_batch": config.batch_size // dist.world_size,
            "is_main": dist.is_main,
            "threads": threads.start(),
            "time_limit": config.time_limit,
            "data": images.where,
        }
    )
    ts.threads = threads
    return ts, start, meta


def _summary(out: Path, step: int, loss: float, elapsed: float, is_main: bool, out_of_time: bool, monitor) -> dict:
    """What train() returns: the paths, the final step and loss, and the best evaluated step."""
    paths = rundir.RunPaths(out)
    best = monitor is not None and monitor.best_step is not None
    return {"out": str(out), "model": str(paths.model), "step": step, "loss": loss, "samples": str(paths.samples),
            "elapsed": elapsed, "is_main": is_main, "out_of_time": out_of_time,
            "best_step": monitor.best_step if best else None, "best_fd": monitor.best_fd if best else None,
            "best": str(paths.best) if best else None, "report": str(paths.report)}  # fmt: skip


def train(
    data,  # data.ImageDataset
    out_dir: str | os.PathLike,
    model_config,  # unet.UNetConfig
    diffusion_config: DiffusionConfig | None,
    config: TrainConfig,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    callback: Callback | None = None,
) -> dict:
    """Train a U-Net on ``data``; write checkpoints, previews and logs into ``out_dir``.

    With ``resume`` the model and diffusion configs come from the run's newest state (pass
    None). Returns a summary dict (paths, final step, last loss). Raises DiffuseError
    subclasses for user-facing problems; ``Interrupted`` after saving on Ctrl-C/SIGTERM.
    """
    emit = callback or (lambda e: None)
    out = Path(out_dir)
    paths = rundir.RunPaths(out)
    dist, dev = init_distributed(device)
    try:
        ts, start, meta = _set_up(data, out, model_config, diffusion_config, config, resume, overwrite, dist, dev, emit)
        monitor = _make_monitor(data, ts, config, out) if config.eval_every and dist.is_main else None

        # --- the loop ----------------------------------------------------------------------
        loss_sum, loss_count, last_loss = torch.zeros((), device=dev), 0, float("nan")
        last_saved, step = start, start
        t0 = t_log = _clock()
        ts.model.train()
        with StopFlag() as stop:
            while step < config.steps:
                loss_sum += ts(step)
                loss_count += 1
                step += 1
                out_of_time = config.time_limit is not None and _clock() - t0 >= config.time_limit
                if dist.enabled and config.time_limit is not None:  # every rank stops at the same step
                    out_of_time = dist.any(out_of_time, dev) if step % config.log_every == 0 else False
                done = step == config.steps or out_of_time
                want_log = step % config.log_every == 0 or done or step - start == min(10, config.log_every)
                want_save = step % config.save_every == 0 or done

                # log: the loop's only host sync
                if want_log or want_save:
                    last_loss = float(dist.mean(loss_sum / loss_count))
                    if not math.isfinite(last_loss):
                        raise TrainingDiverged(
                            f"the loss became {last_loss} near step {step}; stopped without saving, the last good "
                            f"checkpoint (step {last_saved}) is kept; try a lower --lr (half of it, say)"
                        )
                    now = _clock()
                    rec = {
                        "step": step,
                        "loss": last_loss,
                        "lr": lr_at(step - 1, config.lr, config.warmup),
                        "img_per_s": loss_count * config.batch_size / max(now - t_log, 1e-9),
                        "elapsed": now - t0,
                        "data_ms": 1e3 * ts.data_s / loss_count,
                        "step_ms": 1e3 * (now - t_log) / loss_count,
                    }
                    ts.data_s = 0.0
                    dist.main_only(functools.partial(append_jsonl, paths.log, rec), dev)
                    emit({"event": "log", **rec})
                    _follow_load(ts, step, emit)
                    loss_sum.zero_()
                    loss_count, t_log = 0, now

                # save and preview
                if want_save:
                    dist.main_only(functools.partial(_save, ts, out, step, meta, config.keep, emit), dev)
                    last_saved = step
                if config.sample_every and config.num_preview > 0 and preview_due(step, config.sample_every, done):
                    dist.main_only(functools.partial(_preview, ts, out, step, config, emit), dev)
                if eval_due(step, config.eval_every, done):
                    t_eval = _clock()
                    dist.main_only(functools.partial(_evaluate, ts, out, step, meta, monitor, emit), dev)
                    t_log += _clock() - t_eval  # img/s counts training only
                if want_save:
                    dist.main_only(functools.partial(_draw_report, out), dev)

                # stop requests, agreed on by all ranks so no one waits in a collective alone
                if (not dist.enabled or want_log) and dist.any(stop.signal is not None, dev):
                    if step > last_saved:
                        dist.main_only(functools.partial(_save, ts, out, step, meta, config.keep, emit), dev)
                    name = "Ctrl-C" if stop.signal in (None, signal.SIGINT) else "SIGTERM"
                    raise Interrupted(
                        f"{name} at step {step}; the state is saved in {out} — "
                        f"continue with the same command plus --resume",
                        signum=stop.signal or signal.SIGINT,
                    )
                emit({"event": "step", "step": step, "elapsed": _clock() - t0})
                if done:
                    break
        emit({"event": "end", "step": step, "step_obj": ts, "dist": dist})
        return _summary(out, step, last_loss, _clock() - t0, dist.is_main, step < config.steps, monitor)
    finally:
        dist.close()
