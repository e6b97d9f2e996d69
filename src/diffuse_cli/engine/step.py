"""One training step of DDPM (Ho et al. 2020, Algorithm 1), the thing ``diffuse train`` repeats.

    x0 ~ data, t ~ Uniform{0..T-1}, eps ~ N(0, I)
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                 (eq. 4)
    gradient step on ||target - net(x_t, t)||^2                  (eq. 14; target = eps, x0 or v)

:func:`make_train_step` builds the model, optimizer, EMA and data generator in a fixed order
(so a seed fixes the initial weights), and :class:`TrainStep` runs one step. The training loop
(``training.py``) and ``benchmarks/gpu.py`` both use these two, so the benchmark measures
exactly what ships.

Randomness: one generator on the training device (the "data generator") draws, for every
step, the indices of the whole *global* batch, its t, its eps and its flips; every rank
draws the same numbers and keeps its own slice. So N processes train exactly the
1-process run, and a run can resume on a different number of processes. Dropout uses
torch's global RNG.

A learned-variance model (Nichol & Dhariwal 2021) trains with L_hybrid (``Diffusion.training_losses``
with ``vlb_weight``); with ``timestep_sampling="importance"`` its t is drawn by :mod:`.importance`
(their sec. 3.3) instead of uniformly, and each sample's loss is weighted by 1 / (T p_t).

Class-conditional models (``num_classes`` > 0) train for classifier-free guidance (Ho &
Salimans 2022, Algorithm 1): each label is replaced by the null class with probability
``cond_drop``. Those coin flips are drawn last, and only for a conditional model, so
unconditional runs draw exactly the numbers they always did.

Models with augmentation conditioning (``augment_dim`` > 0) train with non-leaking augmentation
(Karras et al. 2022, appendix C.4; ``augment.py``): after everything else, the augmentation
vectors of the global batch are drawn from the same generator (so resume stays bit-exact and
N processes train the 1-process run), each rank warps its slice on the device, and the network
reads the vectors as conditioning.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from . import augment as augmentation
from . import device as devices
from .adamw import AdamW
from .config import DiffusionConfig
from .data import to_model_range
from .diffusion import Diffusion
from .distributed import Dist
from .errors import ConfigError
from .importance import ImportanceSampler


class EMA:
    """Exponential moving average of a model's parameters (Polyak averaging), with warmup.

    decay_k = min(decay, (1 + k) / (10 + k)) so early averages are not dominated by the
    random initialisation (as in TensorFlow's ExponentialMovingAverage num_updates).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        for eb, mb in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(mb)


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warmup to ``lr``, then constant (DDPM's schedule): it needs no total step count."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    return lr


@dataclass
class TrainStep:
    """Everything one step touches. ``step(k)`` trains on global batch k and returns its mean loss
    (a detached device tensor: reading it is a host sync, so the loop does that only when it logs)."""

    model: nn.Module  # the bare U-Net: its weights are what gets saved
    diffusion: Diffusion
    opt: AdamW
    ema: EMA
    gen: torch.Generator  # the data generator (see the module docstring)
    images: torch.Tensor  # uint8 (N, C, H, W) as the device reads it: a tensor there, or datacache.DeviceImages
    config: object  # training.TrainConfig: batch_size, lr, warmup, grad_clip, loss_weighting, hflip
    amp: torch.dtype | None = None  # autocast dtype, None for fp32
    dist: Dist = None  # type: ignore[assignment]
    net: nn.Module | None = None  # what is called: the model, DDP-wrapped on several processes
    loss_fn: object = None  # net + loss, possibly compiled
    labels: torch.Tensor | None = None  # int64 (N,) on the training device: only for a class-conditional model
    threads: object = None  # the run's device.ThreadPolicy: the training loop re-checks it when it logs
    importance: ImportanceSampler | None = None  # draws t (Improved DDPM sec. 3.3); None: uniform t

    def __post_init__(self) -> None:
        self.dist = self.dist or Dist()
        self.net = self.net or self.model
        self.loss_fn = self.loss_fn or self._losses
        self.device = self.images.device
        self.memory_format = devices.memory_format(self.device, self.amp)
        self.data_s = 0.0  # host seconds spent getting batches (the loop reads and resets it when it logs)
        self.drawn: tuple[torch.Tensor, torch.Tensor] | None = None  # importance only: global t, local weights

    def distribute(self) -> None:
        """Wrap the model in DDP when there are several processes (after any resume, before training)."""
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def compile(self, backend: str | None = None) -> str | None:
        """Compile the forward pass and the loss together (inductor fuses the memory-bound work between
        the matrix products); returns why not if this machine cannot compile, and stays eager then."""
        fn, why = devices.compile_model(self._losses, self.device, backend)
        if why is None:
            self.loss_fn = fn
        return why

    def _losses(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        y: torch.Tensor | None = None,
        aug: torch.Tensor | None = None,
    ) -> torch.Tensor:
        net = self.net if y is None and aug is None else (lambda x_t, t_: self.net(x_t, t_, y, aug))
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.diffusion.training_losses(
                net, x0, t=t, eps=eps, weighting=self.config.loss_weighting, vlb_weight=self.config.vlb_weight
            )

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's slice of the next global batch: (x0 in [-1, 1], t, eps, y, aug). Draws in a fixed order.

        ``y`` is None for an unconditional model; otherwise each image's label, replaced by the
        null class (``num_classes``) with probability ``cond_drop``. ``aug`` is None for a model
        without augmentation conditioning; otherwise the vectors x0 was augmented by.
        """
        cfg, gen, dev = self.config, self.gen, self.device
        b = cfg.batch_size
        idx = torch.randint(0, self.images.shape[0], (b,), generator=gen, device=dev)
        if self.importance is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=gen, device=dev)
        else:
            t, weight = self.importance.draw(b, gen)
        eps = torch.randn((b, *self.images.shape[1:]), generator=gen, device=dev)
        flip = torch.rand((b,), generator=gen, device=dev) < 0.5 if cfg.hflip else None
        y = None
        if self.labels is not None:  # drawn last: unconditional runs keep their random stream
            drop = torch.rand((b,), generator=gen, device=dev) < cfg.cond_drop
            y = torch.where(drop, torch.full_like(idx, self.model.config.num_classes), self.labels[idx])
        aug = None
        if self.model.config.augment_dim:  # drawn after the labels: runs without it keep their random stream
            aug = augmentation.draw(b, cfg.augment, self.images.shape[-1], gen, dev)
        local = b // self.dist.world_size
        sl = slice(self.dist.rank * local, (self.dist.rank + 1) * local)
        t_data = time.perf_counter()
        x0 = to_model_range(self.images[idx[sl]])
        if flip is not None:
            x0 = torch.where(flip[sl, None, None, None], x0.flip(-1), x0)
        if aug is not None:
            aug = aug[sl]
            x0 = augmentation.apply(x0, aug)
        x0 = x0.contiguous(memory_format=self.memory_format)
        self.data_s += time.perf_counter() - t_data
        if self.importance is not None:
            self.drawn = (t, weight[sl])
        return x0, t[sl], eps[sl], None if y is None else y[sl], aug

    def _importance_weighted(self, per_sample: torch.Tensor) -> torch.Tensor:
        """The batch loss weighted by 1 / (T p_t); the whole global batch's losses update the sampler on every rank."""
        t, weight = self.drawn
        local = per_sample.shape[0]
        every = per_sample.new_zeros(t.shape[0], dtype=torch.float32)
        every[self.dist.rank * local : (self.dist.rank + 1) * local] = per_sample.detach().float()
        self.importance.update(t, self.dist.mean(every) * self.dist.world_size)
        return (per_sample * weight).mean()

    def __call__(self, step: int) -> torch.Tensor:
        cfg = self.config
        x0, t, eps, y, aug = self.draw()
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        self.opt.zero_grad(set_to_none=True)
        if self.importance is not None:  # its weights need the whole batch's losses at once: one pass
            given = {k: v for k, v in (("y", y), ("aug", aug)) if v is not None}  # the compiled graph sees what it gets
            loss = self._importance_weighted(self.loss_fn(x0, t, eps, **given))
            loss.backward()
            loss = loss.detach()
        else:
            loss = self.accumulate(x0, t, eps, y, aug)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        self.opt.step()
        self.ema.update(self.model, step)
        return loss

    def accumulate(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        y: torch.Tensor | None,
        aug: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gradients of the mean loss over this rank's batch, in passes of ``config.micro_batch`` images.

        Pass j adds the gradient of sum_j(losses) / B, so the accumulated gradient is that of the mean
        over all B images (gradient accumulation: the same update as one pass, to float rounding; EDM's
        ``--batch-gpu``). Under DDP only the last pass all-reduces (``no_sync``). Returns the mean loss.
        """
        b = x0.shape[0]
        m = min(self.config.micro_batch or b, b)
        total = torch.zeros((), device=x0.device)
        for start in range(0, b, m):
            sl = slice(start, start + m)
            last = start + m >= b
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
            with sync:
                given = {k: v[sl] for k, v in (("y", y), ("aug", aug)) if v is not None}  # the graph sees what it gets
                losses = self.loss_fn(x0[sl], t[sl], eps[sl], **given)
                loss = losses.sum() / b if m < b else losses.mean()
                loss.backward()
            total += loss.detach()
        return total


def make_train_step(
    model_config,
    diffusion_config: DiffusionConfig,
    config,
    images,
    device: torch.device,
    dist: Dist | None = None,
    amp: torch.dtype | None = None,
    labels: torch.Tensor | None = None,
) -> TrainStep:
    """Build model, optimizer, EMA and generator for ``config`` (a TrainConfig) on ``device``.

    The initial weights depend only on ``config.seed`` (the same on every rank); dropout streams
    differ per rank. ``images``: a uint8 tensor (copied to the device once: 4x less memory than
    float), or a :class:`~.datacache.DeviceImages` that already says where batches come from.
    ``labels`` (int64 (N,) in [0, num_classes)) are required by, and only used by, a conditional model.
    """
    if bool(model_config.num_classes) != (labels is not None):
        raise ConfigError(
            "a class-conditional model needs labels and an unconditional one takes none "
            f"(num_classes = {model_config.num_classes}, labels {'given' if labels is not None else 'missing'})"
        )
    if config.augment and not model_config.augment_dim:
        raise ConfigError(
            f"--augment {config.augment:g} needs a model with augmentation conditioning and this one has none "
            "(a run started without --augment cannot turn it on when resuming; start a new run)"
        )
    from .unet import UNet

    if model_config.learned_variance != (diffusion_config.variance == "learned"):
        raise ConfigError(
            f"the diffusion's variance is {diffusion_config.variance} but the U-Net has "
            f"{model_config.out_channels} output channels for {model_config.in_channels} input channels"
        )
    dist = dist or Dist()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    diffusion = Diffusion(diffusion_config).to(device)
    model = UNet(model_config).to(device)
    torch.manual_seed(config.seed + dist.rank)  # dropout masks differ between ranks
    model = devices.optimize_for_device(model, device, amp)
    opt = devices.make_optimizer(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    data = devices.to_device(images, device) if isinstance(images, torch.Tensor) else images
    y = None if labels is None else labels.to(device=device, dtype=torch.long)
    importance = None
    if config.timestep_sampling == "importance":
        if not diffusion.learned_variance:
            raise ConfigError(
                "importance sampling of t (Improved DDPM sec. 3.3) is for L_vlb: use it with --variance learned"
            )
        importance = ImportanceSampler(diffusion.num_timesteps, device)
    return TrainStep(model, diffusion, opt, ema, gen, data, config, amp=amp, dist=dist, labels=y, importance=importance)
