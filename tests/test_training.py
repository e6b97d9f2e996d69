"""The training loop: end to end, resume bit-exactness, atomic checkpoints, interrupts, divergence, --time
budgets (with a fake clock), when previews are due."""

import itertools
import json
import os
import signal

import pytest
import torch
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import training
from diffuse_cli.engine.config import DiffusionConfig, TrainConfig, UNetConfig
from diffuse_cli.engine.data import load_dataset
from diffuse_cli.engine.device import resolve_device
from diffuse_cli.engine.errors import CheckpointError, ConfigError, Interrupted, OutputError, TrainingDiverged
from helpers import TINY_TRAIN, invoke

MODEL = UNetConfig(
    image_size=8,
    in_channels=1,
    base_channels=32,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.1,
)
DIFF = DiffusionConfig(schedule="cosine", timesteps=100)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("builtin:digits")


def cfg(**kw):
    base = dict(
        steps=6, batch_size=8, save_every=3, sample_every=0, log_every=1, warmup=2, num_preview=4, preview_steps=5
    )
    return TrainConfig(**{**base, **kw})


def weights(path):
    return ckpt.load(path).tensors


def test_end_to_end_writes_self_describing_checkpoint(tmp_path, digits):
    events = []
    res = training.train(
        digits, tmp_path / "run", MODEL, DIFF, cfg(sample_every=6), device="cpu", callback=events.append
    )
    run = tmp_path / "run"
    ck = ckpt.load(run / "model.safetensors")
    assert ck.kind == "model" and ck.step == 6
    assert UNetConfig.from_dict(ck.model) == MODEL
    assert DiffusionConfig.from_dict(ck.diffusion) == DIFF
    assert ck.dataset["used"] == 1797 and ck.train["batch_size"] == 8
    assert [p.name for p in ckpt.list_states(run)] == ["state-00000003.safetensors", "state-00000006.safetensors"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "img_per_s", "elapsed"} <= set(r) for r in log)
    assert json.loads((run / "config.json").read_text())["model"]["base_channels"] == 32
    preview = Image.open(run / "samples" / "step-000006.png")
    assert preview.size[0] >= 256
    assert res["step"] == 6
    kinds = {e["event"] for e in events}
    assert {"start", "log", "save", "preview", "step"} <= kinds
    assert not [p for p in run.rglob("*") if p.name.startswith(".diffuse-tmp")]


def test_loss_decreases(tmp_path, digits):
    training.train(
        digits,
        tmp_path / "r",
        MODEL,
        DIFF,
        cfg(steps=60, batch_size=16, save_every=60, lr=2e-3, warmup=5, log_every=10),
        device="cpu",
    )
    log = [json.loads(line)["loss"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6
    assert sum(log[-2:]) / 2 < 0.6 * log[0], log


def test_resume_is_bit_exact(tmp_path, digits):
    training.train(digits, tmp_path / "full", MODEL, DIFF, cfg(steps=6), device="cpu")
    training.train(digits, tmp_path / "half", MODEL, DIFF, cfg(steps=3), device="cpu")
    training.train(digits, tmp_path / "half", MODEL, DIFF, cfg(steps=6), device="cpu", resume=True)
    a = weights(tmp_path / "full" / "checkpoints" / "state-00000006.safetensors")
    b = weights(tmp_path / "half" / "checkpoints" / "state-00000006.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the runs really moved: weights differ from step 3
    c = weights(tmp_path / "half" / "checkpoints" / "state-00000003.safetensors")
    assert not torch.equal(
        a["model.out_conv.weight" if "model.out_conv.weight" in a else next(iter(a))],
        c["model.out_conv.weight" if "model.out_conv.weight" in c else next(iter(c))],
    ) or any(not torch.equal(a[k], c[k]) for k in a if k.startswith("model."))


def test_occupied_out_dir_refused(tmp_path, digits):
    training.train(digits, tmp_path / "r", MODEL, DIFF, cfg(steps=3), device="cpu")
    with pytest.raises(OutputError, match="holds another run"):
        training.train(digits, tmp_path / "r", MODEL, DIFF, cfg(steps=3), device="cpu")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        training.train(digits, tmp_path / "other", MODEL, DIFF, cfg(steps=3), device="cpu")
    training.train(digits, tmp_path / "r", MODEL, DIFF, cfg(steps=3), device="cpu", overwrite=True)
    with pytest.raises(OutputError, match="nothing to resume"):
        training.train(digits, tmp_path / "fresh", MODEL, DIFF, cfg(steps=3), device="cpu", resume=True)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, digits, monkeypatch):
    run = tmp_path / "r"
    training.train(digits, run, MODEL, DIFF, cfg(steps=3), device="cpu")
    before = (run / "model.safetensors").read_bytes()
    import safetensors.torch as st

    real = st.save_file

    def crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half-written file, then the process "dies"
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OutputError, match="no space left"):
        training.train(digits, run, MODEL, DIFF, cfg(steps=6), device="cpu", resume=True)
    monkeypatch.setattr(st, "save_file", real)
    assert (run / "model.safetensors").read_bytes() == before
    ckpt.load(run / "model.safetensors")
    assert [p.name for p in ckpt.list_states(run)] == ["state-00000003.safetensors"]
    assert not [p for p in run.rglob("*") if p.name.startswith(".diffuse-tmp")]


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, digits, monkeypatch):
    from diffuse_cli.engine.diffusion import Diffusion

    real = Diffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = real(self, *a, **k)
        return out * float("nan") if calls["n"] > 4 else out

    monkeypatch.setattr(Diffusion, "training_losses", poisoned)
    with pytest.raises(TrainingDiverged, match="last good checkpoint \\(step 3\\)"):
        training.train(digits, tmp_path / "r", MODEL, DIFF, cfg(steps=6), device="cpu")
    assert ckpt.load(tmp_path / "r" / "model.safetensors").step == 3


def test_sigint_saves_and_raises_interrupted(tmp_path, digits):
    def cb(e):
        if e["event"] == "step" and e["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="--resume") as info:
        training.train(digits, tmp_path / "r", MODEL, DIFF, cfg(steps=50, save_every=100), device="cpu", callback=cb)
    assert info.value.exit_code == 130
    assert ckpt.load(tmp_path / "r" / "model.safetensors").step == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_unknown_and_missing_devices():
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_checkpoint_refuses_pickles_and_garbage(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(CheckpointError, match="unpickling"):
        ckpt.load(pt)
    renamed = tmp_path / "sneaky.safetensors"
    renamed.write_bytes(pt.read_bytes())
    with pytest.raises(CheckpointError, match="pickle"):
        ckpt.load(renamed)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt|not a valid"):
        ckpt.load(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a diffuse checkpoint"):
        ckpt.load(foreign)


@pytest.fixture
def fake_clock(monkeypatch):
    """Every reading of the training loop's clock advances 1 s: a --time budget of N s lasts about N readings."""
    ticks = itertools.count()
    monkeypatch.setattr(training, "_clock", lambda: float(next(ticks)))


def test_time_budget_stops_saves_and_resumes(tmp_path, fake_clock):
    run = tmp_path / "run"
    r = invoke("train", "builtin:digits", "--out", run, *TINY_TRAIN, "--steps", "1000", "--time", "20s")
    assert r.exit_code == 0, r.output
    from diffuse_cli.engine import checkpoint as ckpt
    from diffuse_cli.engine import rundir

    done = rundir.newest_state(run).step
    assert 3 <= done < 20 and "--time budget is spent" in r.output  # stopped by the clock, not by --steps
    assert ckpt.load(run / "model.safetensors").step == done  # saved exactly as a normal finish
    r = invoke("train", "builtin:digits", "--out", run, "--resume", "--time", "20s")
    assert r.exit_code == 0, r.output
    assert done < rundir.newest_state(run).step < 1000


def test_time_without_steps_trains_until_the_budget(tmp_path, fake_clock):
    r = invoke(
        "train",
        "builtin:digits",
        "--out",
        tmp_path / "r",
        "--preset",
        "tiny",
        "-b",
        "4",
        "--time",
        "10s",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "training for 10 s" in r.output and "1000000000" not in r.output


def test_previews_come_early_then_regularly():
    due = [s for s in range(1, 5001) if training.preview_due(s, 1000)]
    assert due == [100, 200, 400, 800, 1000, 2000, 3000, 4000, 5000]
    assert not any(training.preview_due(s, 0) for s in range(1, 300))
    # and at the end of a run, unless it is shorter than the first preview (a 1-step run: noise, and most of its time)
    assert training.preview_due(137, 1000, done=True) and not training.preview_due(99, 1000, done=True)
