"""`diffuse schedule` and `diffuse noise` as a user runs them."""

import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from diffuse_cli.engine import schedules
from helpers import invoke as run


def test_help_lists_commands_and_is_fast():
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "diffuse_cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0
    for cmd in ("schedule", "noise", "train", "sample"):
        assert cmd in r.stdout
    assert "torch" not in r.stderr.split(), "diffuse --help must not import torch"
    assert not any(line.split("|")[-1].strip() == "torch" for line in r.stderr.splitlines())


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and "diffuse" in r.stdout


@pytest.mark.parametrize("cmd", ["schedule", "noise", "train", "sample"])
def test_every_command_has_help_with_example(cmd):
    r = run(cmd, "-h")
    assert r.exit_code == 0
    assert "Examples" in r.stdout and f"diffuse {cmd}" in r.stdout


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


@pytest.mark.parametrize(
    "args,msg",
    [
        (["schedule", "--kind", "bogus"], "bogus"),
        (["schedule", "-T", "0"], "timesteps must be"),
        (["schedule", "--beta-start", "0.02", "--beta-end", "0.01"], "beta_start < beta_end"),
        (["noise", "does-not-exist.png"], "no such file"),
    ],
)
def test_bad_input_one_line(args, msg):
    r = run(*args)
    assert r.exit_code in (1, 2)
    assert msg in r.output
    assert "Traceback" not in r.output


def test_noise_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am text")
    r = run("noise", p, "--out", tmp_path / "o.png")
    assert r.exit_code == 1
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_noise_unwritable_output(tmp_path, photo):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("noise", photo, "--out", blocker / "strip.png")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "strip.png" in r.output or "file" in r.output


def test_noise_strip_frames_gif(tmp_path, photo):
    out, frames, gif = tmp_path / "strip.png", tmp_path / "frames", tmp_path / "n.gif"
    r = run(
        "noise",
        photo,
        "--t",
        "0,500,999",
        "--size",
        "32",
        "--out",
        out,
        "--frames",
        frames,
        "--gif",
        gif,
        "--seed",
        "3",
    )
    assert r.exit_code == 0, r.output
    assert Image.open(out).size[0] > 3 * 32
    names = sorted(p.name for p in frames.iterdir())
    assert names == ["t0000.png", "t0500.png", "t0999.png"]
    g = Image.open(gif)
    assert g.n_frames == 4
    # frames are x_t = sqrt(abar) x0 + sqrt(1-abar) eps, clipped and mapped linearly to 0..255
    from diffuse_cli.engine.data import decode_image
    from diffuse_cli.engine.diffusion import Diffusion

    d = Diffusion()
    x0 = decode_image(photo, 32).double() / 127.5 - 1
    f0 = torch.tensor(list(Image.open(frames / "t0000.png").getdata()), dtype=torch.float64).T.reshape(3, 32, 32)
    assert (f0 / 127.5 - 1 - x0).abs().mean() < 0.02  # t = 0: almost clean
    f999 = torch.tensor(list(Image.open(frames / "t0999.png").getdata()), dtype=torch.float64).T.reshape(3, 32, 32)
    z = f999 / 127.5 - 1  # ~ N(0, 1) clipped to [-1, 1]: about 68% inside (-1, 1)
    inside = ((z > -0.99) & (z < 0.99)).double().mean().item()
    assert 0.6 < inside < 0.76
    assert d.sqrt_alphas_cumprod[999] < 0.01
    assert "PSNR" in r.stdout


def test_noise_same_seed_same_frames(tmp_path, photo):
    for name in ("a", "b"):
        run(
            "noise", photo, "--t", "100", "--size", "16", "--out", tmp_path / f"{name}.png", "--frames", tmp_path / name
        )
    assert (tmp_path / "a" / "t0100.png").read_bytes() == (tmp_path / "b" / "t0100.png").read_bytes()


def test_noise_iterative(tmp_path, photo):
    r = run("noise", photo, "--t", "10,200", "--size", "16", "--iterative", "--out", tmp_path / "i.png")
    assert r.exit_code == 0, r.output
    assert "iterative" in r.stdout


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_noise_image_modes(tmp_path, mode):
    im = Image.new("RGB", (40, 30), (200, 100, 50))
    if mode == "I;16":
        im = Image.new("I;16", (40, 30), 40000)
    else:
        im = im.convert(mode)
    p = tmp_path / f"m.{'tif' if mode == 'I;16' else 'png'}"
    im.save(p)
    r = run("noise", p, "--size", "16", "--t", "0", "--out", tmp_path / "o.png", "--frames", tmp_path / "f")
    assert r.exit_code == 0, r.output


def test_help_keeps_placeholders_and_shows_flags_plainly():
    noise_help = run("noise", "--help").output
    assert "<image>-noise.png" in noise_help
    train_help = run("train", "--help").output
    assert "runs/<data name>" in train_help
    assert "<bool>" not in noise_help and "<bool>" not in train_help  # --resume, not --resume <bool>
    assert "9223372036854775807" not in train_help
    assert "Exit codes" in run("--help").output


def test_usage_errors_are_one_line_with_exit_2(photo):
    for args in (["noise", photo, "--size", "0"], ["sample", "x", "--sampler", "foo"], ["schedule", "--nope"],
                 ["schedule", "--timesteps", "0"]):  # fmt: skip
        r = run(*args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "Value error" not in lines[0] and "╭" not in r.stderr
