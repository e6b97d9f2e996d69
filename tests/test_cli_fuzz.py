"""Hypothesis throws random option values at every command (helpers.COMMANDS): each run must end with exit code
0, 1 or 2 and one readable message, never an exception escaping the app or a traceback.

Values: integers including 0, negatives and numbers beyond 64 bits; floats including nan, inf and
negatives; arbitrary text (no NUL byte: a real command line cannot hold one) in place of any value;
paths that are missing, that are folders, files, or below a file. What keeps each run cheap:

* `train` is fuzzed through the CLI's whole validation layer (options, data loading, the model and
  diffusion configs) down to the engine's `training.train`, which is replaced by a stub that checks
  what it receives: fuzzing must not start a training run that a huge --steps makes endless.
* `sample`, `export` and `eval` use a copy of the session's tiny run (conftest `shared_run`, T = 50);
  `sample` never asks for a huge --num (10^30 images is a valid, endless request), and `eval` reads a
  folder of eight images, so even a huge --num-images is eight. `noise` and `train` keep --size / --image-size small or out of range:
  a valid 4096-pixel request is just slow, not wrong.

The slow variant (`make test-all`) runs ten times as many examples.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffuse_cli.cli import app
from diffuse_cli.engine import training
from helpers import COMMANDS, fake_pytorch_fid, runner

FAST, SLOW = 25, 250
COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], derandomize=True
)

HUGE = [2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1]
text = st.text(st.characters(exclude_characters="\x00"), max_size=12)
INT_EXTREMES = st.sampled_from([0, -1, -7, *HUGE])
FLOAT_EXTREMES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, -1.0, 2.0]),
)


class Values:
    """Strategies for option values. A calm example draws from ranges a user would type (which can still
    be wrong together); a wild one also from the extremes."""

    def __init__(self, wild: bool):
        self.wild = wild

    def ints(self, lo: int, hi: int) -> st.SearchStrategy[str]:
        calm = st.integers(lo, hi)
        return (st.one_of(calm, INT_EXTREMES) if self.wild else calm).map(str)

    def floats(self, lo: float, hi: float) -> st.SearchStrategy[str]:
        calm = st.floats(lo, hi)
        return (st.one_of(calm, FLOAT_EXTREMES) if self.wild else calm).map(str)

    def choice(self, *options: str, wild: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
        return st.sampled_from(options + (wild if self.wild else ()))


def opt(name: str, values) -> st.SearchStrategy[list[str]]:
    """``[]`` (option left out) or ``[name, value]``."""
    return st.one_of(st.just([]), values.map(lambda v: [name, v]))


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


@pytest.fixture(scope="module")
def place(tmp_path_factory, shared_run) -> dict[str, Path]:
    """Paths of every kind, a tiny run and a folder of eight images."""
    root = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (20, 14), (30, 120, 200)).save(root / "photo.png")
    (root / "notes.txt").write_text("not an image")
    (root / "afile").write_text("x")
    (root / "folder").mkdir()
    Image.new("L", (9, 9), 77).save(root / "folder" / "one.png")
    run = root / "run"
    shutil.copytree(shared_run, run)  # a copy: eval appends to the run's eval.jsonl
    mask = Image.new("L", (20, 14), 0)
    mask.paste(255, (0, 7, 20, 14))  # the lower half: fill in
    mask.save(root / "mask.png")
    (root / "few").mkdir()
    for i in range(8):
        Image.new("L", (8, 8), 20 * i).save(root / "few" / f"{i}.png")
    return {
        "root": root,
        "photo": root / "photo.png",
        "text": root / "notes.txt",
        "file": root / "afile",
        "folder": root / "folder",
        "run": run,
        "model": run / "model.safetensors",
        "few": root / "few",
        "mask": root / "mask.png",
    }


def out_path(place, tmp: Path, v: Values, name: str):
    """An output path: new, or (wild) nested, an existing file, a folder, below a file, empty, '.'."""
    paths = {
        "new": tmp / name,
        "nested": tmp / "a" / "b" / "o.png",
        "file": place["file"],
        "folder": place["folder"],
        "below-file": place["file"] / "o.png",
        "empty": "",
        "dot": ".",
    }
    return v.choice("new", wild=tuple(paths)[1:]).map(lambda k: str(paths[k]))


def check(args: list[str]) -> None:
    r = runner.invoke(app, args, catch_exceptions=True)
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{args}\n{r.exception!r}\n{r.output}"
    assert r.exit_code in (0, 1, 2), f"{args}\n{r.output}"
    assert "Traceback" not in r.output, args
    if r.exit_code and r.stderr.strip():  # one style for every error: exactly one line, "error: ..."
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{args}\n{r.stderr}"
        if " for '--" in lines[0] or "must be" in lines[0] and lines[0].startswith("error: --"):
            assert r.exit_code == 2, f"a bad option value is a usage error, exit 2: {args}\n{r.stderr}"


def schedule_args(place, tmp, v: Values):
    kinds = v.choice("linear", "quadratic", "cosine", "sigmoid")
    return st.tuples(
        st.just(["schedule"]),
        st.lists(opt("--kind", kinds), max_size=3).map(lambda ls: sum(ls, [])),
        opt("-T", v.ints(1, 1200)),
        opt("--beta-start", v.floats(1e-6, 0.02)),
        opt("--beta-end", v.floats(0.005, 0.5)),
        flag("--zero-terminal-snr"),
        opt("--format", v.choice("table", "json", "csv")),
        opt("--rows", v.ints(2, 30)),
        opt("--plot", out_path(place, tmp, v, "plot.png")),
    )


def noise_args(place, tmp, v: Values):
    image = v.choice("photo", wild=("text", "folder", "missing", "empty")).map(
        lambda k: str(place.get(k, tmp / "missing.png")) if k != "empty" else ""
    )
    ts = st.lists(st.integers(-2 if v.wild else 0, 1100), min_size=1, max_size=4).map(lambda t: ",".join(map(str, t)))
    if v.wild:
        ts = st.one_of(ts, st.sampled_from(["", ",", "1,,2", "0x10", "1e3", " 5 ", str(2**70)]))
    return st.tuples(
        st.just(["noise"]),
        image.map(lambda s: [s]),
        opt("--t", ts),
        opt("--kind", v.choice("linear", "quadratic", "cosine", "sigmoid")),
        opt("-T", v.ints(1, 1200)),
        opt("--beta-start", v.floats(1e-6, 0.02)),
        opt("--beta-end", v.floats(0.005, 0.5)),
        flag("--zero-terminal-snr"),
        opt("--size", v.ints(1, 24)),
        opt("--seed", v.ints(0, 100)),
        opt("--out", out_path(place, tmp, v, "strip.png")),
        opt("--frames", out_path(place, tmp, v, "frames")),
        opt("--gif", out_path(place, tmp, v, "noise.gif")),
        flag("--iterative"),
    )


def train_args(place, tmp, v: Values):
    data = v.choice("folder", "digits", wild=("missing", "text", "nope")).map(
        lambda k: {
            "folder": str(place["folder"]),
            "digits": "builtin:digits",
            "missing": str(tmp / "nowhere"),
            "text": str(place["text"]),
            "nope": "builtin:nope",
        }[k]
    )
    csv = st.lists(st.integers(1, 8), min_size=1, max_size=4).map(lambda c: ",".join(map(str, c)))
    if v.wild:
        csv = st.one_of(csv, st.sampled_from(["", "none", "0", "-1", "1,2,", "a,b", str(2**70)]))
    # --image-size stays small (a 4096-pixel builtin:digits is 120 GB), or beyond the limit
    size = st.integers(1, 20).map(str) if not v.wild else st.sampled_from(["0", "-3", "4097", str(10**12), "1", "16"])
    return st.tuples(
        st.just(["train"]),
        data.map(lambda s: [s]),
        st.just(["--out", str(tmp / "run")]),
        opt("--steps", v.ints(1, 50)),
        opt("--batch-size", v.ints(1, 64)),
        opt("--lr", v.floats(1e-6, 1e-2)),
        opt("--warmup", v.ints(0, 100)),
        opt("--image-size", size),
        opt("--channels", v.choice("1", "3", wild=("0", "2", "4", "-1"))),
        opt("--preset", v.choice("auto", "tiny", "small", "ddpm-cifar10")),
        opt("--base-channels", v.ints(1, 64)),
        opt("--channel-mults", csv),
        opt("--num-res-blocks", v.ints(1, 3)),
        opt("--attention-res", csv),
        opt("--dropout", v.floats(0.0, 0.5)),
        opt("--kind", v.choice("linear", "quadratic", "cosine", "sigmoid")),
        opt("-T", v.ints(1, 1200)),
        opt("--beta-start", v.floats(1e-6, 0.02)),
        opt("--beta-end", v.floats(0.005, 0.5)),
        flag("--zero-terminal-snr"),
        opt("--prediction", v.choice("eps", "x0", "v")),
        opt("--loss-weighting", v.choice("uniform", "min-snr")),
        opt("--ema-decay", v.floats(0.0, 0.9999)),
        st.sampled_from([[], ["--flip"], ["--no-flip"]]),
        opt("--save-every", v.ints(1, 100)),
        opt("--sample-every", v.ints(0, 100)),
        opt("--keep", v.ints(1, 5)),
        opt("--device", v.choice("cpu", "auto", wild=("cuda", "cuda:7", "mps", "tpu", "", "CPU"))),
        opt("--precision", v.choice("auto", "fp32", "bf16")),
        flag("--compile"),
        opt("--seed", v.ints(0, 100)),
        flag("--overwrite"),
        st.sampled_from([[], ["--resume"]] if v.wild else [[]]),
    )


def sample_args(place, tmp, v: Values):
    ckpt = v.choice("model", "run", wild=("photo", "folder", "missing", "empty")).map(
        lambda k: str(place.get(k, tmp / "missing.safetensors")) if k != "empty" else ""
    )
    # --num never huge: 10^30 images is a valid, endless request
    num = st.integers(1, 3).map(str) if not v.wild else st.sampled_from(["0", "-2", "1", "3", str(-(2**63) - 1)])
    return st.tuples(
        st.just(["sample"]),
        ckpt.map(lambda s: [s]),
        opt("--num", num),
        st.one_of(st.just(["--out", str(tmp / "imgs")]), opt("--out", out_path(place, tmp, v, "imgs"))),
        opt("--grid", out_path(place, tmp, v, "grid.png")),
        opt("--sampler", v.choice("ddpm", "ddim", "dpmpp")),
        opt("--steps", v.ints(1, 6) if not v.wild else st.sampled_from(["0", "-1", "2", "50", "51", str(2**64)])),
        opt("--eta", v.floats(0.0, 1.0)),
        opt("--seed", v.ints(0, 100)),
        opt("--batch-size", v.ints(1, 4)),
        opt("--device", v.choice("cpu", "auto", wild=("cuda", "cuda:x", "mps", ""))),
        opt("--gif", out_path(place, tmp, v, "sample.gif")),
        st.sampled_from([[], ["--clip"], ["--no-clip"]]),
    )


def _picture(place, tmp, v: Values, *usual: str):
    return v.choice(*usual, wild=("text", "folder", "missing", "empty")).map(
        lambda k: str(place.get(k, tmp / "missing.png")) if k != "empty" else ""
    )


def inpaint_args(place, tmp, v: Values):
    ckpt = v.choice("model", "run", wild=("photo", "folder", "missing")).map(lambda k: str(place.get(k, tmp / "no")))
    return st.tuples(
        st.just(["inpaint"]),
        ckpt.map(lambda s: [s]),
        _picture(place, tmp, v, "photo").map(lambda s: [s]),
        _picture(place, tmp, v, "mask", "photo").map(lambda s: ["--mask", s]),
        st.one_of(st.just(["--out", str(tmp / "filled")]), opt("--out", out_path(place, tmp, v, "filled"))),
        opt("--grid", out_path(place, tmp, v, "grid.png")),
        opt("--num", v.ints(1, 2)),
        flag("--invert-mask"),
        opt("--steps", v.ints(1, 4) if not v.wild else st.sampled_from(["0", "-1", "2", "51", str(2**64)])),
        opt("--jump", v.ints(1, 3) if not v.wild else st.sampled_from(["0", "-1", "2", "100"])),
        opt("--resample", v.ints(1, 2) if not v.wild else st.sampled_from(["0", "-1", "1", str(2**63)])),
        opt("--seed", v.ints(0, 100)),
        opt("--batch-size", v.ints(1, 4)),
        opt("--device", v.choice("cpu", "auto", wild=("cuda", "cuda:x", "mps", ""))),
        flag("--overwrite"),
        st.sampled_from([[], ["--clip"], ["--no-clip"]]),
    )


def interpolate_args(place, tmp, v: Values):
    ckpt = v.choice("model", "run", wild=("photo", "folder", "missing")).map(lambda k: str(place.get(k, tmp / "no")))
    out = st.one_of(st.just(str(tmp / "strip.png")), st.just(str(tmp / "walk.gif")), out_path(place, tmp, v, "i.png"))
    return st.tuples(
        st.just(["interpolate"]),
        ckpt.map(lambda s: [s]),
        _picture(place, tmp, v, "photo").map(lambda s: [s]),
        _picture(place, tmp, v, "photo", "mask").map(lambda s: [s]),
        opt("--frames", v.ints(2, 4) if not v.wild else st.sampled_from(["0", "1", "-3", "3", str(2**64)])),
        opt("--out", out),
        opt("--method", v.choice("ddim", "noise")),
        opt("--strength", v.floats(0.0, 1.0)),
        opt("--sampler", v.choice("ddpm", "ddim", "dpmpp")),
        opt("--steps", v.ints(1, 4) if not v.wild else st.sampled_from(["0", "-1", "2", "51"])),
        opt("--seed", v.ints(0, 100)),
        opt("--device", v.choice("cpu", "auto", wild=("cuda", "cuda:x", "mps", ""))),
        st.sampled_from([[], ["--clip"], ["--no-clip"]]),
    )


def export_args(place, tmp, v: Values):
    source = v.choice("run", "model", wild=("photo", "folder", "missing", "empty", "few")).map(
        lambda k: str(place.get(k, tmp / "missing")) if k != "empty" else ""
    )
    return st.tuples(
        st.just(["export"]),
        source.map(lambda s: [s]),
        out_path(place, tmp, v, "exported").map(lambda s: [s]),
        flag("--overwrite"),
    )


def eval_args(place, tmp, v: Values):
    ckpt = v.choice("model", "run", wild=("photo", "folder", "missing", "empty")).map(
        lambda k: str(place.get(k, tmp / "missing.safetensors")) if k != "empty" else ""
    )
    data = v.choice("few", wild=("folder", "text", "missing", "nope")).map(
        lambda k: {
            "few": str(place["few"]),
            "folder": str(place["folder"]),
            "text": str(place["text"]),
            "missing": str(tmp / "nowhere"),
            "nope": "builtin:nope",
        }[k]  # fmt: skip
    )
    return st.tuples(
        st.just(["eval"]),
        ckpt.map(lambda s: [s]),
        data.map(lambda s: [s]),
        opt("--num-images", v.ints(2, 8)),
        st.sampled_from([[], ["--nll"], ["--no-nll"]]),
        st.sampled_from([[], ["--fd"], ["--no-fd"]]),
        opt("--features", v.choice("randconv", "inception")),
        opt("--variance", v.choice("beta", "posterior")),
        opt("--terms", v.ints(1, 60)),
        opt("--sampler", v.choice("ddpm", "ddim", "dpmpp")),
        opt("--steps", v.ints(1, 6) if not v.wild else st.sampled_from(["0", "-1", "2", "50", "51", str(2**64)])),
        opt("--batch-size", v.ints(1, 8)),
        opt("--seed", v.ints(0, 100)),
        opt("--device", v.choice("cpu", "auto", wild=("cuda", "cuda:x", "mps", ""))),
        opt("--format", v.choice("table", "json")),
        opt("--log", out_path(place, tmp, v, "evals.jsonl")),
    )


@pytest.fixture
def engine_stub(monkeypatch):
    """Replace the training loop: check what the CLI hands over, train nothing."""
    from diffuse_cli.engine.config import DiffusionConfig, TrainConfig, UNetConfig

    def train(data, out, model_config, diffusion_config, config, **kw):
        assert isinstance(config, TrainConfig) and isinstance(model_config, UNetConfig)
        assert diffusion_config is None or isinstance(diffusion_config, DiffusionConfig)
        assert data.images.dtype == torch.uint8 and data.images.shape[-1] == model_config.image_size
        return {
            "out": str(out),
            "model": str(Path(out) / "model.safetensors"),
            "step": config.steps,
            "loss": 0.5,
            "samples": str(Path(out) / "samples"),
            "elapsed": 0.0,
            "is_main": True,
        }

    monkeypatch.setattr(training, "train", train)


def _fuzz(name, make, n, place, tmp_path):
    """``n`` runs of the command, half of them wild; in half of those one option's value becomes junk text."""

    @settings(max_examples=n, **COMMON)
    @given(data=st.data())
    def run(data):
        wild = data.draw(st.booleans(), label="wild")
        parts = [list(p) for p in data.draw(make(place, tmp_path, Values(wild)), label=name)]
        options = [p for p in parts if len(p) == 2 and p[0].startswith("-")]
        if wild and options and data.draw(st.booleans(), label="junk?"):
            data.draw(st.sampled_from(options), label="junk option")[1] = data.draw(text, label="junk")
        check([a for p in parts for a in p])

    run()


def report_args(place, tmp, v: Values):
    run = v.choice("run", wild=("photo", "folder", "missing", "empty", "model")).map(
        lambda k: str(place.get(k, tmp / "missing")) if k != "empty" else ""
    )
    out = st.one_of(st.just([]), out_path(place, tmp, v, "report.png").map(lambda s: ["--out", s]))
    return st.tuples(st.just(["report"]), run.map(lambda s: [s]), out)


MAKERS = {
    "schedule": schedule_args,
    "noise": noise_args,
    "sample": sample_args,
    "inpaint": inpaint_args,
    "interpolate": interpolate_args,
    "export": export_args,
    "eval": eval_args,
    "report": report_args,
}


def test_every_command_is_fuzzed():
    assert sorted([*MAKERS, "train"]) == sorted(COMMANDS)


@pytest.mark.parametrize("command, n", [("schedule", FAST), ("noise", FAST // 2), ("sample", FAST), ("export", FAST // 2),
                                        ("eval", FAST // 2), ("inpaint", FAST // 2), ("interpolate", FAST // 2),
                                        ("report", FAST // 2)])  # fmt: skip
def test_fuzz_command(command, n, place, tmp_path, monkeypatch):
    if command == "eval":
        fake_pytorch_fid(monkeypatch)  # --features inception: no download, the network is not the test
    _fuzz(command, MAKERS[command], n, place, tmp_path)


def test_fuzz_train_validation(place, tmp_path, engine_stub):
    _fuzz("train", train_args, 2 * FAST, place, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("command", [*MAKERS, "train"])
def test_fuzz_command_long(command, place, tmp_path, monkeypatch, request):
    if command == "train":
        request.getfixturevalue("engine_stub")
    if command == "eval":
        fake_pytorch_fid(monkeypatch)
    _fuzz(command, {**MAKERS, "train": train_args}[command], SLOW, place, tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        ["schedule", "-T", str(10**9), "--format", "json"],  # was: gigabytes of tables, then the OOM killer
        ["schedule", "--rows", str(10**9)],  # was: a minutes-long loop to show T rows
        [
            "schedule",
            "--beta-start",
            "1e-300",
            "--beta-end",
            "1e-299",
            "--plot",
            "p.png",
        ],  # was: ValueError in the plot
        ["noise", "PHOTO", "--seed", str(2**64), "--t", "0", "--out", "o.png"],  # was: OverflowError from torch
        ["sample", "MODEL", "--seed", str(10**20), "--num", "1"],
        ["train", "builtin:digits", "--seed", str(2**64), "--steps", "1"],
        ["train", "builtin:digits", "--image-size", "100000", "--steps", "1"],  # was: RuntimeError, 72 TB allocation
    ],
)
def test_former_crashes(args, place):
    args = [str(place["photo"]) if a == "PHOTO" else str(place["model"]) if a == "MODEL" else a for a in args]
    r = runner.invoke(app, args, catch_exceptions=True)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 1, 2) and "Traceback" not in r.output


def train_one_step(out: Path):
    return runner.invoke(
        app, ["train", "builtin:digits", "--preset", "tiny", "--steps", "1", "--device", "cpu", "--out", str(out)]
    )


def test_out_of_memory_is_one_line(place, monkeypatch, tmp_path):
    """An allocation failure anywhere (here: building the model) is one line with a hint, exit 1."""
    from diffuse_cli.engine import unet

    def boom(*a, **k):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 160000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(unet.UNet, "__init__", boom)
    r = train_one_step(tmp_path / "r")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == (
        "error: out of memory (tried to allocate 160000000000 bytes); try a smaller --batch-size, --image-size or model"
    )
    monkeypatch.undo()

    def other(*a, **k):
        raise RuntimeError("some other internal failure")

    monkeypatch.setattr(unet.UNet, "__init__", other)
    r = train_one_step(tmp_path / "r2")
    assert isinstance(r.exception, RuntimeError)  # not an allocation failure: `main` reports it as unexpected


def test_unexpected_errors_are_one_line_through_main(tmp_path):
    """The entry point's last line of defence, as a user meets it."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSE_DEBUG", None)
    code = (
        "import sys; from diffuse_cli import cli; from diffuse_cli.engine import schedules\n"
        "def boom(*a, **k): raise ZeroDivisionError('a bug')\n"
        "schedules.make_betas = boom\n"
        "sys.argv = ['diffuse', 'schedule']; cli.main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: unexpected ZeroDivisionError: a bug") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
