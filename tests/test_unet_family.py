"""The DDPM family of diffusers' UNet2DModel loads into our U-Net and computes the same function.

Oracle: diffusers' own UNet2DModel (a test-only dependency) with random weights, on the real config.json
files of the public DDPM checkpoints (tests/data/diffusers/) and on the settings the family adds: one
GroupNorm group count, scale-shift time conditioning, a head width, class embeddings, non-square images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import diffusers_io, models
from diffuse_cli.engine.config import UNetConfig
from diffuse_cli.engine.diffusion import DiffusionConfig
from diffuse_cli.engine.errors import CheckpointError, ConfigError
from diffuse_cli.engine.unet import UNet

diffusers = pytest.importorskip("diffusers")

CONFIGS = Path(__file__).parent / "data" / "diffusers"


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Perturb every weight (zero-initialised layers included) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def save_pipeline(folder: Path, unet) -> Path:
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50)).save_pretrained(folder)
    return folder


def same_function(theirs, ours, labels=None) -> None:
    h, w = ours.config.hw
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, ours.config.in_channels, h, w, generator=g), torch.tensor([0, 41])
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = ours(x, t) if labels is None else ours(x, t, labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-5)
    assert expected.abs().max() > 0.05  # a real signal, not two zero outputs


def shrunk(cfg: dict) -> dict:
    """The same structure (levels, attention levels, groups, heads, layout) at a quarter of the width and
    32 px, so a 113M-parameter 256x256 model runs in a second on a CPU."""
    size = cfg["sample_size"]
    return {**cfg, "block_out_channels": [w // 4 for w in cfg["block_out_channels"]],
            "sample_size": 32 if isinstance(size, int) else [32, 32 * size[1] // size[0]]}  # fmt: skip


PUBLIC = sorted(p.stem for p in CONFIGS.glob("*.json"))


@pytest.mark.parametrize("name", PUBLIC)
def test_public_ddpm_configs_load_and_match_diffusers(tmp_path, name):
    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    full, _ = diffusers_io.unet_config_from_diffusers(cfg)  # the real size parses
    assert full.hw == (cfg["sample_size"],) * 2 and full.base_channels == cfg["block_out_channels"][0]
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel.from_config(shrunk(cfg)).eval()
    randomize(theirs)
    ours, _, ck = models.load_for_sampling(save_pipeline(tmp_path / "pipe", theirs))
    same_function(theirs, ours)


HELD_OUT = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=2, norm_num_groups=8)  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # the held-out case: widths 32/64, attention at the second level, 8 groups
        dict(resnet_time_scale_shift="scale_shift"),  # AdaGN; its middle attention has no norm
        dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4),
        dict(attn_norm_num_groups=16),
        dict(attention_head_dim=16, block_out_channels=(32, 64), down_block_types=("AttnDownBlock2D",) * 2,
             up_block_types=("AttnUpBlock2D",) * 2),  # 2 heads at 32 channels, 4 at 64
        dict(sample_size=(16, 24)),
        dict(sample_size=(24, 16), in_channels=1, out_channels=1, norm_num_groups=16),
        dict(num_class_embeds=5),
    ],
    ids=["groups8", "scale-shift", "scale-shift-attn-groups", "attn-groups", "head-width", "16x24", "24x16-grey",
         "classes"],
)  # fmt: skip
def test_family_members_load_and_match_diffusers(tmp_path, kw):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(**{"sample_size": 16, **HELD_OUT, **kw}).eval()
    randomize(theirs)
    ours, _, ck = models.load_for_sampling(save_pipeline(tmp_path / "pipe", theirs))
    labels = torch.tensor([4, 0]) if "num_class_embeds" in kw else None
    same_function(theirs, ours, labels)
    size = kw.get("sample_size", 16)
    assert ours.config.hw == (size if isinstance(size, tuple) else (size, size))
    # ... and exports again: diffusers reads our folder back as the same function
    models.export(tmp_path / "pipe", tmp_path / "again")
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "again" / "unet").eval()
    same_function(back, ours, labels)


def test_imported_classes_have_no_null_row_and_need_a_class(tmp_path):
    torch.manual_seed(0)
    theirs = diffusers.UNet2DModel(sample_size=16, num_class_embeds=3, **HELD_OUT).eval()
    ours, diffusion, _ = models.load_for_sampling(save_pipeline(tmp_path / "pipe", theirs))
    assert ours.config.num_classes == 3 and not ours.config.null_class and ours.class_emb.num_embeddings == 3
    from diffuse_cli.engine.generate import generate

    with pytest.raises(ConfigError, match="null class"):
        generate(ours, diffusion, 2, (3, 16, 16), steps=2, classes=torch.tensor([0, 1]), guidance=2.0)
    with pytest.raises(ConfigError, match="class"):
        generate(ours, diffusion, 2, (3, 16, 16), steps=2)
    x = generate(ours, diffusion, 2, (3, 16, 16), steps=2, classes=torch.tensor([0, 2]), guidance=1.0)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_our_conditional_model_exports_with_its_null_class_and_comes_back(tmp_path):
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), dropout=0.0, num_classes=3)  # fmt: skip
    model = UNet(cfg).eval()
    randomize(model)
    src = ckpt.save(tmp_path / "m.safetensors", model.state_dict(), kind="model", model=cfg.to_dict(),
                    diffusion=DiffusionConfig(timesteps=10).to_dict())  # fmt: skip
    models.export(src, tmp_path / "out")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    assert theirs.config.num_class_embeds == 4
    same_function(theirs, model, torch.tensor([3, 1]))  # 3: the null class
    back, _, _ = models.load_for_sampling(tmp_path / "out")
    assert back.config == cfg


@pytest.mark.parametrize(
    "kw,fragment",
    [(dict(resnet_time_scale_shift="spatial"), "spatial"),
     (dict(class_embed_type="timestep"), "class_embed_type"),
     (dict(norm_num_groups=12), "norm_groups 12"),
     (dict(attention_head_dim=24), "head_channels 24")],
)  # fmt: skip
def test_what_is_outside_the_family_is_refused_by_name(kw, fragment):
    cfg = {"_class_name": "UNet2DModel", "sample_size": 16, **HELD_OUT, **kw}
    with pytest.raises(CheckpointError, match=fragment):
        diffusers_io.unet_config_from_diffusers(cfg)


# sum and sum of |.| of a randomised preset's output (below), computed by the U-Net as it was before the family
# grew (commit b0261d0) with the code of this test: every preset must compute the same numbers.
PINNED = {
    ("cpu", 8, 1): (-2.1007287614047527, 57.98985644057393),
    ("cpu", 16, 3): (8.44644514285028, 550.9552709180862),
    ("ddpm-cifar10", 8, 1): (-57.80231121554971, 88.13007541373372),
    ("small", 8, 1): (4.605311309918761, 58.43147071264684),
    ("small", 16, 3): (453.25526061467826, 872.8278680872172),
    ("tiny", 8, 1): (13.59397353604436, 44.77907542511821),
    ("tiny", 16, 3): (-73.15130113437772, 608.7897065170109),
}


@pytest.mark.parametrize("key", sorted(PINNED), ids=lambda k: f"{k[0]}-{k[1]}px-{k[2]}ch")
def test_presets_compute_what_they_did(key):
    """The new settings default to off, so a preset builds the same modules, draws the same initial
    weights (seed 0) and computes the same function as before."""
    name, size, ch = key
    cfg = UNetConfig.preset(name, size, ch)
    torch.manual_seed(0)
    m = UNet(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        x = torch.randn(2, ch, size, size, generator=g)
        y = m(x, torch.tensor([3, 700])).double()
    assert (float(y.sum()), float(y.abs().sum())) == pytest.approx(PINNED[key], rel=1e-5, abs=1e-4)


def test_non_square_config_round_trips_and_checks_both_sides():
    cfg = UNetConfig(image_size=(24, 40), base_channels=32, channel_mults=(1, 2, 2), attention_resolutions=(12,))
    assert cfg.resolutions == (24, 12, 6) and UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert UNetConfig(image_size=(16, 16)).image_size == 16  # a square pair is a side
    with pytest.raises(ConfigError, match="divisible by 4"):
        UNetConfig(image_size=(24, 42), base_channels=32, channel_mults=(1, 2, 2), attention_resolutions=())
    x = UNet(cfg)(torch.randn(1, 3, 24, 40), torch.tensor([5]))
    assert x.shape == (1, 3, 24, 40)
