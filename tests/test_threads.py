"""CPU threads that follow the machine: re-decided now and then from the load other processes put on it.

The load reading and the clock are injected, so no test depends on what the machine is doing.
"""

from __future__ import annotations

import pytest
import torch

from diffuse_cli.engine import device as devices
from diffuse_cli.engine.diffusion import Diffusion, DiffusionConfig
from diffuse_cli.engine.generate import generate


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def policy(readings, clock, fixed=None, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    it = iter(readings)
    return devices.ThreadPolicy(fixed, "cpu", every_s=10.0, others=lambda: next(it), cores=2, clock=clock)


def test_a_burst_at_start_up_no_longer_fixes_the_run(monkeypatch, restore_threads):
    clock = Clock()
    p = policy([1.0, 1.0, 0.0, 0.9, 0.2], clock, monkeypatch=monkeypatch)
    assert p.start() == 1 and torch.get_num_threads() == 1  # another core was busy at start-up
    clock.now = 5.0
    assert p.update() is None  # too soon: no reading taken
    clock.now = 10.0
    assert p.update() is None and p.threads == 1  # still busy: unchanged
    clock.now = 20.0
    assert p.update() == 2 and torch.get_num_threads() == 2  # the other work ended: take the core back
    clock.now = 30.0
    assert p.update() == 1  # busy again
    clock.now = 40.0
    assert p.update() == 2


def test_threads_given_are_kept(monkeypatch, restore_threads):
    clock = Clock()
    p = policy([1.5] * 5, clock, fixed=2, monkeypatch=monkeypatch)
    assert p.start() == 2
    clock.now = 100.0
    assert p.update() is None and torch.get_num_threads() == 2


def test_omp_num_threads_counts_as_given(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p = devices.ThreadPolicy(None, "cpu", others=lambda: 0.0, cores=2, clock=Clock())
    assert not p.adaptive and p.start() == 1


def test_other_devices_are_left_alone(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    p = devices.ThreadPolicy(None, "cuda", others=lambda: 0.0, cores=2, clock=Clock())
    assert p.start() == 1 and p.update() is None


def test_other_load_subtracts_this_process(monkeypatch):
    """Our own CPU time is our work, not another process's: it must not count (fake /proc/stat and clocks,
    so the machine's real load cannot change the answer)."""
    hz = devices.os.sysconf("SC_CLK_TCK") if hasattr(devices.os, "sysconf") else 100
    readings = iter([(0.0, 0.0, 0.0), (1.0, 1.7, 1.0)])  # (monotonic s, busy core-seconds of all cores, own CPU s)
    state = {}

    def advance():
        state["now"] = next(readings)

    def cpu_times():
        advance()
        busy = state["now"][1]
        idle = 10_000 * hz
        return idle, idle + busy * hz  # (idle jiffies, total jiffies): busy seconds of all cores

    monkeypatch.setattr(devices, "_cpu_times", cpu_times)
    monkeypatch.setattr(devices.time, "monotonic", lambda: state["now"][0])
    monkeypatch.setattr(devices.time, "process_time", lambda: state["now"][2])
    load = devices.OtherLoad()
    # 1.7 core-seconds busy over 1 s, 1.0 of them this process's: 0.7 cores of other work
    assert load() == pytest.approx(0.7)


def test_sampling_re_checks_between_batches(monkeypatch, restore_threads):
    calls = []

    class Recorder:
        def start(self):
            calls.append("start")

        def update(self):
            calls.append("update")

    diffusion = Diffusion(DiffusionConfig(timesteps=10))
    generate(lambda x, t: torch.zeros_like(x), diffusion, 5, (1, 4, 4), steps=2, batch_size=2, threads=Recorder())
    assert calls == ["start", "update", "update", "update"]  # once per batch of 2, 2, 1


def test_training_follows_the_load(tmp_path, monkeypatch, restore_threads):
    from diffuse_cli.engine import training
    from diffuse_cli.engine.data import load_dataset
    from diffuse_cli.engine.unet import UNetConfig

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    readings = iter([1.0] + [0.0] * 100)  # busy at start-up, idle afterwards
    monkeypatch.setattr(devices, "OtherLoad", lambda: lambda: next(readings))
    monkeypatch.setattr(devices, "_usable_cores", lambda: 2)
    orig = devices.ThreadPolicy.__init__

    def init(self, fixed=None, device="cpu", **kw):  # re-check at every log line
        orig(self, fixed, device, **{**kw, "every_s": 0.0})

    monkeypatch.setattr(devices.ThreadPolicy, "__init__", init)
    asked = []  # record what would be set: two spinning threads on a busy test machine would only slow the test
    monkeypatch.setattr(devices.torch, "set_num_threads", asked.append)
    events = []
    model = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), dropout=0.0)  # fmt: skip
    cfg = training.TrainConfig(steps=4, batch_size=4, log_every=2, sample_every=0, save_every=4)
    training.train(load_dataset("builtin:digits"), tmp_path / "r", model, DiffusionConfig(timesteps=10), cfg,
                   device="cpu", callback=events.append)  # fmt: skip
    start = next(e for e in events if e["event"] == "start")
    changes = [e for e in events if e["event"] == "threads"]
    assert start["threads"] == 1 and changes and changes[0]["threads"] == 2 and asked[-1] == 2
