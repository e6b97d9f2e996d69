"""The machine (engine/device.py): CPU threads by default and by option, how busy the other cores are."""

from __future__ import annotations

import os

import pytest

from diffuse_cli.engine import device as devices
from helpers import TINY_TRAIN, invoke


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, threads in ((1.2, 1), (0.1, 2), (7.0, 1), (0.6, 1)):
        monkeypatch.setattr(devices, "busy_cores", lambda b=busy: b)
        assert devices.default_threads() == threads, busy  # a busy core: do not spin-wait on it


class FakeStat:
    """/proc/stat of a machine with ``cores`` CPUs, 100 jiffies a second each, of which ``spinning`` cores are kept
    busy by other processes: what busy_cores reads, without depending on what this machine is doing."""

    def __init__(self, cores: int, spinning: float):
        self.cores, self.spinning, self.clock = cores, spinning, 0.0

    def line(self) -> str:
        total = 100 * self.cores * self.clock
        busy = 100 * self.spinning * self.clock
        # cpu user nice system idle iowait irq softirq steal: busy time in user, the rest idle (3/4) and iowait (1/4)
        idle, iowait = 0.75 * (total - busy), 0.25 * (total - busy)
        return f"cpu  {round(busy)} 0 0 {round(idle)} {round(iowait)} 0 0 0 0 0\ncpu0 1 2 3 4\n"

    def install(self, monkeypatch) -> None:
        import io
        import time

        monkeypatch.setattr(devices, "open", lambda path, *a, **k: io.StringIO(self.line()), raising=False)
        monkeypatch.setattr(devices.os, "cpu_count", lambda: self.cores)
        monkeypatch.setattr(time, "sleep", lambda s: setattr(self, "clock", self.clock + s))


@pytest.mark.parametrize("cores", [1, 2, 16])
def test_busy_cores_sees_a_spinning_process(monkeypatch, cores):
    """One more process spinning on a core is one more busy core: measured from /proc/stat over the window
    (idle and iowait are idle time), whatever else the machine running the tests is doing."""
    stat = FakeStat(cores, spinning=0.0)
    stat.install(monkeypatch)
    idle = devices.busy_cores(0.3)
    stat.spinning = 1.0  # `python -c "while True: pass"`
    busy = devices.busy_cores(0.5)
    assert busy > idle + 0.5, (idle, busy)  # one more core's worth of work
    assert idle == pytest.approx(0.0, abs=0.02) and busy == pytest.approx(1.0, abs=0.02)
    stat.spinning = cores - 0.5
    assert devices.busy_cores(1.0) == pytest.approx(cores - 0.5, abs=0.02)


def test_busy_cores_without_proc_stat_is_the_load_average(monkeypatch):
    monkeypatch.setattr(devices, "_cpu_times", lambda: None)
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (1.25, 0.5, 0.25))
    assert devices.busy_cores(0.0) == 1.25

    def no_loadavg():
        raise OSError("no load average here")

    monkeypatch.setattr(devices.os, "getloadavg", no_loadavg)
    assert devices.busy_cores(0.0) == 0.0


@pytest.mark.slow  # measures this machine: a busy neighbour (another test run, a build) can hide the spinner
def test_busy_cores_sees_a_real_spinning_process():
    import subprocess
    import sys
    import time

    idle = devices.busy_cores(0.3)
    cores = os.cpu_count() or 1
    if idle > cores - 1:
        pytest.skip(f"no idle core to see a spinning process on ({idle:.1f} of {cores} busy)")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = devices.busy_cores(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy > idle + 0.5, (idle, busy)  # one more core's worth of work


def test_threads_option_is_used(tmp_path, monkeypatch):
    """--threads reaches torch. The count is recorded, not applied: two OpenMP threads on a machine whose other
    core is busy spin-wait 10-40x slower, and this test must not depend on what else the machine is doing."""
    import torch

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    r = invoke("train", "builtin:digits", "--out", tmp_path / "r", *TINY_TRAIN, "--threads", "2")
    assert r.exit_code == 0 and "2 CPU threads" in r.output, r.output
    assert asked == [2]
