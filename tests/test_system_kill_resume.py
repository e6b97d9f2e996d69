"""Kills and signals, system test: the whole tool as a real `python -m diffuse_cli` process (signals need one).

* SIGKILL at any moment, also in the middle of a checkpoint write, loses at most one save interval
  of steps; `--resume` continues, and the finished run is bit-identical to one never killed.
* Ctrl-C (SIGINT) and SIGTERM save the state and exit 130 and 143 (128 + the signal number, as a
  shell reports them) with one line on stderr; other commands leave no temporary files behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
from pathlib import Path

import pytest
from PIL import Image

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import fileio, models, rundir
from helpers import TINY_DIGITS as TINY
from helpers import diffuse, invoke, resume_to_6, state_steps, temporaries, wait_for


def _kill_target_seen(run: Path, pid: int, target: str) -> bool:
    prefix = f"{fileio.TMP_PREFIX}{pid}-{target}"
    for folder in (run, run / ckpt.STATE_DIR, run / "samples"):
        try:
            if any(name.startswith(prefix) for name in os.listdir(folder)):
                return True
        except OSError:
            pass
    return False


def _progress(run: Path) -> int:
    """The furthest step the run has shown: its newest state file or log line."""
    steps = state_steps(run)
    try:
        for line in (run / "log.jsonl").read_text().splitlines():
            steps.append(json.loads(line)["step"])
    except (OSError, ValueError, KeyError):
        pass
    return max(steps, default=0)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    """SIGKILL during state, model, config and preview writes and at random times; resume each time."""
    steps, every = 300, 10
    run = tmp_path / "run"
    args = [
        "train",
        "builtin:digits",
        *TINY,
        "--steps",
        steps,
        "--save-every",
        every,
        "--sample-every",
        50,
        "--keep",
        2,
        "--out",
        run,
    ]
    rng = random.Random(20240611)
    # "state-"/"model."/"config."/"step-" are the temporaries of the state, the EMA model, config.json, a preview.
    targets = ["state-", "model.", "time", "state-", "config.", "time", "step-", "state-"]
    resumable = 0
    kills = []  # (target, whether it was caught in the act, resumable step after the kill)
    for target in targets:
        has_state = bool(ckpt.list_states(run))
        p = diffuse(*args, *(["--resume"] if has_state else ["--overwrite"] if run.exists() else []))
        if target == "time":
            wait_for(lambda: False, p, timeout=rng.uniform(0.5, 6.0))  # anywhere: imports, data, steps, saves
            caught = p.poll() is None
        else:
            caught = wait_for(lambda t=target, pid=p.pid: _kill_target_seen(run, pid, t), p, timeout=120)
        seen_states, seen = state_steps(run), _progress(run)
        p.kill()
        p.communicate()
        if p.returncode == 0:
            break  # the run finished before this kill: nothing left to attack
        assert p.returncode == -signal.SIGKILL
        if not ckpt.list_states(run):
            assert seen <= every, "more than one save interval lost"
            kills.append((target, caught, 0))
            continue
        now = rundir.newest_state(run).step
        assert now >= max(seen_states, default=0), "a saved state was lost"
        assert now >= seen - every, f"lost more than one save interval: showed step {seen}, resumes at {now}"
        assert now >= resumable, "completed steps went backwards"
        resumable = now
        kills.append((target, caught, now))
    # every write but the (tiny, quick) preview PNG was caught in the act
    assert len(kills) >= 6 and all(caught for t, caught, _ in kills if t in ("state-", "model.", "config.")), kills

    p = diffuse(*args, "--resume")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out + err
    assert "Traceback" not in out + err
    assert not temporaries(run), temporaries(run)
    model = run / "model.safetensors"
    ck = ckpt.load(model)
    assert ck.step == steps
    models.load_for_sampling(model)
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)) and log[-1] == steps, "the log repeats or skips back"
    assert state_steps(run) == [steps - every, steps]  # --keep 2

    # Resume is bit-exact on the CPU, so the kills changed nothing at all.
    ref = tmp_path / "ref"
    p = diffuse(*[ref if a == run else a for a in args])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out + err
    assert (ref / "model.safetensors").read_bytes() == model.read_bytes()


def test_sigkill_during_state_write_then_resume(tmp_path):
    """The fast version: one kill while a state file is being written; resume finishes the run."""
    run = tmp_path / "run"
    args = ["train", "builtin:digits", *TINY, "--steps", 40, "--save-every", 5, "--sample-every", 0, "--out", run]
    p = diffuse(*args)
    # Not the first state: its predecessor must survive the kill.
    assert wait_for(lambda: _kill_target_seen(run, p.pid, "state-00000010"), p, timeout=180), p.communicate()
    p.kill()
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert state_steps(run)[-1] == 5 and rundir.newest_state(run).step == 5
    assert temporaries(run)  # the torn write is still there, hidden ...
    p = diffuse(*args, "--resume")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert "resuming at step 5" in out
    assert not temporaries(run)  # ... and the resumed run removed it
    assert ckpt.load(run / "model.safetensors").step == 40
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)), "steps logged after state 5 were logged again after the resume"


def test_resume_removes_torn_writes_everywhere(shared_run_copy):
    """What a SIGKILL can leave: hidden temporaries beside the model, the states and the previews, a torn log line."""
    run = shared_run_copy
    (run / "samples").mkdir(exist_ok=True)
    for folder, name in (
        (run, "model.safetensors"),
        (run / "checkpoints", "state-00000006.safetensors"),
        (run / "samples", "step-000006.png"),
    ):
        (folder / f"{fileio.TMP_PREFIX}4242-{name}").write_bytes(b"half a file")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.9}\n{"step": 6, "lo')  # past the newest state (4), then torn
    r = resume_to_6(run)
    assert r.exit_code == 0, r.output
    assert not temporaries(run)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [2, 4, 6]


def _stop_training(tmp_path: Path, sig: int):
    run = tmp_path / "run"
    p = diffuse(
        "train",
        "builtin:digits",
        *TINY,
        "--steps",
        1_000_000,
        "--save-every",
        100_000,
        "--sample-every",
        0,
        "--out",
        run,
    )
    assert wait_for(lambda: (run / "log.jsonl").exists(), p, timeout=180), p.communicate()
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return run, p.returncode, out, err


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_sigint_and_sigterm_save_and_exit(tmp_path, sig, code, name):
    run, rc, out, err = _stop_training(tmp_path, sig)
    assert rc == code, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(rf"stopped: {name} at step (\d+); the state is saved in .* --resume", lines[0])
    assert m, lines[0]
    step = int(m.group(1))
    assert step >= 10  # the first log line (step 10) was written: it trained
    assert state_steps(run) == [step]
    assert ckpt.load(run / "model.safetensors").step == step
    assert not temporaries(run)
    assert "Traceback" not in out

    r = invoke("train", "builtin:digits", *TINY, "--steps", step + 3, "--sample-every", 0, "--out", run, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resuming at step {step}" in r.output
    assert ckpt.load(run / "model.safetensors").step == step + 3


@pytest.mark.parametrize(
    "sig, code, message",
    [
        (signal.SIGTERM, 143, "terminated"),
        pytest.param(signal.SIGINT, 130, "interrupted", marks=pytest.mark.slow),
    ],
)
def test_signal_while_writing_pictures_leaves_no_temporaries(tmp_path, shared_run, sig, code, message):
    """Outside the training loop a signal unwinds the writes: every PNG left is whole, no temporary remains."""
    out = tmp_path / "pics"
    p = diffuse(
        "sample", shared_run, "--num", 3000, "--batch-size", 3000, "--steps", 1, "--out", out, "--device", "cpu"
    )
    assert wait_for(lambda: out.is_dir() and len(os.listdir(out)) > 30, p, timeout=180), p.communicate()
    p.send_signal(sig)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == code, stdout + err
    assert err.strip() == f"stopped: {message}"
    assert not temporaries(out)
    names = sorted(os.listdir(out))
    assert 30 <= len(names) < 3000
    for name in names:
        with Image.open(out / name) as im:
            im.load()
