"""The training report picture (engine/report.py) and the in-training evaluation in the training loop."""

import dataclasses
import json

import pytest
import torch
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import images, report, training
from diffuse_cli.engine.data import load_builtin
from diffuse_cli.engine.diffusion import DiffusionConfig
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.unet import UNetConfig


def fake_run(folder, steps=200, evals=(100, 200)):
    (folder / "samples").mkdir(parents=True)
    lines = []
    for s in range(25, steps + 1, 25):
        lines.append({"step": s, "loss": 1.0 / s, "lr": 2e-4, "img_per_s": 100.0, "elapsed": s / 3.0})
        if s in evals:
            lines.append({"step": s, "fd": 10.0 / s, "fd_floor": 0.01, "kid": 0.1 / s, "kid_floor": 0.0,
                          "near_copy": 0.02, "near_copy_ref": 0.01, "pixel_nn": 40.0, "pixel_nn_ref": 30.0})  # fmt: skip
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn')
    for s in (100, 200):
        images.save_image(Image.new("L", (32, 32), 128), folder / "samples" / f"step-{s:06d}.png")
    return folder


def test_smooth_keeps_a_constant_and_follows_a_step():
    assert report.smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # debiased: no pull towards 0 at the start
    s = report.smooth([0.0] * 10 + [1.0] * 40)
    assert s[9] == 0.0 and 0.99 < s[-1] <= 1.0


def test_report_of_one_run_and_of_several(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", steps=100, evals=())
    one = report.draw_report([a], tmp_path / "one.png")
    with Image.open(tmp_path / "one.png") as im:
        assert im.size == one.size and im.height > 4 * 340  # four rows of panels, the previews under them
    both = report.draw_report([a, b])
    assert both.width == one.width
    train, evals = report.read_log(a)
    assert len(train) == 8 and [e["step"] for e in evals] == [100, 200]  # the torn last line is skipped
    with pytest.raises(ConfigError, match="no log.jsonl"):
        report.draw_report([tmp_path / "missing"])


def test_log_scale_plot_draws_positive_values_only():
    img = images.line_plot([("x", [1, 2, 3], [0.01, 0.1, 0.0])], title="t", xlabel="x", ylabel="y", logy=True)
    assert img.size[0] == 520


def test_training_evaluates_keeps_the_best_and_draws_the_report(tmp_path):
    full = load_builtin("digits")
    data = dataclasses.replace(full, images=full.images[:200].clone(), labels=None, classes=())
    model = UNetConfig(image_size=8, in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), dropout=0.0)  # fmt: skip
    cfg = training.TrainConfig(steps=4, batch_size=8, save_every=2, sample_every=0, log_every=1, warmup=0,
                               eval_every=2, eval_samples=8, preview_steps=2)  # fmt: skip
    events = []
    res = training.train(data, tmp_path / "run", model, DiffusionConfig(timesteps=50), cfg, device="cpu",
                         callback=events.append)  # fmt: skip
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "fd" in r] == [2, 4] and all("loss" in r for r in log if "fd" not in r)
    best = min(evals, key=lambda e: e["fd"])
    assert res["best_step"] == best["step"] and res["best_fd"] == pytest.approx(best["fd"])
    ck = ckpt.load(res["best"])
    assert ck.kind == "model" and ck.step == best["step"] and ck.extra["fd"] == pytest.approx(best["fd"])
    if best["step"] == 4:  # the best is the final EMA model
        final = ckpt.load(res["model"])
        assert all(torch.equal(ck.tensors[k], final.tensors[k]) for k in final.tensors)
    assert (tmp_path / "run" / "report.png").exists()
    # a resumed run remembers which step was best
    cfg2 = training.TrainConfig(**{**cfg.to_dict(), "steps": 5})
    res2 = training.train(data, tmp_path / "run", None, None, cfg2, device="cpu", resume=True)
    assert res2["best_step"] in (best["step"], 5)


def test_evaluating_does_not_change_training(tmp_path):
    full = load_builtin("digits")
    data = dataclasses.replace(full, images=full.images[:100].clone(), labels=None, classes=())
    model = UNetConfig(
        image_size=8,
        in_channels=1,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        dropout=0.1,
    )  # fmt: skip  (dropout: the global random stream)
    states = []
    for every in (0, 2):
        cfg = training.TrainConfig(steps=4, batch_size=8, save_every=4, sample_every=0, log_every=1, warmup=0,
                                   eval_every=every, eval_samples=8)  # fmt: skip
        training.train(data, tmp_path / f"e{every}", model, DiffusionConfig(timesteps=50), cfg, device="cpu")
        states.append(ckpt.load(tmp_path / f"e{every}" / "checkpoints" / "state-00000004.safetensors").tensors)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
