"""diffusers folders in and out, checked against diffusers itself (a test-only dependency).

Oracles: diffusers' own UNet2DModel, DDPMScheduler and DDIMPipeline on the same weights and noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import diffusers_io, models, samplers
from diffuse_cli.engine.config import AUGMENT_DIM, DiffusionConfig, UNetConfig
from diffuse_cli.engine.diffusion import Diffusion
from diffuse_cli.engine.errors import CheckpointError, OutputError, Unsupported
from diffuse_cli.engine.generate import image_generators
from diffuse_cli.engine.unet import UNet, convert_diffusers_state_dict, timestep_embedding
from helpers import invoke as run
from helpers import one_line_error

diffusers = pytest.importorskip("diffusers")


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Perturb every weight (zero-initialised layers included) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def unet2d(size=16, channels=3, widths=(32, 64), attn=(False, True), layers=1, **kw):
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
        layers_per_block=layers, down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)), **kw,
    ).eval()  # fmt: skip
    randomize(m)
    return m


def save_pipeline(folder: Path, unet, **scheduler_kw) -> Path:
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler_kw)).save_pretrained(folder)
    return folder


# The DDPM authors' converted checkpoints (google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256)
# use this older layout; their config.json lists exactly these values.
DDPM_AUTHORS = dict(flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None)


@pytest.mark.parametrize(
    "kw",
    [dict(attention_head_dim=None), DDPM_AUTHORS, dict(attention_head_dim=16),
     dict(attention_head_dim=None, widths=(32, 64, 64), attn=(False, True, False), layers=2, channels=1)],
    ids=["default", "ddpm-authors", "4-heads", "three-levels-grey"],
)  # fmt: skip
def test_diffusers_folder_is_the_same_function(tmp_path, kw):
    theirs = unet2d(**kw)
    folder = save_pipeline(tmp_path / "pipe", theirs, num_train_timesteps=100)
    ours, diffusion, ck = models.load_for_sampling(folder)
    assert isinstance(ours, diffusers_io.DiffusersUNet) == (kw is DDPM_AUTHORS)
    c = theirs.config.in_channels
    x, t = torch.randn(3, c, 16, 16), torch.tensor([0, 37, 99])
    with torch.no_grad():
        expected = theirs(x, t).sample
        torch.testing.assert_close(ours(x, t), expected, rtol=1e-4, atol=2e-5)
    assert expected.abs().max() > 0.1  # a real signal, not two zero outputs
    assert ck.model["in_channels"] == c and ck.model["image_size"] == 16 and diffusion.num_timesteps == 100


def test_native_layout_subclass_computes_unet_forward():
    """DiffusersUNet only changes the time features: with our own layout it must agree with UNet exactly."""
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), dropout=0.0)  # fmt: skip
    plain = UNet(cfg).eval()
    randomize(plain)
    twin = diffusers_io.DiffusersUNet(cfg, diffusers_io.DiffusersLayout()).eval()
    twin.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t), plain(x, t), rtol=1e-6, atol=1e-6)
    emb = diffusers_io.diffusers_timestep_embedding(t, 32, diffusers_io.DiffusersLayout())
    torch.testing.assert_close(emb, timestep_embedding(t, 32), rtol=1e-6, atol=1e-5)


def test_state_dict_renaming_round_trips():
    cfg = UNetConfig(image_size=16, in_channels=3, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2,
                     attention_resolutions=(8, 4), dropout=0.0, num_heads=2)  # fmt: skip
    state = UNet(cfg).state_dict()
    back = convert_diffusers_state_dict(diffusers_io.to_diffusers_state_dict(state, cfg), cfg)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k


# --- sampling a diffusers folder with `diffuse sample` ------------------------------------------------
def test_sample_cli_ddim_matches_diffusers_ddim_pipeline(tmp_path):
    """`diffuse sample` on a save_pretrained folder = DDIMPipeline from the same noise (DDIM, eta 0, no clipping).

    With steps = T every grid is the full one (T - 1, ..., 0), so our default DDIM spacing and
    diffusers' "leading" visit the same timesteps. Tolerance: every pixel within 1/255 (the two
    round float images to 8 bits; float32 differences can flip a rounding), 99% identical.
    """
    T, seed, num = 20, 3, 4
    theirs = unet2d()
    folder = save_pipeline(tmp_path / "pipe", theirs, num_train_timesteps=T, clip_sample=False)
    r = run("sample", folder, "--sampler", "ddim", "--steps", T, "--eta", 0, "--no-clip", "--num", num,
            "--seed", seed, "--out", tmp_path / "ours", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    ours = np.stack([np.asarray(Image.open(tmp_path / "ours" / f"{i:04d}.png")) for i in range(num)]).astype(int)
    pipe = diffusers.DDIMPipeline(unet=theirs, scheduler=diffusers.DDIMScheduler.from_pretrained(folder / "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    gens = image_generators(seed, 0, num, "cpu")  # one stream per image, as `diffuse sample` seeds them
    out = pipe(batch_size=num, generator=gens, eta=0.0, num_inference_steps=T, output_type="np").images
    expected = (out * 255).round().astype(int)
    assert ours.shape == expected.shape
    diff = np.abs(ours - expected)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    assert expected.std() > 10  # images with content, not a saturated constant


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_uniform_grid_matches_diffusers_trailing(tmp_path, prediction):
    """Fewer steps than T: our "uniform" grid is diffusers' "trailing" one. Float outputs within 2e-5."""
    T, steps, seed, num = 100, 10, 1, 3
    theirs = unet2d()
    folder = save_pipeline(tmp_path / "pipe", theirs, num_train_timesteps=T, clip_sample=False,
                           prediction_type=prediction, beta_schedule="squaredcos_cap_v2")  # fmt: skip
    model, diffusion, _ = models.load_for_sampling(folder)
    x_T = torch.randn((num, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
    ours = samplers.ddim(model, diffusion, x_T, steps=steps, eta=0.0, spacing="uniform", clip_x0=False)
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", timestep_spacing="trailing")
    pipe = diffusers.DDIMPipeline(unet=theirs, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=num, generator=torch.Generator().manual_seed(seed), eta=0.0, num_inference_steps=steps,
               output_type="np").images  # fmt: skip
    expected = torch.from_numpy(out).permute(0, 3, 1, 2).double()
    got = (ours.double() / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert expected.std() > 0.05


# --- export ---------------------------------------------------------------------------------------------
def test_exported_run_loads_in_ddpm_pipeline(tmp_path, shared_run):
    out = tmp_path / "exported"
    r = run("export", shared_run, out)
    assert r.exit_code == 0, r.output
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json"}  # fmt: skip
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    ours, diffusion, _ = models.load_for_sampling(shared_run)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((3, 1, 8, 8), generator=g), torch.tensor([0, 17, 49])
    with torch.no_grad():
        expected = ours(x, t)
        torch.testing.assert_close(pipe.unet(x, t).sample, expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 0  # four steps of training moved the zero-initialised output layer
    s = pipe.scheduler
    assert isinstance(s, diffusers.DDPMScheduler) and s.config.num_train_timesteps == 50
    assert s.config.prediction_type == "epsilon" and s.config.variance_type == "fixed_large"
    torch.testing.assert_close(s.betas.double(), diffusion.betas, rtol=1e-6, atol=0)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_exported_random_models_match(tmp_path):
    """Several shapes (heads, attention levels, RGB), with every weight random: diffusers computes our function."""
    for i, kw in enumerate([
        dict(image_size=16, in_channels=3, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2,
             attention_resolutions=(8,), num_heads=4),
        dict(image_size=8, in_channels=1, base_channels=64, channel_mults=(1, 1), num_res_blocks=1,
             attention_resolutions=(8, 4)),
    ]):  # fmt: skip
        cfg = UNetConfig(dropout=0.0, **kw)
        model = UNet(cfg)
        randomize(model, seed=i)
        src = ckpt.save(tmp_path / f"m{i}.safetensors", model.state_dict(), kind="model", model=cfg.to_dict(),
                        diffusion=DiffusionConfig(schedule="sigmoid", timesteps=30, prediction="v").to_dict())  # fmt: skip
        out = tmp_path / f"out{i}"
        models.export(src, out)
        theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
        x, t = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size), torch.tensor([1, 29])
        with torch.no_grad():
            torch.testing.assert_close(theirs(x, t).sample, model.eval()(x, t), rtol=1e-4, atol=2e-5)
        assert diffusers.DDPMScheduler.from_pretrained(out / "scheduler").config.prediction_type == "v_prediction"


def test_augmented_model_exports_as_its_sampling_network(tmp_path):
    """Sampling feeds the zero augmentation vector, for which the bias-free aug layer adds exactly 0: diffusers'
    model without the layer computes what our sampler calls (and differs from a nonzero vector's output)."""
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), dropout=0.0, augment_dim=AUGMENT_DIM)  # fmt: skip
    model = UNet(cfg).eval()
    randomize(model, seed=3)
    src = ckpt.save(tmp_path / "m.safetensors", model.state_dict(), kind="model", model=cfg.to_dict(),
                    diffusion=DiffusionConfig(timesteps=20).to_dict())  # fmt: skip
    r = run("export", src, tmp_path / "out")
    assert r.exit_code == 0, r.output
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet").eval()
    x, t, a = torch.randn(2, 1, 8, 8), torch.tensor([0, 19]), torch.full((2, AUGMENT_DIM), 0.1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t).sample, model(x, t), rtol=1e-4, atol=2e-5)
        assert (model(x, t, augment=a) - model(x, t)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["linear", "quadratic", "cosine", "sigmoid"])
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_schedules_round_trip_to_identical_betas(kind, zero_terminal_snr):
    cfg = DiffusionConfig(schedule=kind, timesteps=200, beta_start=3e-4, beta_end=0.03,
                          zero_terminal_snr=zero_terminal_snr, prediction="x0")  # fmt: skip
    ours = Diffusion(cfg)
    sched_cfg = json.loads(json.dumps(diffusers_io.scheduler_config(cfg.to_dict())))
    back, back_dict = diffusers_io.diffusion_from_scheduler(sched_cfg)
    assert back_dict == cfg.to_dict()
    assert torch.equal(back.betas, ours.betas)  # identical: the same config names the same betas
    theirs = diffusers.DDPMScheduler.from_config(sched_cfg)  # diffusers' own formulas, in float32
    assert theirs.config.prediction_type == "sample"
    if not zero_terminal_snr:
        torch.testing.assert_close(theirs.betas.double(), ours.betas, rtol=2e-6, atol=1e-9)
        return
    # Its rescaling runs in float32, where 1 - alpha loses ~1e-4 of a small beta and the last ratios of
    # tiny alpha_bars more: compare the noise levels alpha_bar there, and the formula itself in float64.
    torch.testing.assert_close(theirs.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5, atol=1e-7)
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    plain = Diffusion(DiffusionConfig(**{**cfg.to_dict(), "zero_terminal_snr": False})).betas
    torch.testing.assert_close(rescale_zero_terminal_snr(plain), ours.betas, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_diffusers_scheduler_configs_give_their_betas(tmp_path, schedule):
    classes = [diffusers.DDPMScheduler] + ([diffusers.DDIMScheduler] if schedule != "sigmoid" else [])  # DDIM lacks it
    for cls in classes:
        s = cls(num_train_timesteps=300, beta_start=2e-4, beta_end=0.025, beta_schedule=schedule)
        s.save_config(tmp_path / cls.__name__)
        cfg = json.loads((tmp_path / cls.__name__ / "scheduler_config.json").read_text())
        diffusion, _ = diffusers_io.diffusion_from_scheduler(cfg)
        torch.testing.assert_close(diffusion.betas, s.betas.double(), rtol=2e-6, atol=1e-9)


# --- refusals --------------------------------------------------------------------------------------------
def test_bin_only_folder_refused_without_unpickling(tmp_path, monkeypatch):
    folder = save_pipeline(tmp_path / "pipe", unet2d(), num_train_timesteps=10)
    (folder / "unet" / diffusers_io.WEIGHTS).unlink()
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))

    def forbidden(*a, **k):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    msg = one_line_error(run("sample", folder, "--out", tmp_path / "s", "--device", "cpu"))
    assert "diffusion_pytorch_model.bin" in msg and "pickle" in msg and "save_pretrained" in msg
    msg = one_line_error(run("eval", folder, "builtin:digits", "--device", "cpu"))
    assert "not opened" in msg
    assert not marker.exists()


def test_other_model_classes_are_refused_by_name(tmp_path):
    folder = save_pipeline(tmp_path / "pipe", unet2d(), num_train_timesteps=10)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DConditionModel"]}))
    msg = one_line_error(run("sample", folder, "--out", tmp_path / "s"))
    assert "UNet2DConditionModel" in msg and "UNet2DModel" in msg
    (folder / "model_index.json").write_text(json.dumps(index))
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "_class_name": "PNDMScheduler"}))
    with pytest.raises(CheckpointError, match="DDPMScheduler and DDIMScheduler"):
        models.load_for_sampling(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "resnet_time_scale_shift": "spatial"}))
    with pytest.raises(CheckpointError, match="spatial"):
        models.load_for_sampling(folder)


@pytest.mark.parametrize(
    "kw,fragment",
    [(dict(base_channels=48), "norm_num_groups"),
     (dict(num_heads=2, attention_resolutions=(8,)), "attention_head_dim")],
)  # fmt: skip
def test_export_refuses_what_unet2dmodel_cannot_express(tmp_path, kw, fragment):
    cfg = UNetConfig(**{**dict(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2),
                               num_res_blocks=1, attention_resolutions=(), dropout=0.0), **kw})  # fmt: skip
    with pytest.raises(Unsupported, match=fragment):
        diffusers_io.unet_config(cfg)
    src = ckpt.save(tmp_path / "m.safetensors", UNet(cfg).state_dict(), kind="model", model=cfg.to_dict(),
                    diffusion=DiffusionConfig(timesteps=10).to_dict())  # fmt: skip
    msg = one_line_error(run("export", src, tmp_path / "out"))
    assert fragment in msg
    assert not (tmp_path / "out" / "unet").exists()


def test_export_will_not_fill_a_used_folder(tmp_path, shared_run):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        models.export(shared_run, tmp_path / "busy")
    models.export(shared_run, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_runtime_never_imports_diffusers(tmp_path, shared_run):
    code = (
        "import sys; from diffuse_cli.engine import models, checkpoint as c; "
        f"models.export({str(shared_run)!r}, {str(tmp_path / 'out')!r}); "
        f"models.load_for_sampling({str(tmp_path / 'out')!r}); "
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_eval_reads_a_diffusers_folder(tmp_path):
    """`diffuse eval` on a save_pretrained folder: the real images are resized and converted to its 16x16 RGB."""
    folder = save_pipeline(tmp_path / "pipe", unet2d(), num_train_timesteps=10)
    log = tmp_path / "evals.jsonl"
    r = run(
        "eval", folder, "builtin:digits", "-n", 6, "--steps", 2, "--format", "json", "--log", log, "--device", "cpu"
    )
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["nll"]["timesteps"] == 10 and rec["images"] == 6 and rec["model"] == str(folder)
    assert json.loads(log.read_text()) == rec and not (folder / "eval.jsonl").exists()


def test_trained_betas_round_trip_once_rescaled():
    """A scheduler with explicit betas (and zero terminal SNR) comes in as those betas and goes out unchanged."""
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 40, "rescale_betas_zero_snr": True,
           "trained_betas": torch.linspace(1e-3, 0.05, 40, dtype=torch.float64).tolist()}  # fmt: skip
    ours, as_dict = diffusers_io.diffusion_from_scheduler(cfg)
    assert as_dict["schedule"] == "trained_betas" and float(ours.alphas_cumprod[-1]) == 0.0
    theirs = diffusers.DDPMScheduler.from_config(cfg)
    torch.testing.assert_close(theirs.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5, atol=1e-7)
    out = json.loads(json.dumps(diffusers_io.scheduler_config(as_dict, ours.betas)))
    again, _ = diffusers_io.diffusion_from_scheduler(out)
    assert torch.equal(again.betas, ours.betas)
