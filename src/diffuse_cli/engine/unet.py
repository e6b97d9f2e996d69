"""The DDPM U-Net: a Wide-ResNet style encoder/decoder with self-attention.

The layout follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models",
appendix B), itself a PixelCNN++ backbone (Salimans et al. 2017):

* the timestep ``t`` goes through a sinusoidal embedding (Vaswani et al. 2017,
  sec. 3.5) and a two-layer MLP of width ``4 * base_channels``;
* each resolution level has ``num_res_blocks`` residual blocks (GroupNorm, SiLU,
  3x3 conv, + a projection of the timestep embedding, GroupNorm, SiLU, dropout,
  3x3 conv), optionally each followed by a self-attention block;
* levels are joined by a stride-2 conv on the way down and by nearest-neighbour
  upsampling + 3x3 conv on the way up; every activation of the down path is
  concatenated to the input of one residual block of the up path;
* the middle runs residual block, attention, residual block at the lowest
  resolution; the output is GroupNorm, SiLU, 3x3 conv.

Like DDPM, the last conv of every residual block, the output projection of every
attention block and the output conv start at zero, so each block starts as the
identity and the network starts by predicting 0.

A class-conditional model (``num_classes`` K > 0) also learns one embedding vector per
class plus a K-th "null" class, added to the timestep embedding after its MLP (as
improved-diffusion's ``label_emb`` and diffusers' ``class_embedding`` do). Training
replaces labels by the null class now and then, so the same network is the conditional
and the unconditional model that classifier-free guidance combines (Ho & Salimans 2022).

The rest of the DDPM family of diffusers' ``UNet2DModel`` is in the config too (all off
by default, so every preset computes what it always did): one GroupNorm group count for
every norm (``norm_groups``), adaptive group norm time conditioning (``scale_shift``),
a head width rather than a head count (``head_channels``), a class embedding without
the null row (``null_class=False``, as diffusers' ``num_class_embeds``) and non-square
images (``image_size=(H, W)``: convolutions, resampling and attention do not care).

A model trained with non-leaking augmentation (``augment_dim`` > 0; Karras et al. 2022,
appendix C.4, see ``augment.py``) also reads the augmentation vector through a bias-free linear
layer added to the sinusoidal timestep features, before the time MLP (where EDM's ``map_augment``
adds it), so the vector reaches every block through the MLP's nonlinearity. Sampling passes no
vector, which is the zero vector ("not augmented"): the layer then adds exactly 0, so such a model
samples as the same network without the layer (what ``diffuse export`` writes).

Shapes: ``x`` is (B, C, H, W) float, ``t`` is (B,) int64 (or float) timesteps in
``[0, T)``, ``y`` is None or (B,) int64 labels in ``[0, K]`` (K = null); the output is
(B, out_channels, H, W). The module layout matches
diffusers' ``UNet2DModel`` with the same widths, so parameter counts agree
(35,746,307 for the DDPM CIFAR-10 configuration).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .errors import CheckpointError

# Sinusoidal embedding period, as in Vaswani et al. 2017 and DDPM.
_MAX_PERIOD = 10_000.0


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _groups(channels: int, groups: int = 0) -> int:
    # DDPM normalises with 32 groups; other widths take the largest power of two dividing both (48 -> 16, 3 -> 1).
    # A config's norm_groups (diffusers' norm_num_groups) fixes one count for every norm instead.
    return groups or math.gcd(32, channels)


def _norm(channels: int, groups: int = 0) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels, groups), channels, eps=1e-5)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, sec. 3.5): (B,) -> (B, dim) float32.

    Frequencies are geometric from 1 down to 1/10000; the first half of the output
    holds the cosines, the second the sines (the layout of diffusers' ``Timesteps``
    with ``flip_sin_to_cos=True``). Built on ``t``'s device: no host round trip.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(_MAX_PERIOD) / half))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Wide-ResNet block with the timestep added after the first conv (DDPM appendix B).

    With ``scale_shift`` the timestep instead scales and shifts the normalised activation,
    norm(h) (1 + s) + b (adaptive group norm, Dhariwal & Nichol 2021, sec. 3; improved-diffusion's
    ``use_scale_shift_norm``, diffusers' ``resnet_time_scale_shift="scale_shift"``).
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int = 0, scale_shift: bool = False
    ):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(emb)[:, :, None, None]  # emb is already SiLU'd once by the UNet
        if self.scale_shift:  # fixed at construction: no graph break under torch.compile
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    Computes softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017) through
    ``F.scaled_dot_product_attention``. The projections are 1x1 convolutions, the
    "NIN" layers of DDPM's code: the same matmul as a Linear over positions, but on
    CPU they run in oneDNN rather than the BLAS behind ``nn.Linear`` (MKL), which on
    our AMD benchmark machine is about 2.4x faster for these shapes and made the
    whole training step 5% faster (``benchmarks/train_cpu.py``). q, k, v come from one
    fused (C -> 3C) projection: the parameter count of diffusers' to_q/to_k/to_v.
    """

    def __init__(self, channels: int, num_heads: int, groups: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, 3C, H, W) -> (B, HW, 3, heads, C / heads); free when x is channels_last, one copy otherwise.
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, HW, C / heads) -> (B, C, H, W) with channels_last strides (free for one head).
        h = h.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv (DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _ResAttn(nn.Module):
    """A residual block, optionally followed by attention; one stop of the U."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:  # fixed at construction: no graph break under torch.compile
            x = self.attn(x)
        return x


class UNet(nn.Module):
    """DDPM's noise-prediction U-Net (Ho et al. 2020, appendix B). See the module docstring."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config or UNetConfig()
        ch = c.base_channels
        emb_dim = 4 * ch
        g = c.norm_groups

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_dim, c.dropout, g, c.scale_shift)

        def attention(width: int) -> AttentionBlock:
            return AttentionBlock(width, c.heads(width), g)

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        # Down path; `skip_ch` records the width of every activation kept for the up path.
        self.down = nn.ModuleList()
        skip_ch = [ch]
        cur = ch
        for level, (mult, size) in enumerate(zip(c.channel_mults, c.resolutions, strict=True)):
            out = ch * mult
            for _ in range(c.num_res_blocks):
                attn = attention(out) if size in c.attention_resolutions else None
                self.down.append(_ResAttn(res(cur, out), attn))
                cur = out
                skip_ch.append(cur)
            if level < len(c.channel_mults) - 1:
                self.down.append(Downsample(cur))
                skip_ch.append(cur)

        self.mid_res1 = res(cur, cur)
        self.mid_attn = attention(cur)
        self.mid_res2 = res(cur, cur)

        # Up path: one more block per level than on the way down, each eating one skip.
        self.up = nn.ModuleList()
        for level in reversed(range(len(c.channel_mults))):
            out = ch * c.channel_mults[level]
            size = c.resolutions[level]
            for _ in range(c.num_res_blocks + 1):
                attn = attention(out) if size in c.attention_resolutions else None
                self.up.append(_ResAttn(res(cur + skip_ch.pop(), out), attn))
                cur = out
            if level > 0:
                self.up.append(Upsample(cur))
        assert not skip_ch

        self.norm_out = _norm(cur, g)
        self.conv_out = _zero(nn.Conv2d(cur, c.out_channels, 3, padding=1))
        # Created last, so an unconditional model draws exactly the initial weights it always did.
        self.class_emb = nn.Embedding(c.num_classes + c.null_class, emb_dim) if c.num_classes else None
        # Also last. It reads into the time MLP's input, as EDM's ``map_augment`` (Karras et al. 2022).
        self.aug_emb = nn.Linear(c.augment_dim, c.base_channels, bias=False) if c.augment_dim else None

    @property
    def null_class(self) -> int:
        """The label meaning "no class" (the unconditional model): K for a K-class model."""
        return self.config.num_classes

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """The sinusoidal features of ``t`` that the time MLP reads (a converted model may lay them out otherwise)."""
        return timestep_embedding(t, self.config.base_channels)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, augment: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the network output for noisy images ``x`` (B, C, H, W) at timesteps ``t`` (B,).

        ``y`` (B,) int64 in [0, K] picks the class of each image (K = :attr:`null_class`); None means
        the null class. An unconditional model takes no ``y``. ``augment`` (B, augment_dim): how each
        image was augmented in training; None (sampling) means not augmented, the zero vector.
        """
        feats = self.time_features(t).to(x.dtype)
        if augment is not None and self.aug_emb is not None:  # None adds aug_emb(0) = 0 exactly: skipped
            feats = feats + self.aug_emb(augment.to(feats.dtype))
        assert augment is None or self.aug_emb is not None, "this U-Net has no augmentation conditioning"
        emb = self.time_mlp(feats)
        if self.class_emb is not None:  # fixed at construction: no graph break under torch.compile
            assert y is not None or self.config.null_class, "a model without a null class needs class labels"
            if y is None:
                y = torch.full(t.shape, self.null_class, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(y).to(emb.dtype)
        else:
            assert y is None, "an unconditional U-Net takes no class labels"
        # Every block applies SiLU before its own projection (DDPM); doing it once here is the same math.
        emb = F.silu(emb)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- weights from diffusers -------------------------------------------------------------
_TOP_NAMES = {
    "conv_in": "conv_in",
    "time_embedding.linear_1": "time_mlp.0",
    "time_embedding.linear_2": "time_mlp.2",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
    "class_embedding": "class_emb",
}
_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "skip"}  # fmt: skip
# Older diffusers releases named the attention layers query/key/value/proj_attn.
_ATTN_NAMES = {"group_norm": "norm", "to_out.0": "proj", "proj_attn": "proj"}
_QKV_INDEX = {"to_q": 0, "to_k": 1, "to_v": 2, "query": 0, "key": 1, "value": 2}
_BLOCK_KEY = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)\.(weight|bias)"
)
_MID_KEY = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)\.(weight|bias)")


def convert_diffusers_state_dict(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DModel`` state dict (DDPM layout) into :class:`UNet`'s names.

    The diffusers model must have the layout of ``config``: ``block_out_channels`` =
    base * mults, ``layers_per_block`` = num_res_blocks, ``AttnDownBlock2D`` /
    ``AttnUpBlock2D`` exactly at ``attention_resolutions``, default time embedding
    (``flip_sin_to_cos=True``, ``freq_shift=0``) and one attention head per
    ``num_heads``. Separate q/k/v weights are stacked into our fused projection.
    Load the result with ``model.load_state_dict(..., strict=True)`` to check the match.
    """
    n = config.num_res_blocks
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}

    def layer(prefix: str, kind: str, name: str, param: str, value: torch.Tensor) -> None:
        if kind == "attentions" and param == "weight" and name != "group_norm":
            value = value.reshape(*value.shape[:2], 1, 1)  # Linear (or 1x1 conv) -> our 1x1 conv
        if kind == "resnets" and name in _RES_NAMES:
            out[f"{prefix}.{_RES_NAMES[name]}.{param}"] = value
        elif kind == "attentions" and name in _ATTN_NAMES:
            out[f"{prefix}.{_ATTN_NAMES[name]}.{param}"] = value
        elif kind == "attentions" and name in _QKV_INDEX:
            qkv.setdefault(f"{prefix}.qkv.{param}", [None] * 3)[_QKV_INDEX[name]] = value
        elif kind.endswith("samplers") and name == "conv":
            out[f"{prefix}.conv.{param}"] = value
        else:
            raise CheckpointError(f"unexpected layer {kind}.{name} in a diffusers UNet2DModel state dict")

    for key, value in state_dict.items():
        if m := _BLOCK_KEY.fullmatch(key):
            side, level, kind, j, name, param = m.groups()
            level, j = int(level), int(j)
            if side == "down":
                index = level * (n + 1) + (n if kind == "downsamplers" else j)
            else:
                index = level * (n + 2) + (n + 1 if kind == "upsamplers" else j)
            prefix = f"{side}.{index}"
            if kind == "resnets":
                prefix += ".res"
            elif kind == "attentions":
                prefix += ".attn"
            layer(prefix, kind, name, param, value)
        elif m := _MID_KEY.fullmatch(key):
            kind, j, name, param = m.groups()
            prefix = "mid_attn" if kind == "attentions" else f"mid_res{int(j) + 1}"
            layer(prefix, kind, name, param, value)
        else:
            base, _, param = key.rpartition(".")
            if base not in _TOP_NAMES:
                raise CheckpointError(f"unexpected key {key!r} in a diffusers UNet2DModel state dict")
            out[f"{_TOP_NAMES[base]}.{param}"] = value
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            raise CheckpointError(f"incomplete q/k/v weights for {key} in a diffusers UNet2DModel state dict")
        out[key] = torch.cat(parts, dim=0)
    return out
