"""--micro-batch: gradient accumulation gives the update of one full batch (to float rounding).

Oracle: the same step with the whole batch in one pass. Dropout is off (its masks are drawn per
pass) so both compute the same function; the gradient of the mean loss is linear in the images,
so any split must give the same gradient and hence the same AdamW update.
"""

from __future__ import annotations

import pytest
import torch

from diffuse_cli.engine import step as step_mod
from diffuse_cli.engine.config import TrainConfig
from diffuse_cli.engine.diffusion import DiffusionConfig
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.unet import UNetConfig

MODEL = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0)  # fmt: skip
IMAGES = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def one_step(micro_batch, model=MODEL, labels=None, **kw):
    config = TrainConfig(batch_size=12, warmup=0, lr=1e-3, micro_batch=micro_batch, **kw)
    ts = step_mod.make_train_step(model, DiffusionConfig(timesteps=50), config, IMAGES, torch.device("cpu"),
                                  labels=labels)  # fmt: skip
    ts.initial = {k: v.clone() for k, v in ts.model.state_dict().items()}
    loss = ts(0)
    grads = {k: p.grad.clone() for k, p in ts.model.named_parameters()}
    return ts, float(loss), grads


@pytest.mark.parametrize("micro_batch", [1, 5, 6, 11])  # even and uneven splits, one image per pass
def test_micro_batches_give_the_full_batch_update(micro_batch):
    full, loss_full, g_full = one_step(None)
    part, loss_part, g_part = one_step(micro_batch)
    assert loss_part == pytest.approx(loss_full, rel=1e-5)
    scale = max(g.abs().max() for g in g_full.values())
    for k, g in g_full.items():
        torch.testing.assert_close(g_part[k], g, atol=1e-6 * scale, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 9, 25, 49])
    with torch.no_grad():
        torch.testing.assert_close(part.model(x, t), full.model(x, t), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(part.ema.model(x, t), full.ema.model(x, t), atol=1e-5, rtol=1e-4)
    moved = max(float((v - full.initial[k]).abs().max()) for k, v in full.model.state_dict().items())
    assert moved > 5e-4  # the step really moved the weights (AdamW's first step is about lr = 1e-3 per weight)


def test_micro_batches_with_classes():
    model = UNetConfig(**{**MODEL.to_dict(), "num_classes": 3})
    labels = torch.arange(40) % 3
    _, _, g_full = one_step(None, model, labels)
    _, _, g_part = one_step(4, model, labels)
    for k, g in g_full.items():
        torch.testing.assert_close(g_part[k], g, atol=1e-7, rtol=1e-4)


def test_micro_batch_is_a_machine_setting():
    with pytest.raises(ConfigError, match="--micro-batch"):
        TrainConfig(micro_batch=0)
    with pytest.raises(ConfigError, match="uniform timesteps"):  # importance weights need the whole batch at once
        TrainConfig(micro_batch=2, timestep_sampling="importance")
    stored = TrainConfig(micro_batch=4, threads=1, steps=10)
    assert stored.resumed(steps=20) == TrainConfig(steps=20)  # neither survives --resume
    assert stored.resumed(threads=2, micro_batch=8).micro_batch == 8
