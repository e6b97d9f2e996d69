"""The run folder (engine/rundir.py): the occupied-folder policy, the newest loadable state, the log cut back on
resume, training states written and restored exactly, and the sample folder's numbered images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import device as devices
from diffuse_cli.engine import fileio, rundir
from diffuse_cli.engine.errors import ConfigError, OutputError
from helpers import flip_byte


def test_default_out():
    assert rundir.default_out("builtin:digits") == Path("runs/digits")
    assert rundir.default_out("/home/me/pictures/faces") == Path("runs/faces")
    assert rundir.default_out("faces/") == Path("runs/faces")
    assert rundir.default_out("/") == Path("runs/run")


def test_resume_and_overwrite_contradict():
    rundir.check_mode(True, False)
    rundir.check_mode(False, True)
    with pytest.raises(ConfigError, match="pass only one of them"):
        rundir.check_mode(True, True)


def test_prepare_out_dir_refuses_to_mix_runs(tmp_path):
    new = tmp_path / "new" / "run"
    rundir.prepare_out_dir(new, resume=False, overwrite=False)
    assert new.is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        rundir.prepare_out_dir(tmp_path / "afile", resume=False, overwrite=False)
    (new / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty; pass --resume .* or --overwrite"):
        rundir.prepare_out_dir(new, resume=False, overwrite=False)
    (new / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="holds another run"):
        rundir.prepare_out_dir(new, resume=False, overwrite=False)
    with pytest.raises(OutputError, match="nothing to resume"):
        rundir.prepare_out_dir(new, resume=True, overwrite=False)


def test_overwrite_clears_our_files_and_keeps_the_users(shared_run_copy):
    run = shared_run_copy
    (run / "notes.txt").write_text("mine")
    (run / "samples").mkdir(exist_ok=True)
    rundir.prepare_out_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resume_needs_a_state(shared_run_copy):
    rundir.prepare_out_dir(shared_run_copy, resume=True, overwrite=False)  # states at 2 and 4: fine
    shutil.rmtree(shared_run_copy / ckpt.STATE_DIR)
    with pytest.raises(OutputError, match="nothing to resume in .*no training state"):
        rundir.prepare_out_dir(shared_run_copy, resume=True, overwrite=False)


def test_newest_state_skips_damaged_ones(shared_run_copy):
    run = shared_run_copy
    assert rundir.newest_state(run).step == 4
    meta = rundir.newest_state(run, tensors=False)
    assert meta.step == 4 and meta.model["image_size"] == 8
    flip_byte(ckpt.state_path(run, 4), -1)
    assert rundir.newest_state(run).step == 2
    (ckpt.state_path(run, 2)).write_bytes(b"junk")
    with pytest.raises(OutputError, match="no loadable training state .*state-00000004.*state-00000002"):
        rundir.newest_state(run)
    with pytest.raises(OutputError, match="none found"):
        rundir.newest_state(run / "empty")


def test_truncate_log_keeps_the_steps_up_to_the_state(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = ['{"step": 1, "loss": 1}', '{"step": 2}', "not json", '{"event": "x"}', '{"step": 3}', '{"step": 4, "lo']
    log.write_text("\n".join(lines))
    rundir.truncate_log(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1}\n{"step": 2}\n'
    before = log.stat().st_mtime_ns
    rundir.truncate_log(log, 9)  # nothing to cut: not rewritten
    assert log.stat().st_mtime_ns == before
    rundir.truncate_log(tmp_path / "missing.jsonl", 3)  # no log yet: nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


def test_clean_stale_removes_temporaries_in_every_run_folder(tmp_path):
    folders = [tmp_path, tmp_path / ckpt.STATE_DIR, tmp_path / "samples"]
    for f in folders:
        f.mkdir(exist_ok=True)
        (f / f"{fileio.TMP_PREFIX}9-x").write_text("half")
        (f / "keep").write_text("x")
    rundir.clean_stale(tmp_path)
    assert all(sorted(p.name for p in f.iterdir() if p.is_file()) == ["keep"] for f in folders)


def test_drop_old_states_keeps_the_newest(tmp_path):
    (tmp_path / ckpt.STATE_DIR).mkdir()
    for step in (3, 10, 7, 100):
        ckpt.state_path(tmp_path, step).write_bytes(b"")
    rundir.drop_old_states(tmp_path, 2)
    assert [p.name for p in ckpt.list_states(tmp_path)] == ["state-00000010.safetensors", "state-00000100.safetensors"]


def _model_and_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = devices.make_optimizer(model.parameters(), lr=1e-2)
    return model, ema, opt


def test_state_round_trips_weights_optimizer_and_random_streams(tmp_path):
    """Two steps, save, two more steps: a restored copy takes the same two more steps, bit for bit."""
    model, ema, opt = _model_and_opt(0)
    gen = torch.Generator().manual_seed(5)

    def steps(model, opt, gen, n=2):
        for _ in range(n):
            x = torch.randn(8, 3, generator=gen)
            loss = model(x).pow(2).mean() + torch.rand(()) * 0  # reads the global stream too
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.rand(3), torch.randn(2, generator=gen)

    steps(model, opt, gen)
    tensors, extra = rundir.state_tensors(model, ema, opt, gen, torch.device("cpu"))
    assert {"rng.data", "rng.torch"} <= set(tensors) and "rng.cuda" not in tensors
    path = ckpt.save(tmp_path / "state.safetensors", tensors, kind="state", model={}, diffusion={}, step=2, extra=extra)
    after = steps(model, opt, gen)

    model2, ema2, opt2 = _model_and_opt(1)  # other weights, a fresh optimizer and streams
    gen2 = torch.Generator().manual_seed(99)
    rundir.restore_state(ckpt.load(path, expect_kind="state"), model2, ema2, opt2, gen2, torch.device("cpu"), rank=0)
    after2 = steps(model2, opt2, gen2)
    assert all(torch.equal(a, b) for a, b in zip(after, after2, strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True)
    )
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ema2.state_dict().values(), strict=True))


def test_prepare_sample_dir_refuses_earlier_images_unless_overwrite(tmp_path):
    out = tmp_path / "imgs"
    rundir.prepare_sample_dir(out, overwrite=False)
    names = ["0000.png", "0001-red.png", "12345.png", "0002-sea_lion.png"]
    for name in [*names, "notes.txt", "001.png", "0003.jpg", "cover.png"]:
        (out / name).write_text("x")
    with pytest.raises(OutputError, match=r"already holds 4 generated images \(0000.png ...\)"):
        rundir.prepare_sample_dir(out, overwrite=False)
    rundir.prepare_sample_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["0003.jpg", "001.png", "cover.png", "notes.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        rundir.prepare_sample_dir(tmp_path / "afile", overwrite=True)
