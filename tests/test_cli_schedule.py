"""`diffuse schedule` as a user runs it: the numbers against the formulas, csv, json, the plot."""

import json
import math

import pytest
from PIL import Image

from diffuse_cli.engine import schedules
from helpers import invoke as run


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
def test_schedule_json_matches_formulas(kind):
    r = run("schedule", "--kind", kind, "--format", "json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["kind"] == kind and obj["timesteps"] == 1000
    assert obj["t"] == list(range(1000))
    for key in ("beta", "alpha_bar", "snr"):
        assert len(obj[key]) == 1000
    T, bs, be = 1000, 1e-4, 0.02
    for t in (0, 1, 137, 500, 998, 999):
        if kind == "linear":
            beta = bs + (be - bs) * t / (T - 1)
        elif kind == "quadratic":
            beta = (math.sqrt(bs) + (math.sqrt(be) - math.sqrt(bs)) * t / (T - 1)) ** 2
        elif kind == "sigmoid":
            sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
            beta = bs + (be - bs) * sig(-6 + 12 * t / (T - 1))  # diffusers' definition
        else:
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            beta = min(1 - f((t + 1) / T) / f(t / T), 0.999)
        assert obj["beta"][t] == pytest.approx(beta, rel=1e-6)
    abar = 1.0
    for t in range(T):
        abar *= 1 - obj["beta"][t]
        if t in (0, 10, 500, 999):
            assert obj["alpha_bar"][t] == pytest.approx(abar, rel=1e-6)
            assert obj["snr"][t] == pytest.approx(abar / (1 - abar), rel=1e-6)


def test_schedule_csv_and_multi(tmp_path):
    r = run("schedule", "-k", "linear", "-T", "10", "--format", "csv")
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "t,beta,alpha_bar,snr" and len(lines) == 11
    r = run("schedule", "-k", "linear", "-k", "cosine", "-T", "10", "--format", "json")
    objs = json.loads(r.stdout)
    assert [o["kind"] for o in objs] == ["linear", "cosine"]


def test_schedule_table_warns_when_xT_not_noise(tmp_path):
    r = run("schedule", "-T", "50")
    assert r.exit_code == 0
    assert "warning" in r.stdout and "not close to pure noise" in r.stdout
    r = run("schedule")
    assert "warning" not in r.stdout


def test_schedule_plot(tmp_path):
    p = tmp_path / "s.png"
    r = run("schedule", "-k", "linear", "-k", "cosine", "--zero-terminal-snr", "--plot", p)
    assert r.exit_code == 0, r.output
    im = Image.open(p)
    assert im.size[0] > 500 and im.size[1] > 300
    # curves are drawn in colour: the plot is not just axes
    colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours
