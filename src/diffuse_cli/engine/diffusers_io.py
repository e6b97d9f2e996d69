"""diffusers folders in and out, with our own code: JSON configs and safetensors, never ``import diffusers``.

A diffusers DDPM folder (``DDPMPipeline.save_pretrained`` or a downloaded snapshot) holds::

    model_index.json                                   {"_class_name": "DDPMPipeline", "unet": [...], ...}
    unet/config.json                                   UNet2DModel's constructor arguments
    unet/diffusion_pytorch_model.safetensors           its weights
    scheduler/scheduler_config.json                    DDPMScheduler (or DDIMScheduler) arguments

:func:`write_pipeline` writes such a folder from a diffuse model; :func:`load` reads one into our
:class:`~.unet.UNet` (through :func:`~.unet.convert_diffusers_state_dict`) and a
:class:`~.diffusion.Diffusion`. Only safetensors weights are read: a folder holding only
``.bin`` pickles is refused without opening them.

Mapping (diffusers -> diffuse):

* ``block_out_channels`` = base_channels x channel_mults; ``layers_per_block`` = num_res_blocks;
  ``AttnDownBlock2D`` / ``AttnUpBlock2D`` exactly at the levels in attention_resolutions (the
  middle block always attends); ``attention_head_dim`` None = one head, else width / head_dim
  heads (``num_heads`` when that is one count, else ``head_channels``); ``norm_num_groups`` =
  ``norm_groups`` (0 when it is what gcd(32, width) gives anyway); ``resnet_time_scale_shift``
  "scale_shift" = ``scale_shift``; ``num_class_embeds`` K = ``num_classes`` K without a null
  row (a diffuse export adds ``_diffuse_null_class``); ``sample_size`` [H, W] = ``image_size`` (H, W).
  Refused by name: other block types, time embeddings, class-embedding types, activations,
  "spatial" conditioning.
* ``beta_schedule``: linear = linear, scaled_linear = quadratic, squaredcos_cap_v2 = cosine,
  sigmoid = sigmoid (same formulas); ``trained_betas`` are used as given;
  ``rescale_betas_zero_snr`` = zero_terminal_snr; ``prediction_type`` epsilon / sample /
  v_prediction = eps / x0 / v. Timesteps are 0-based in both: diffusers' t is our t.
* The DDPM authors' converted models (google/ddpm-*) use an older layout: the embedding as
  [sin, cos] (``flip_sin_to_cos=False``) with frequencies 10000^(-i / (half - 1))
  (``freq_shift=1``), downsampling by a right/bottom zero pad and an unpadded stride-2 conv
  (``downsample_padding=0``) and GroupNorm eps 1e-6. :class:`DiffusersUNet` runs our U-Net
  with those four settings; everything else is identical. A fifth is UNet2DModel's own: with
  scale-shift conditioning its middle attention has no GroupNorm unless ``attn_norm_num_groups``
  gives one (``DiffusersLayout.mid_attention_groups``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .errors import CheckpointError, ConfigError, OutputError, Unsupported
from .unet import Downsample, UNet, convert_diffusers_state_dict

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
#: Written as ``_diffusers_version``: every key we write exists in this release (the test extra's floor).
DIFFUSERS_VERSION = "0.30.0"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")

# Our names <-> diffusers' names (the formulas agree; see the module docstring).
SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2",
                         "sigmoid": "sigmoid"}  # fmt: skip
SCHEDULE_FROM_DIFFUSERS = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
PREDICTION_FROM_DIFFUSERS = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
# DDPMScheduler's variance_type -> DiffusionConfig.variance. The fixed ones only change how DDPM samples (which
# `diffuse sample --variance` chooses); "learned_range" is Improved DDPM's eq. 15, our "learned". diffusers'
# "learned" (the network outputs log sigma^2 itself) has no counterpart here.
VARIANCE_FROM_DIFFUSERS = {"fixed_small": "fixed", "fixed_small_log": "fixed", "fixed_large": "fixed",
                           "fixed_large_log": "fixed", "learned_range": "learned"}  # fmt: skip

# UNet2DModel's constructor defaults (diffusers 0.30 - 0.42): what a config without the key means.
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}  # fmt: skip
# Settings our U-Net has no other value for: (key, the value it needs, what it means).
_UNET_FIXED = (
    ("center_input_sample", False, "inputs rescaled by 2x - 1"),
    ("time_embedding_type", "positional", "a non-sinusoidal time embedding"),
    ("time_embedding_dim", None, "a custom time-embedding width"),
    ("mid_block_type", "UNetMidBlock2D", "a U-Net without the middle block"),
    ("mid_block_scale_factor", 1, "a scaled middle block"),
    ("downsample_type", "conv", "downsampling without a conv"),
    ("upsample_type", "conv", "upsampling without a conv"),
    ("act_fn", "silu", "an activation other than SiLU"),
    ("add_attention", True, "a middle block without attention"),
    ("class_embed_type", None, "class conditioning through a timestep embedding or identity"),
)
TIME_SCALE_SHIFT = {"default": False, "scale_shift": True}  # resnet_time_scale_shift -> UNetConfig.scale_shift
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
    "variance_type": "fixed_small",
}  # fmt: skip


# --- our U-Net in diffusers' older layout ---------------------------------------------------
@dataclass(frozen=True)
class DiffusersLayout:
    """The four UNet2DModel settings our :class:`UNet` fixes; the defaults are ours (and diffusers')."""

    flip_sin_to_cos: bool = True  # embedding as [cos, sin]; False: [sin, cos]
    freq_shift: int = 0  # frequencies 10000^(-i / (half - freq_shift))
    downsample_padding: int = 1  # 1: pad 1 all round; 0: pad right/bottom only (the DDPM authors' code)
    norm_eps: float = 1e-5  # GroupNorm eps
    # The middle block's attention norm: None as every other norm; 0 none (UNet2DModel with scale-shift
    # conditioning and no attn_norm_num_groups); n > 0: n groups (attn_norm_num_groups).
    mid_attention_groups: int | None = None

    @property
    def native(self) -> bool:
        return self == DiffusersLayout()


def diffusers_timestep_embedding(t: torch.Tensor, dim: int, layout: DiffusersLayout) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, sec. 3.5) with diffusers' ``flip_sin_to_cos``/``freq_shift``.

    (B,) -> (B, dim) float32; the native layout gives :func:`~.unet.timestep_embedding`'s values.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) * (
        -math.log(10_000.0) / (half - layout.freq_shift)
    )
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    parts = [torch.cos(args), torch.sin(args)] if layout.flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _PadRightDownsample(Downsample):
    """Zero-pad right and bottom by one, then an unpadded stride-2 3x3 conv (``downsample_padding=0``)."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.conv.padding = (0, 0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DiffusersUNet(UNet):
    """Our :class:`UNet` with a non-native :class:`DiffusersLayout`: same modules and weight names."""

    def __init__(self, config: UNetConfig, layout: DiffusersLayout):
        super().__init__(config)
        self.layout = layout
        if layout.mid_attention_groups is not None:
            width = self.mid_attn.norm.num_channels
            self.mid_attn.norm = (nn.GroupNorm(layout.mid_attention_groups, width) if layout.mid_attention_groups
                                  else nn.Identity())  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                m.eps = layout.norm_eps
        if layout.downsample_padding == 0:
            for i, block in enumerate(self.down):
                if isinstance(block, Downsample):
                    self.down[i] = _PadRightDownsample(block.conv.in_channels)

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        return diffusers_timestep_embedding(t, self.config.base_channels, self.layout)


def build_unet(config: UNetConfig, layout: DiffusersLayout | None = None) -> UNet:
    """Our plain :class:`UNet` for the native layout, :class:`DiffusersUNet` otherwise."""
    if layout is None or layout.native:
        return UNet(config)
    return DiffusersUNet(config, layout)


def _group_counts(config: UNetConfig) -> set[int]:
    with torch.device("meta"):
        model = UNet(config)
    return {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}


def _attention_widths(config: UNetConfig) -> set[int]:
    return config.attention_widths


# --- export -----------------------------------------------------------------------------------
def unet_config(config: UNetConfig, layout: DiffusersLayout | None = None) -> dict:
    """UNet2DModel's config.json for our U-Net, or Unsupported naming what diffusers cannot express.

    A class-conditional model gets ``num_class_embeds`` (its rows, the null class included, which
    ``_diffuse_null_class`` names: keys starting with ``_`` are ignored by diffusers); DDPMPipeline
    passes no labels, so such a U-Net is called directly with ``class_labels``.
    """
    layout = layout or DiffusersLayout()
    if config.norm_groups:
        groups = {config.norm_groups}
    else:
        groups = _group_counts(config)
        if len(groups) != 1:
            raise Unsupported(
                f"diffusers' UNet2DModel uses one norm_num_groups for every GroupNorm, but this model's widths "
                f"(base_channels {config.base_channels}) give {sorted(groups)} groups (gcd(32, width)); "
                "widths that are multiples of 32 export"
            )
    if config.head_channels:
        head_dim = config.head_channels
    elif config.num_heads == 1:
        head_dim = None
    else:
        widths = _attention_widths(config)
        if len(widths) != 1:
            raise Unsupported(
                f"diffusers' UNet2DModel fixes the head width (attention_head_dim), not the number of heads: "
                f"{config.num_heads} heads at attention widths {sorted(widths)} cannot be expressed; "
                "use num_heads 1 or attend only at levels of one width"
            )
        head_dim = widths.pop() // config.num_heads
    norm_groups = groups.pop()
    # UNet2DModel's middle attention: norm_num_groups groups by default, none with scale-shift, unless
    # attn_norm_num_groups says otherwise.
    mid = norm_groups if layout.mid_attention_groups is None else layout.mid_attention_groups
    attn_groups = None if mid == (0 if config.scale_shift else norm_groups) else mid
    if mid == 0 and not config.scale_shift:
        raise Unsupported("a middle attention without a norm exists in UNet2DModel only with scale-shift conditioning")
    res = config.resolutions
    h, w = config.hw
    classes = config.num_classes + config.null_class if config.num_classes else None
    out = {
        "_class_name": UNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": h if h == w else [h, w], "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": layout.freq_shift, "flip_sin_to_cos": layout.flip_sin_to_cos,
        "down_block_types": ["AttnDownBlock2D" if r in config.attention_resolutions else "DownBlock2D" for r in res],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if r in config.attention_resolutions else "UpBlock2D" for r in reversed(res)],
        "block_out_channels": [config.base_channels * m for m in config.channel_mults],
        "layers_per_block": config.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": layout.downsample_padding, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": config.dropout, "act_fn": "silu", "attention_head_dim": head_dim,
        "norm_num_groups": norm_groups, "attn_norm_num_groups": attn_groups, "norm_eps": layout.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if config.scale_shift else "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": classes, "num_train_timesteps": None,
    }  # fmt: skip
    if config.num_classes and config.null_class:
        out["_diffuse_null_class"] = config.num_classes
    return out


def scheduler_config(diffusion_config: dict, betas: torch.Tensor | None = None) -> dict:
    """DDPMScheduler's scheduler_config.json for a diffuse diffusion config (a dict, as checkpoints store it).

    ``variance_type`` is "learned_range" for a learned-variance model (Nichol & Dhariwal 2021 eq. 15, the
    U-Net then has 2C outputs), else "fixed_large" (sigma^2 = beta_t), the variance of ``diffuse sample --sampler
    ddpm``; ``clip_sample`` is on like ``diffuse sample``'s default; ``timestep_spacing`` "trailing" is
    our "uniform" grid (it includes t = T - 1). ``betas`` (only for a custom schedule) go out as trained_betas.
    """
    d = diffusion_config
    kind = d.get("schedule", "linear")
    if kind not in SCHEDULE_TO_DIFFUSERS and betas is None:
        raise Unsupported(f"cannot export schedule {kind!r}")
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(d.get("timesteps", 1000)),
        "beta_start": float(d.get("beta_start", 1e-4)), "beta_end": float(d.get("beta_end", 0.02)),
        "beta_schedule": SCHEDULE_TO_DIFFUSERS.get(kind, "linear"),
        "trained_betas": None if kind in SCHEDULE_TO_DIFFUSERS else [float(b) for b in betas],
        "variance_type": "learned_range" if d.get("variance") == "learned" else "fixed_large",
        "clip_sample": True, "clip_sample_range": 1.0,
        "prediction_type": PREDICTION_TO_DIFFUSERS[d.get("prediction", "eps")],
        "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
        "timestep_spacing": "trailing", "steps_offset": 0,
        # trained_betas go out already rescaled
        "rescale_betas_zero_snr": bool(d.get("zero_terminal_snr", False)) and kind in SCHEDULE_TO_DIFFUSERS,
    }  # fmt: skip


def to_diffusers_state_dict(state: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename our U-Net's state dict into UNet2DModel's names: the inverse of ``convert_diffusers_state_dict``.

    Our fused q/k/v 1x1 conv is split into diffusers' to_q/to_k/to_v Linear layers.
    """
    n = config.num_res_blocks
    levels = len(config.channel_mults)
    top = {"conv_in": "conv_in", "time_mlp.0": "time_embedding.linear_1", "time_mlp.2": "time_embedding.linear_2",
           "norm_out": "conv_norm_out", "conv_out": "conv_out", "class_emb": "class_embedding"}  # fmt: skip
    res_names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
                 "skip": "conv_shortcut"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}

    def attention(prefix: str, name: str, param: str, value: torch.Tensor) -> None:
        if name == "norm":
            out[f"{prefix}.group_norm.{param}"] = value
            return
        if param == "weight":
            value = value.reshape(value.shape[:2])  # our 1x1 conv -> diffusers' Linear
        if name == "proj":
            out[f"{prefix}.to_out.0.{param}"] = value
        else:
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}.{part}.{param}"] = chunk.contiguous()

    def block(prefix: str, rest: str, value: torch.Tensor) -> None:
        kind, _, tail = rest.partition(".")
        name, _, param = tail.rpartition(".")
        if kind == "res":
            out[f"{prefix.format(kind='resnets')}.{res_names[name]}.{param}"] = value
        else:
            attention(prefix.format(kind="attentions"), name, param, value)

    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in ("down", "up"):
            index_text, _, rest = rest.partition(".")
            i = int(index_text)
            span = n + 1 if head == "down" else n + 2
            level, j = divmod(i, span)
            if head == "up":
                assert level < levels
            if rest.startswith("conv."):  # a Downsample / Upsample
                sampler = "downsamplers" if head == "down" else "upsamplers"
                out[f"{head}_blocks.{level}.{sampler}.0.{rest}"] = value
            else:
                block(f"{head}_blocks.{level}.{{kind}}.{j}", rest, value)
        elif head in ("mid_res1", "mid_res2"):
            name, _, param = rest.rpartition(".")
            out[f"mid_block.resnets.{int(head[-1]) - 1}.{res_names[name]}.{param}"] = value
        elif head == "mid_attn":
            name, _, param = rest.rpartition(".")
            attention("mid_block.attentions.0", name, param, value)
        else:
            base, _, param = key.rpartition(".")
            out[f"{top[base]}.{param}"] = value
    return out


def model_index(scheduler_class: str = "DDPMScheduler") -> dict:
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", scheduler_class], "unet": ["diffusers", UNET_CLASS]}  # fmt: skip


def write_pipeline(model, diffusion, ck, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write a loaded model (see :func:`models.load_for_sampling`) as a DDPMPipeline folder.

    A model with augmentation conditioning (``augment_dim``) is written without its augmentation layer,
    which adds exactly 0 at sampling. Returns ``{"out", "files", "unet", "scheduler"}``. ``out_dir`` must be new or empty unless
    ``overwrite``, which replaces only the files written here.
    """
    from .checkpoint import write_safetensors
    from .fileio import atomic_write_text, ensure_dir

    cfg = model.config
    layout = getattr(model, "layout", None)
    unet_cfg = unet_config(cfg, layout)
    custom = ck.diffusion.get("schedule") not in SCHEDULE_TO_DIFFUSERS
    sched_cfg = scheduler_config(ck.diffusion, diffusion.betas if custom else None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} is not empty; choose a new folder or pass --overwrite")
    # A model trained with non-leaking augmentation samples with the zero augmentation vector, for which its
    # bias-free aug_emb layer adds exactly 0 (unet.py): without the layer it is the same sampler's network.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("aug_emb.")}
    weights = to_diffusers_state_dict(state, cfg)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    meta = {"format": "pt", "diffuse.source": str(ck.path), "diffuse.step": str(ck.step)}
    ensure_dir(out / "unet")
    ensure_dir(out / "scheduler")
    files = {
        MODEL_INDEX: model_index(),
        f"unet/{CONFIG}": unet_cfg,
        f"scheduler/{SCHEDULER_CONFIG}": sched_cfg,
    }
    for name, obj in files.items():
        atomic_write_text(out / name, json.dumps(obj, indent=2, sort_keys=True) + "\n")
    write_safetensors(out / "unet" / WEIGHTS, weights, meta, canonical=True)  # the same model, the same bytes
    return {"out": out, "files": [*files, f"unet/{WEIGHTS}"], "unet": unet_cfg, "scheduler": sched_cfg,
            "source": ck.path, "step": ck.step}  # fmt: skip


# --- import -----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return obj


def _class_of(config_path: Path) -> str | None:
    try:
        obj = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj.get("_class_name") if isinstance(obj, dict) else None


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a diffusers pipeline folder (or its unet/ subfolder), not a diffuse run."""
    p = Path(path)
    if not p.is_dir() or (p / "model.safetensors").exists():
        return False
    if (p / MODEL_INDEX).is_file() or (p / "unet" / CONFIG).is_file():
        return True
    return (p / CONFIG).is_file() and _class_of(p / CONFIG) is not None


def _pipeline_root(path: Path) -> tuple[Path, Path, Path]:
    """(root, unet folder, scheduler folder) of a pipeline folder or of its unet/ subfolder."""
    if (path / CONFIG).is_file() and not (path / "unet").is_dir():
        cls = _class_of(path / CONFIG)
        if cls != UNET_CLASS:
            raise CheckpointError(f"{path} holds a diffusers {cls or 'model'}; diffuse loads {UNET_CLASS} "
                                  "(unconditional DDPM/DDIM pipelines)")  # fmt: skip
        if not (path.parent / "scheduler").is_dir():
            raise CheckpointError(f"{path} is a {UNET_CLASS} folder without a scheduler beside it; "
                                  "give the pipeline folder (with unet/ and scheduler/)")  # fmt: skip
        return path.parent, path, path.parent / "scheduler"
    if (path / MODEL_INDEX).is_file():
        index = _read_json(path / MODEL_INDEX)
        components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                      and v[1] is not None}  # fmt: skip
        unet_cls = components.get("unet", [None, None])[1]
        sched_cls = components.get("scheduler", [None, None])[1]
        extra = sorted(set(components) - {"unet", "scheduler"})
        what = index.get("_class_name", "pipeline")
        if unet_cls != UNET_CLASS or extra or sched_cls not in SCHEDULER_CLASSES:
            parts = [f"unet {unet_cls}" if unet_cls != UNET_CLASS else "",
                     f"scheduler {sched_cls}" if sched_cls not in SCHEDULER_CLASSES else "",
                     f"also {', '.join(extra)}" if extra else ""]  # fmt: skip
            raise CheckpointError(
                f"{path} is a diffusers {what} ({'; '.join(p for p in parts if p)}); diffuse loads unconditional "
                f"pipelines of a {UNET_CLASS} with a {' or '.join(SCHEDULER_CLASSES)} (DDPMPipeline, DDIMPipeline)"
            )
    for sub in ("unet", "scheduler"):
        if not (path / sub).is_dir():
            raise CheckpointError(f"{path} has no {sub}/ folder (is it a diffusers DDPM pipeline folder?)")
    return path, path / "unet", path / "scheduler"


def _weights_files(unet_dir: Path) -> list[Path]:
    """The safetensors weight files of a diffusers model folder; refuses pickles without opening them."""
    if (unet_dir / WEIGHTS).is_file():
        return [unet_dir / WEIGHTS]
    if (unet_dir / WEIGHTS_INDEX).is_file():
        index = _read_json(unet_dir / WEIGHTS_INDEX)
        shards = sorted(set(index.get("weight_map", {}).values())) if isinstance(index.get("weight_map"), dict) else []
        if not shards or any(not isinstance(s, str) or "/" in s or "\\" in s for s in shards):
            raise CheckpointError(f"{unet_dir / WEIGHTS_INDEX} has no valid weight_map")
        return [unet_dir / s for s in shards]
    variants = sorted(unet_dir.glob("diffusion_pytorch_model.*.safetensors"))
    if variants:  # e.g. the fp16 variant alone
        return variants[:1]
    pickles = [p.name for p in sorted(unet_dir.glob("*.bin"))]
    if pickles:
        root = unet_dir.parent
        raise CheckpointError(
            f"{unet_dir} holds only {', '.join(pickles)}, a PyTorch pickle; diffuse never unpickles files (that can "
            f"run arbitrary code), so it was not opened. If you trust it, convert it once with diffusers: python -c "
            f"\"from diffusers import DiffusionPipeline as P; P.from_pretrained('{root}').save_pretrained('{root}-safetensors')\""
        )
    raise CheckpointError(f"{unet_dir} has no {WEIGHTS}")


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from .checkpoint import sniff

    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        sniff(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open has no iterator)
                    tensors[k] = f.get_tensor(k).to(torch.float32)
        except Exception as err:  # safetensors raises its own error types for corrupt data
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{path} is corrupt or truncated: {msg}") from err
    return tensors


def unet_config_from_diffusers(cfg: dict, where: str = "unet/config.json") -> tuple[UNetConfig, DiffusersLayout]:
    """Our U-Net config and layout for a UNet2DModel config, or CheckpointError with the reason it has none."""

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{where}: this {UNET_CLASS} has {reason}, which diffuse's U-Net does not support")

    if cfg.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise CheckpointError(f"{where} describes a {cfg.get('_class_name')}; diffuse loads {UNET_CLASS} "
                              "(unconditional DDPM/DDIM pipelines)")  # fmt: skip
    c = {**_UNET_DEFAULTS, **cfg}
    for key, need, meaning in _UNET_FIXED:
        if c.get(key) != need and not (key == "time_embedding_dim" and c.get(key) == 4 * c["block_out_channels"][0]):
            raise refuse(f"{meaning} ({key}={c.get(key)!r})")
    if c["resnet_time_scale_shift"] not in TIME_SCALE_SHIFT:
        raise refuse(f"{c['resnet_time_scale_shift']!r} time conditioning (resnet_time_scale_shift)")
    try:
        widths = [int(w) for w in c["block_out_channels"]]
        down, up = list(c["down_block_types"]), list(c["up_block_types"])
        size = c["sample_size"]
        size = tuple(int(n) for n in size) if isinstance(size, (list, tuple)) else int(size)
        in_ch, out_ch = int(c["in_channels"]), int(c["out_channels"])
        layers = int(c["layers_per_block"])
        classes = int(c["num_class_embeds"] or 0)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{where} is not a valid {UNET_CLASS} config ({err})") from err
    if out_ch not in (in_ch, 2 * in_ch):
        raise refuse(f"{out_ch} output channels for {in_ch} input channels")
    if not widths or any(w % widths[0] for w in widths):
        raise refuse(f"widths {widths} that are not multiples of the first")
    if len(down) != len(widths) or len(up) != len(widths):
        raise CheckpointError(f"{where}: block_out_channels, down_block_types and up_block_types differ in length")
    bad = [b for b in down if b not in ("DownBlock2D", "AttnDownBlock2D")] + [
        b for b in up if b not in ("UpBlock2D", "AttnUpBlock2D")
    ]
    if bad:
        raise refuse(f"block type {bad[0]} (supported: DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D)")
    attn_down = [b == "AttnDownBlock2D" for b in down]
    attn_up = [b == "AttnUpBlock2D" for b in reversed(up)]
    if attn_down != attn_up:
        raise refuse("attention on different levels going down and up")
    null = classes > 1 and c.get("_diffuse_null_class") == classes - 1  # exported by diffuse: the last row is null
    head_dim = c["attention_head_dim"]
    if isinstance(head_dim, (list, tuple)):
        head_dim = head_dim[0] if len(set(head_dim)) == 1 else head_dim
    groups = c["norm_num_groups"]
    try:
        side = min(size) if isinstance(size, tuple) else size
        resolutions = [side // 2**i for i in range(len(widths))]
        config = UNetConfig(
            image_size=size, in_channels=in_ch, base_channels=widths[0],
            channel_mults=tuple(w // widths[0] for w in widths), num_res_blocks=layers,
            attention_resolutions=tuple(r for r, a in zip(resolutions, attn_down, strict=True) if a),
            dropout=float(c["dropout"]), num_heads=1, learned_variance=out_ch == 2 * in_ch, num_classes=classes - null, null_class=bool(null) or not classes,
            scale_shift=TIME_SCALE_SHIFT[c["resnet_time_scale_shift"]],
            head_channels=0 if head_dim is None else int(head_dim),
            norm_groups=0 if groups is None else int(groups),
        )  # fmt: skip
    except (ConfigError, Unsupported, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from err
    if groups is None:
        raise refuse("norm_num_groups=None")
    # Store what our defaults already say in their terms: one head count, groups as gcd(32, width).
    heads = {config.heads(w) for w in config.attention_widths}
    if config.head_channels and len(heads) == 1:
        config = dataclasses.replace(config, head_channels=0, num_heads=heads.pop())
    if _group_counts(dataclasses.replace(config, norm_groups=0)) == {config.norm_groups}:
        config = dataclasses.replace(config, norm_groups=0)
    if c["downsample_padding"] not in (0, 1):
        raise refuse(f"downsample_padding={c['downsample_padding']}")
    attn_groups = c["attn_norm_num_groups"]
    mid = (0 if config.scale_shift else int(groups)) if attn_groups is None else int(attn_groups)
    if mid and (config.attention_widths and (widths[-1] % mid)):
        raise refuse(f"attn_norm_num_groups={attn_groups}")
    layout = DiffusersLayout(flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=int(c["freq_shift"]),
                             downsample_padding=int(c["downsample_padding"]), norm_eps=float(c["norm_eps"]),
                             mid_attention_groups=None if mid == int(groups) else mid)  # fmt: skip
    if layout.freq_shift >= config.base_channels // 2:
        raise refuse(f"freq_shift={layout.freq_shift}")
    return config, layout


def diffusion_from_scheduler(cfg: dict, where: str = "scheduler/scheduler_config.json"):
    """(Diffusion, its config as a dict) for a DDPMScheduler/DDIMScheduler config, or CheckpointError."""
    from .config import DiffusionConfig
    from .diffusion import Diffusion
    from .schedules import rescale_zero_terminal_snr

    cls = cfg.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise CheckpointError(f"{where} describes a {cls}; diffuse reads {' and '.join(SCHEDULER_CLASSES)} configs")
    c = {**_SCHEDULER_DEFAULTS, **cfg}
    prediction = PREDICTION_FROM_DIFFUSERS.get(c["prediction_type"])
    if prediction is None:
        raise CheckpointError(f"{where}: prediction_type {c['prediction_type']!r} is not one of "
                              f"{', '.join(PREDICTION_FROM_DIFFUSERS)}")  # fmt: skip
    if c["variance_type"] not in VARIANCE_FROM_DIFFUSERS:
        raise CheckpointError(f"{where}: variance_type {c['variance_type']!r} is not one of "
                              f"{', '.join(VARIANCE_FROM_DIFFUSERS)}")  # fmt: skip
    trained = c["trained_betas"]
    kind = SCHEDULE_FROM_DIFFUSERS.get(c["beta_schedule"])
    if trained is None and kind is None:
        raise CheckpointError(f"{where}: beta_schedule {c['beta_schedule']!r} is not one of "
                              f"{', '.join(SCHEDULE_FROM_DIFFUSERS)}")  # fmt: skip
    try:
        dcfg = DiffusionConfig(
            schedule=kind or "linear", timesteps=int(len(trained) if trained is not None else c["num_train_timesteps"]),
            beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]),
            zero_terminal_snr=bool(c["rescale_betas_zero_snr"]), prediction=prediction,
            variance=VARIANCE_FROM_DIFFUSERS[c["variance_type"]],
        )  # fmt: skip
        if trained is not None:
            betas = torch.tensor([float(b) for b in trained], dtype=torch.float64)
            if not (betas.ndim == 1 and len(betas) and bool(((betas > 0) & (betas <= 1)).all())):
                raise ConfigError("trained_betas must be numbers in (0, 1]")
            if dcfg.zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
            diffusion = Diffusion(dcfg, betas=betas)
            as_dict = {**dcfg.to_dict(), "schedule": "trained_betas"}
        else:
            diffusion = Diffusion(dcfg)
            as_dict = dcfg.to_dict()
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from err
    return diffusion, as_dict


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a diffusers DDPM folder: (model, diffusion, checkpoint), as :func:`~.models.load_for_sampling`.

    The returned :class:`~.checkpoint.Checkpoint` has no tensors; its ``model`` and ``diffusion``
    dicts are our configs (``model["diffusers_layout"]`` holds a non-native layout).
    """
    from .checkpoint import Checkpoint, check_weights

    root, unet_dir, sched_dir = _pipeline_root(Path(path))
    config, layout = unet_config_from_diffusers(_read_json(unet_dir / CONFIG), f"{unet_dir / CONFIG}")
    sched_path = sched_dir / SCHEDULER_CONFIG
    diffusion, diffusion_dict = diffusion_from_scheduler(_read_json(sched_path), str(sched_path))
    if config.learned_variance != diffusion.learned_variance:
        raise CheckpointError(
            f"{root}: the U-Net has {config.out_channels} output channels for {config.in_channels} input channels "
            f"but the scheduler's variance_type is {'not ' if config.learned_variance else ''}learned_range"
        )
    files = _weights_files(unet_dir)
    weights = convert_diffusers_state_dict(_read_weights(files), config)
    with torch.device("meta"):
        skeleton = build_unet(config, layout)
    check_weights(skeleton.state_dict(), weights, files[0])
    model = build_unet(config, layout)
    model.load_state_dict(weights, strict=True)
    model_dict = config.to_dict()
    if not layout.native:
        model_dict["diffusers_layout"] = asdict(layout)
    ck = Checkpoint(path=root, kind="model", tensors={}, model=model_dict, diffusion=diffusion_dict,
                    extra={"format": "diffusers", "weights": [str(f) for f in files]})  # fmt: skip
    return model.to(device).eval(), diffusion.to(device), ck
