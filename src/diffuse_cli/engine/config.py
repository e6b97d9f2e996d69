"""The configurations: frozen dataclasses a checkpoint stores, so ``diffuse sample RUN`` needs no flags.

This module imports no torch: the command line reads its help-text defaults from here and
``diffuse --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

SCHEDULE_NAMES = ("linear", "quadratic", "cosine", "sigmoid")

#: DDPM (Ho et al. 2020, sec. 4) used beta_1 = 1e-4 and beta_T = 0.02 with T = 1000.
DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 0.02
DEFAULT_TIMESTEPS = 1000

MAX_SEED = 2**63 - 1  # torch seeds are 64-bit; previews and per-image seeds derive from the seed


def check_seed(seed: int) -> int:
    """``seed`` if it is a whole number in [0, 2^63), else a ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be a whole number between 0 and 2^63 - 1 (got {seed!r})")
    return seed


PREDICTIONS = ("eps", "x0", "v")
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp")  # samplers.SAMPLERS holds the functions
PRECISIONS = ("auto", "fp32", "bf16")
WEIGHTINGS = ("uniform", "min-snr")
#: The reverse process's variance (``diffuse train --variance``): "fixed" is DDPM's (beta_t or beta~_t, chosen
#: when sampling); "learned" is Nichol & Dhariwal 2021 ("Improved DDPM", eq. 15): the network also outputs v
#: and Sigma = exp(v log beta_t + (1 - v) log beta~_t), trained with L_hybrid (their sec. 3.1).
VARIANCE_TYPES = ("fixed", "learned")
#: lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1).
DEFAULT_VLB_WEIGHT = 0.001
#: How training draws t: uniformly (DDPM), or by importance sampling for L_vlb (Nichol & Dhariwal 2021, sec. 3.3).
TIMESTEP_SAMPLING = ("uniform", "importance")
# The reverse step's fixed variance sigma_t^2: beta_t or the posterior's beta~_t (Ho et al. 2020, sec. 3.2).
FIXED_VARIANCES = ("beta", "posterior")
#: ... and "learned": a learned-variance model's own (Nichol & Dhariwal 2021, eq. 15), its default.
REVERSE_VARIANCES = (*FIXED_VARIANCES, "learned")
EVAL_FEATURES = ("randconv", "inception")  # diffuse eval --features
#: Classifier-free guidance scale w of ``diffuse sample --class`` (1 = the plain conditional model).
#: Measured on the digits make demo trains (benchmarks/conditional.py, benchmarks/RESULTS.md): the
#: asked-for digit is recognised in 90.8% of samples at w = 1, 99.3% at 2, 99.9% at 3, while the
#: spread of a digit's samples falls from 1.04 to 0.89 to 0.83 of the real digits'. 2 is where
#: accuracy saturates before diversity is lost.
DEFAULT_GUIDANCE = 2.0
#: Length of the augmentation vector a U-Net with augmentation conditioning reads (engine/augment.py).
AUGMENT_DIM = 9

# Editing (engine/editing.py; Lugmayr et al. 2022, Meng et al. 2022, Ho et al. 2020 fig. 8).
# RePaint's defaults, chosen by measurement on held-out digits (`python -m benchmarks.inpaint`, the table
# "Inpainting" in benchmarks/RESULTS.md): a respaced grid of 50 steps (RePaint itself uses 250) with jumps of 5
# steps traversed 5 times costs about 5 x 50 model calls per image.
DEFAULT_REPAINT_STEPS = 50
DEFAULT_JUMP_LENGTH = 5
DEFAULT_RESAMPLINGS = 5
DEFAULT_STRENGTH = 0.6  # SDEdit: Meng et al. 2022 find t0 in [0.3, 0.6] T balances faithfulness and realism
DEFAULT_INTERPOLATION_STRENGTH = 0.5  # Ho et al. 2020, fig. 8 mixes at t = 500 of T = 1000
INTERPOLATIONS = ("ddim", "noise")


@dataclass(frozen=True)
class DiffusionConfig:
    """What defines the forward process and what the network predicts."""

    schedule: str = "linear"  # DDPM's choice; cosine is better for small images
    timesteps: int = DEFAULT_TIMESTEPS  # T = 1000 as in DDPM
    beta_start: float = DEFAULT_BETA_START
    beta_end: float = DEFAULT_BETA_END
    zero_terminal_snr: bool = False  # Lin et al. 2024; pair it with v-prediction
    prediction: str = "eps"  # DDPM's objective: predict the noise
    variance: str = "fixed"  # DDPM's fixed reverse variance; "learned": Improved DDPM's learned range (eq. 15)

    def __post_init__(self) -> None:
        if self.variance not in VARIANCE_TYPES:
            raise ConfigError(f"unknown variance {self.variance!r}; choose one of {', '.join(VARIANCE_TYPES)}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if self.schedule not in SCHEDULE_NAMES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
        if not isinstance(self.zero_terminal_snr, bool):
            raise ConfigError(f"zero_terminal_snr must be true or false (got {self.zero_terminal_snr!r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`UNet`; the defaults are DDPM's CIFAR-10 model (35.7M parameters)."""

    image_size: int | tuple[int, int] = 32  # CIFAR-10; or (height, width); sides divisible by 2 ** (levels - 1)
    in_channels: int = 3  # 3 for RGB, 1 for greyscale
    base_channels: int = 128  # DDPM's CIFAR-10 width
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # DDPM: 32 -> 16 -> 8 -> 4 for 32x32 inputs
    num_res_blocks: int = 2  # DDPM uses 2 per level
    attention_resolutions: tuple[int, ...] = (16,)  # DDPM attends at 16x16 only (quadratic cost in H*W)
    dropout: float = 0.1  # DDPM's value for CIFAR-10; overfitting is the main risk on small data
    num_heads: int = 1  # DDPM used single-head attention
    num_classes: int = 0  # 0: unconditional (DDPM); K > 0: a class embedding with K + 1 rows, the last the "null" class
    # The rest of the DDPM family of diffusers' UNet2DModel; the defaults are DDPM's (and every preset's).
    norm_groups: int = 0  # GroupNorm groups in every norm (UNet2DModel's norm_num_groups); 0: gcd(32, width) each
    scale_shift: bool = False  # time conditioning as norm(h) (1 + s) + b (AdaGN, Dhariwal & Nichol 2021, sec. 3)
    head_channels: int = 0  # channels per attention head (UNet2DModel's attention_head_dim); 0: num_heads heads
    null_class: bool = True  # a conditional model has the null row K; False: K rows only (no guidance possible)
    learned_variance: bool = False  # 2C outputs: the prediction, then v of Improved DDPM's learned variance (eq. 15)
    augment_dim: int = 0  # 0: none; AUGMENT_DIM: reads EDM's augmentation vector (Karras et al. 2022, app. C.4)

    def __post_init__(self) -> None:
        # JSON and the CLI hand over lists; the dataclass is frozen and hashable only with tuples.
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        object.__setattr__(self, "image_size", normalize_size(self.image_size))
        for name in ("base_channels", "num_res_blocks", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_classes", "norm_groups", "head_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("scale_shift", "null_class"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.learned_variance, bool):
            raise ConfigError(f"learned_variance must be true or false, got {self.learned_variance!r}")
        if self.augment_dim not in (0, AUGMENT_DIM):
            raise ConfigError(f"augment_dim must be 0 or {AUGMENT_DIM}, got {self.augment_dim!r}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 (greyscale) or 3 (RGB), got {self.in_channels!r}")
        if not self.channel_mults:
            raise ConfigError("channel_mults must list at least one multiplier, e.g. 1,2,2")
        for m in self.channel_mults:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ConfigError(f"channel_mults must be positive integers, got {list(self.channel_mults)}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        divisor = 2 ** (len(self.channel_mults) - 1)
        for side in sorted(set(self.hw)):
            if side % divisor:
                lo = side // divisor * divisor
                near = [s for s in (lo, lo + divisor) if s > 0]
                raise ConfigError(
                    f"image_size {format_size(self.image_size)} must be divisible by {divisor} "
                    f"(2^{len(self.channel_mults) - 1} for {len(self.channel_mults)} levels); "
                    f"try {' or '.join(map(str, near))}, or use fewer channel_mults"
                )
        levels = self.resolutions
        bad = [r for r in self.attention_resolutions if r not in levels]
        if bad:
            raise ConfigError(
                f"attention_resolutions {bad} match no level of this U-Net; "
                f"its resolutions are {', '.join(map(str, levels))}"
            )
        for w in sorted(self.attention_widths):
            if self.head_channels and w % self.head_channels:
                raise ConfigError(f"head_channels {self.head_channels} must divide the attention width {w}")
            if not self.head_channels and w % self.num_heads:
                raise ConfigError(f"num_heads {self.num_heads} must divide the attention width {w}")
        if self.norm_groups:
            bad = sorted(w for w in self.normalized_widths if w % self.norm_groups)
            if bad:
                raise ConfigError(f"norm_groups {self.norm_groups} must divide every normalised width (not {bad[0]})")

    @property
    def out_channels(self) -> int:
        """Channels the network outputs: the image's (eps, x0 or v), twice as many with a learned variance."""
        return self.in_channels * (2 if self.learned_variance else 1)

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Size of each level, from the input down (e.g. 32, 16, 8, 4): its shorter side for non-square images,
        the number ``attention_resolutions`` refers to."""
        return tuple(min(self.hw) // 2**i for i in range(len(self.channel_mults)))

    @property
    def attention_widths(self) -> set[int]:
        """The channel counts at which the U-Net attends (the middle block always does)."""
        widths = {self.base_channels * m for m, r in zip(self.channel_mults, self.resolutions, strict=True)
                  if r in self.attention_resolutions}  # fmt: skip
        return widths | {self.base_channels * self.channel_mults[-1]}

    @property
    def normalized_widths(self) -> set[int]:
        """Every channel count a GroupNorm sees: residual blocks' inputs (skips concatenated) and outputs."""
        ch = self.base_channels
        skips, cur, widths = [ch], ch, {ch}
        for level, mult in enumerate(self.channel_mults):
            cur = ch * mult
            skips += [cur] * (self.num_res_blocks + (level < len(self.channel_mults) - 1))
            widths.add(cur)
        for mult in reversed(self.channel_mults):
            for _ in range(self.num_res_blocks + 1):
                widths.add(cur + skips.pop())
                cur = ch * mult
                widths.add(cur)
        return widths

    def heads(self, width: int) -> int:
        """Attention heads at ``width`` channels: width / head_channels, else num_heads."""
        return width // self.head_channels if self.head_channels else self.num_heads

    def to_dict(self) -> dict:
        """A JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys (e.g. from a newer version) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("channel_mults", "attention_resolutions"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if isinstance(kw.get("image_size"), list):
            kw["image_size"] = tuple(kw["image_size"])
        return cls(**kw)

    @classmethod
    def preset(cls, name: str, image_size: int, in_channels: int, device: str = "cpu", **overrides) -> UNetConfig:
        """The model a preset names for ``image_size`` x ``image_size`` images, with ``overrides`` applied.

        ``auto`` picks by image size *and* device type (``cpu``, ``cuda``, ``mps``): on a CPU a
        model that makes visible progress in minutes (``cpu``: 1.6M parameters at 16x16), on a GPU
        DDPM's width (``small`` up to 16 px, ``ddpm-cifar10`` above). Above 32 px every doubling
        adds a level, so the bottleneck stays at 8x8 or below. A preset's attention levels are
        a suggestion: those this image size does not have are dropped, unless
        ``attention_resolutions`` is given explicitly (then a wrong one is an error).
        """
        if name not in PRESETS and name != "auto":
            raise ConfigError(f"unknown preset {name!r}; choose auto or one of {', '.join(PRESETS)}")
        image_size = normalize_size(image_size)
        hw = (image_size, image_size) if isinstance(image_size, int) else image_size
        side = min(hw)  # levels are counted on the shorter side (see resolutions)
        if name == "auto":
            name = auto_preset(side, device)
        kw = dict(PRESETS[name])
        if side >= 64:
            kw["channel_mults"] = tuple(kw["channel_mults"]) + (2,) * ((side // 32).bit_length() - 1)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        divisor = 2 ** (len(kw["channel_mults"]) - 1)
        if overrides.get("attention_resolutions") is None and all(n % divisor == 0 for n in hw):
            levels = [side // 2**i for i in range(len(kw["channel_mults"]))]
            wanted = kw["attention_resolutions"]
            if wanted == ("middle",):  # the second level, at most 16x16 (attention costs (H W)^2)
                wanted = tuple(max((r for r in levels[1:] if r <= 16), default=None) for _ in "x")
            kw["attention_resolutions"] = tuple(r for r in wanted if r in levels)
        return cls(**kw, image_size=image_size, in_channels=in_channels)


def normalize_size(size) -> int | tuple[int, int]:
    """An image size as UNetConfig keeps it: a side for squares, (height, width) otherwise; else ConfigError."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = size
        size = h if h == w else (h, w)
    parts = size if isinstance(size, tuple) else (size,)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in parts):
        raise ConfigError(f"image_size must be a positive integer or a (height, width) pair, got {size!r}")
    return size


def format_size(size) -> str:
    """``32`` for a square side, ``24x40`` (height x width) for a pair."""
    return f"{size[0]}x{size[1]}" if isinstance(size, (tuple, list)) else str(size)


def parse_size(text: str) -> int | tuple[int, int]:
    """``--image-size``: ``32`` (square) or ``HxW`` such as ``24x40`` (height x width) -> UNetConfig's form."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", str(text))
    if not m:
        raise ConfigError(f"--image-size must be a size like 32 or HxW like 24x40 (got {text!r})")
    h, w = int(m[1]), int(m[2] or m[1])
    return normalize_size((h, w))


def auto_preset(image_size: int, device: str = "cpu") -> str:
    """The preset ``--preset auto`` means for this image size on this kind of device."""
    if device in ("cuda", "mps"):
        return "small" if image_size <= 16 else "ddpm-cifar10"
    return "cpu"


# Small configurations for small data; ``image_size`` and ``in_channels`` come from the data set.
PRESETS: dict[str, dict] = {
    # What --preset auto picks on a CPU: 32/64/64 wide, two blocks per level, attention at the second
    # level ("middle") and in the bottleneck. 1.6M parameters; at 16x16 about 120 img/s on one core.
    "cpu": dict(
        base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=("middle",), dropout=0.0
    ),
    # 8x8 or 16x16 greyscale digits on a laptop CPU: ~1.1M parameters, attention only in the middle.
    "tiny": dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0),
    # 32x32 RGB on a CPU: ~6.5M parameters (DDPM's layout at half width, one level fewer).
    "small": dict(
        base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1
    ),
    # DDPM's CIFAR-10 model, 35.7M parameters (Ho et al. 2020, appendix B).
    "ddpm-cifar10": dict(
        base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000  # enough for recognisable samples on small data sets
    batch_size: int = 64  # global, over all processes; the CLI's default depends on the device (default_batch_size)
    lr: float = 2e-4  # DDPM's CIFAR-10 learning rate
    warmup: int = 200  # linear LR warmup steps (DDPM used 5000 on 800k steps)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # DDPM clipped the gradient norm at 1
    ema_decay: float = 0.999  # short runs need a shorter EMA than DDPM's 0.9999
    loss_weighting: str = "uniform"  # DDPM's plain MSE (L_simple, eq. 14); "min-snr" = Hang et al. 2023
    vlb_weight: float = DEFAULT_VLB_WEIGHT  # lambda of L_hybrid; used only by a model with a learned variance
    timestep_sampling: str = "uniform"  # "importance": Improved DDPM sec. 3.3 (learned variance only)
    hflip: bool = False  # random horizontal flips: off unless asked (a mirrored 2, R or face with text is not one)
    augment: float = 0.0  # P(each geometric op) of non-leaking augmentation (engine/augment.py); plan.py picks it
    cond_drop: float = 0.1  # P(label -> null class) for class-conditional models (Ho & Salimans 2022 used 0.1-0.2)
    save_every: int = 1000
    sample_every: int = 1000
    keep: int = 3  # periodic training states kept on disk
    log_every: int = 25  # host syncs happen only here
    num_preview: int = 16
    preview_steps: int = 50
    eval_every: int = 1000  # in-training FD/KID/near-copy check (engine/monitor.py); also at 500 and the end
    eval_samples: int = 256  # EMA samples per check: ~5% of a CPU run's time at 16x16 (benchmarks/RESULTS.md)
    seed: int = 0
    precision: str = "auto"  # auto = bf16 autocast on CUDA, and on a CPU where measured faster (engine/budget.py)
    compile: bool = False
    time_limit: float | None = None  # seconds of training in this process (--time); None: until `steps`
    threads: int | None = None  # CPU threads for torch; None: as many as are free, re-checked (device.ThreadPolicy)
    micro_batch: int | None = None  # images per forward/backward pass on each process (gradient accumulation)

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"--steps must be at least 1 (got {self.steps})"),
            (self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number (got {self.lr})"),
            (self.warmup >= 0, f"--warmup must be >= 0 (got {self.warmup})"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (got {self.grad_clip})"),
            (0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1) (got {self.ema_decay})"),
            (self.loss_weighting in WEIGHTINGS, f"--loss-weighting must be one of {', '.join(WEIGHTINGS)}"),
            (
                isinstance(self.vlb_weight, (int, float)) and math.isfinite(self.vlb_weight) and self.vlb_weight >= 0,
                f"--vlb-weight must be a number >= 0 (got {self.vlb_weight})",
            ),
            (
                self.timestep_sampling in TIMESTEP_SAMPLING,
                f"--timestep-sampling must be one of {', '.join(TIMESTEP_SAMPLING)} (got {self.timestep_sampling})",
            ),
            (
                isinstance(self.cond_drop, (int, float)) and 0.0 <= self.cond_drop < 1.0,
                f"--cond-drop must be in [0, 1) (got {self.cond_drop})",
            ),
            (
                isinstance(self.augment, (int, float)) and 0.0 <= self.augment <= 1.0,
                f"--augment must be a probability in [0, 1] (got {self.augment})",
            ),
            (self.save_every >= 1, f"--save-every must be at least 1 (got {self.save_every})"),
            (self.sample_every >= 0, f"--sample-every must be >= 0 (got {self.sample_every})"),
            (self.eval_every >= 0, f"--eval-every must be >= 0 (got {self.eval_every})"),
            (self.eval_samples >= 4, f"--eval-samples must be at least 4 (got {self.eval_samples})"),
            (self.keep >= 1, f"--keep must be at least 1 (got {self.keep})"),
            (self.log_every >= 1, f"log interval must be at least 1 (got {self.log_every})"),
            (self.precision in PRECISIONS, f"--precision must be auto, fp32 or bf16 (got {self.precision})"),
            (self.time_limit is None or self.time_limit > 0, f"--time must be positive (got {self.time_limit})"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1 (got {self.threads})"),
            (
                self.micro_batch is None or self.micro_batch >= 1,
                f"--micro-batch must be at least 1 (got {self.micro_batch})",
            ),
            (
                self.micro_batch is None or self.timestep_sampling == "uniform",
                "--micro-batch works with uniform timesteps only (importance sampling weighs the whole batch at once)",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_seed(self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resumed(self, **given) -> TrainConfig:
        """This stored run's config with the options given again on the command line applied.

        Everything but the settings of the machine survives a resume unless given again; e.g. a
        larger ``steps`` continues the run further. Machine settings (:data:`MACHINE_SETTINGS`:
        threads, micro-batch) describe the computer, not the run: they are what is given now, or
        their defaults, never the stored run's.
        """
        machine = {k: given.get(k) for k in MACHINE_SETTINGS}
        return dataclasses.replace(self, **{**{k: v for k, v in given.items() if v is not None}, **machine})

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: TrainConfig fields that describe the machine a run is on, not the run: --resume does not carry them over.
#: (The update is the same for any micro-batch: it splits the batch, not the math.)
MACHINE_SETTINGS = ("threads", "micro_batch")

UNLIMITED_STEPS = 10**9  # --time without --steps: the budget ends the run


def default_batch_size(device: str) -> int:
    """--batch-size when not given: 32 on a CPU (more optimizer steps in the same minutes), DDPM's 128 on a GPU."""
    return 128 if device in ("cuda", "mps") else 32


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``1.5h``, ``2h30m`` or plain seconds -> seconds."""
    import re

    t = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
        if not parts or "".join(a + b for a, b in parts) != t:
            raise ConfigError(f"--time must be a duration like 90s, 5m, 1.5h or 2h30m (got {text!r})")
        seconds = sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)
    if not seconds > 0:
        raise ConfigError(f"--time must be positive (got {text!r})")
    return seconds


def parse_ints(text: str, name: str) -> list[int]:
    """``"0, 100,500"`` -> [0, 100, 500]; ConfigError naming the option ``name`` otherwise."""
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers (got {text!r})") from None
    if not vals:
        raise ConfigError(f"{name} is empty")
    return vals


def parse_positive_ints(text: str | None, name: str, allow_empty: bool = False) -> tuple[int, ...] | None:
    """A comma-separated list of positive integers (None when not given; ``""``/``none`` = () if allowed)."""
    if text is None:
        return None
    if text.strip() in ("", "none"):
        if allow_empty:
            return ()
        raise ConfigError(f"{name} must not be empty")
    vals = parse_ints(text, name)
    if any(v < 1 for v in vals):
        raise ConfigError(f"{name} values must be positive (got {text!r})")
    return tuple(vals)
