"""The U-Net: shapes, the DDPM parameter count, config validation, gradients, and two oracles
(a hand-written attention, and diffusers' UNet2DModel with the same weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffuse_cli.engine import device as devices
from diffuse_cli.engine.config import PRESETS, UNetConfig
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.unet import (
    AttentionBlock,
    UNet,
    convert_diffusers_state_dict,
    count_parameters,
    timestep_embedding,
)

# DDPM reports 35.7M parameters for its CIFAR-10 model (Ho et al. 2020, appendix B); diffusers'
# UNet2DModel in the same layout has exactly this many (counted with diffusers 0.42).
DDPM_CIFAR10_PARAMS = 35_746_307


def tiny(**kw) -> UNetConfig:
    base = dict(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), dropout=0.0)  # fmt: skip
    return UNetConfig(**{**base, **kw})


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers random weights, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize(
    "size,channels,mults,attn",
    [(8, 1, (1, 2), (4,)), (8, 3, (1, 2, 2), ()), (16, 1, (1, 2, 2), (8,)), (16, 3, (1, 2), (16, 8)),
     (32, 3, (1, 2, 2, 2), (16,)), (32, 1, (1, 1, 2), (8,))],
)  # fmt: skip
def test_output_shape(size, channels, mults, attn):
    cfg = UNetConfig(image_size=size, in_channels=channels, base_channels=32, channel_mults=mults,
                     num_res_blocks=1, attention_resolutions=attn)  # fmt: skip
    model = UNet(cfg).eval()
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert cfg.out_channels == channels
    assert out.shape == (2, cfg.out_channels, size, size)
    assert out.dtype == torch.float32


def test_ddpm_cifar10_parameter_count():
    model = UNet(UNetConfig(**PRESETS["ddpm-cifar10"]))
    n = count_parameters(model)
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert n == DDPM_CIFAR10_PARAMS


def test_default_config_is_the_ddpm_preset():
    assert UNetConfig() == UNetConfig(**PRESETS["ddpm-cifar10"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    size, channels = (16, 1) if name in ("tiny", "cpu") else (32, 3)
    model = UNet(UNetConfig.preset(name, size, channels))
    n = count_parameters(model)
    if name in ("tiny", "cpu"):
        assert 2e5 < n < 2e6
    elif name == "small":
        assert n < 10e6


def test_invalid_size_names_size_divisor_and_neighbours():
    with pytest.raises(ConfigError) as err:
        UNetConfig(image_size=30, channel_mults=(1, 2, 2, 2))
    msg = str(err.value)
    assert "30" in msg and "divisible by 8" in msg and "24" in msg and "32" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "kw,fragment",
    [(dict(in_channels=4), "in_channels"), (dict(in_channels=2), "in_channels"), (dict(base_channels=0), "base_channels"),
     (dict(num_res_blocks=-1), "num_res_blocks"), (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
     (dict(channel_mults=()), "channel_mults"), (dict(channel_mults=(1, 0)), "channel_mults"),
     (dict(attention_resolutions=(12,)), "attention_resolutions"), (dict(num_heads=3), "num_heads"),
     (dict(image_size=2.5), "image_size")],
)  # fmt: skip
def test_invalid_config_raises_config_error(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        UNetConfig(**kw)


def test_odd_widths_use_fewer_groups():
    for base in (32, 48, 40):
        model = UNet(tiny(base_channels=base, attention_resolutions=()))
        assert model(torch.randn(1, 1, 8, 8), torch.tensor([5])).shape == (1, 1, 8, 8)
        assert model.conv_in.out_channels == base


def test_config_dict_round_trip_through_json():
    cfg = UNetConfig(image_size=16, in_channels=1, base_channels=48, channel_mults=(1, 2, 3), num_res_blocks=1,
                     attention_resolutions=(8, 4), dropout=0.2, num_heads=2)  # fmt: skip
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mults"] == [1, 2, 3]
    assert UNetConfig.from_dict(d) == cfg
    assert UNetConfig.from_dict({**d, "from_the_future": 1}) == cfg
    assert isinstance(UNetConfig.from_dict(d).attention_resolutions, tuple)


def test_every_parameter_gets_a_gradient():
    model = UNet(tiny(num_res_blocks=2, channel_mults=(1, 2, 2), attention_resolutions=(8, 2), dropout=0.1))
    randomize_zero_init(model)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 800]))
    F.mse_loss(out, torch.randn_like(out)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_zero_init_predicts_zero_at_start():
    model = UNet(tiny())
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).abs().max() == 0


def test_same_seed_same_model_and_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = UNet(tiny(dropout=0.3))
        randomize_zero_init(model)
        x = torch.randn(3, 1, 8, 8)
        torch.manual_seed(7)  # dropout draws from the global generator in train mode
        outs.append(model(x, torch.tensor([0, 10, 999])))
    assert torch.equal(outs[0], outs[1])


def test_timestep_embedding_values():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    # First half cos, second half sin, frequencies 10000^(-i/4).
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert torch.equal(timestep_embedding(t.float(), 8), emb)


def naive_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017), written out with einsum."""
    B, C, H, W = x.shape
    heads, d = block.num_heads, C // block.num_heads
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    h = h.reshape(B, C, H * W)  # (B, C, N)
    w_qkv, b_qkv = block.qkv.weight[:, :, 0, 0], block.qkv.bias  # (3C, C), (3C,)
    q, k, v = (torch.einsum("oc,bcn->bon", w_qkv[i * C:(i + 1) * C], h) + b_qkv[i * C:(i + 1) * C, None] for i in range(3))  # fmt: skip
    q, k, v = (z.reshape(B, heads, d, H * W) for z in (q, k, v))
    logits = torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(d)
    a = torch.einsum("bhnm,bhdm->bhdn", logits.softmax(dim=-1), v).reshape(B, C, H * W)
    out = torch.einsum("oc,bcn->bon", block.proj.weight[:, :, 0, 0], a) + block.proj.bias[:, None]
    return x + out.reshape(B, C, H, W)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_naive_reference(heads, channels_last):
    torch.manual_seed(0)
    block = AttentionBlock(64, heads)
    randomize_zero_init(block)
    x = torch.randn(2, 64, 6, 5)
    expected = naive_attention(block, x)
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # the attention branch contributes


def test_channels_last_gives_same_output_and_gradients():
    torch.manual_seed(0)
    model = UNet(tiny(channel_mults=(1, 2, 2), attention_resolutions=(8,)))
    randomize_zero_init(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([4, 400])
    ref = model(x, t)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    devices.optimize_for_device(model, "cpu")
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x, t)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_make_optimizer_steps():
    p = torch.nn.Parameter(torch.ones(3))
    opt = devices.make_optimizer([p], lr=0.1)
    p.sum().backward()
    opt.step()
    assert torch.all(p < 1)


def test_bf16_autocast_runs_and_stays_close():
    torch.manual_seed(0)
    model = UNet(tiny()).eval()
    randomize_zero_init(model)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 500])
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_compiles_without_graph_breaks():
    # fullgraph=True turns any graph break into an error; the eager backend skips code generation.
    model = UNet(tiny(attention_resolutions=(8, 4)))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    torch.testing.assert_close(compiled(x, t), model(x, t))


def diffusers_twin(cfg: UNetConfig):
    """diffusers' UNet2DModel built from the config `diffuse export` writes for ``cfg``."""
    diffusers = pytest.importorskip("diffusers")
    from diffuse_cli.engine.diffusers_io import unet_config

    return diffusers.UNet2DModel.from_config(unet_config(cfg))


@pytest.mark.parametrize(
    "cfg",
    [UNetConfig(image_size=16, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), dropout=0.0),
     UNetConfig(image_size=16, in_channels=3, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2,
                attention_resolutions=(8,), dropout=0.0)],
)  # fmt: skip
def test_same_function_as_diffusers_unet2dmodel(cfg):
    """Oracle: with diffusers' weights renamed into ours, both networks compute the same function."""
    torch.manual_seed(0)
    theirs = diffusers_twin(cfg).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(convert_diffusers_state_dict(theirs.state_dict(), cfg), strict=True)
    x, t = torch.randn(2, cfg.in_channels, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=1e-4, atol=1e-5)


def test_parameter_count_matches_diffusers_for_ddpm_cifar10():
    cfg = UNetConfig()
    assert count_parameters(diffusers_twin(cfg)) == count_parameters(UNet(cfg))


def test_unconditional_unet_keeps_its_layout_and_refuses_labels():
    K = 3  # classes
    CFG = UNetConfig.preset("tiny", 8, 1, num_classes=K)
    torch.manual_seed(0)
    plain = UNet(UNetConfig.preset("tiny", 8, 1))
    torch.manual_seed(0)
    cond = UNet(CFG)
    assert plain.class_emb is None and plain.null_class == 0
    assert cond.class_emb.weight.shape == (K + 1, 4 * CFG.base_channels)  # K classes + the null class
    shared = plain.state_dict()
    # The embedding is created last, so the other weights of a seeded model are the unconditional ones.
    assert all(torch.equal(v, cond.state_dict()[k]) for k, v in shared.items())
    assert set(cond.state_dict()) - set(shared) == {"class_emb.weight"}
    assert UNetConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k != "num_classes"}).num_classes == 0
    with pytest.raises(ConfigError, match="num_classes"):
        UNetConfig(num_classes=-1)
