"""torchrun with 2 CPU processes (gloo): the same run as one process, one writer, resumable on any count.

Every rank draws the whole global batch from the shared data generator and keeps its
slice, and DDP averages the gradients, so 2 processes x 4 images must follow the
1 process x 8 images run up to float rounding (the all-reduce sums in another order).

"The same run" is checked on what training computes: the network (model and EMA outputs
on fixed inputs) and Adam's first moments (running means of the averaged gradients).
Raw weights are not compared elementwise: where a gradient is zero in exact arithmetic
(the bias of the last block feeds a GroupNorm with one channel per group, which removes
it) the computed gradient is rounding noise, and Adam, dividing by its own scale, turns
noise into full-size steps; those weights differ between the runs and the network does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffuse_cli.engine import checkpoint as ckpt
from diffuse_cli.engine import models

# --warmup 0 and a large --lr move the outputs by ~0.3 per step, far above ATOL, so a rank
# training on the wrong slice (or on a stale batch) cannot pass by accident.
ARGS = ["--batch-size", "8", "--preset", "tiny", "--dropout", "0", "--save-every", "2", "--sample-every", "0",
        "--warmup", "0", "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
ATOL, RTOL = 1e-5, 1e-4  # measured: 2e-7 on outputs of magnitude 0.7, 1e-8 on first moments of 0.05
TIMEOUT = 180


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", **extra}


def train(
    out: Path, steps: int, nproc: int = 1, *extra: str, env: dict | None = None, entry: list[str] | None = None
) -> subprocess.CompletedProcess:
    cli = [
        *(entry or ["-m", "diffuse_cli"]),
        "train",
        "builtin:digits",
        "--out",
        str(out),
        "--steps",
        str(steps),
        *ARGS,
        *extra,
    ]
    # --standalone: a private rendezvous on a free port, so parallel test runs do not collide.
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, *cli], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env or _env())  # fmt: skip


def state(run: Path, step: int) -> ckpt.Checkpoint:
    return ckpt.load(ckpt.state_path(run, step), expect_kind="state")


def outputs(ck: ckpt.Checkpoint, prefix: str) -> torch.Tensor:
    """The network's prediction for fixed noisy digits at timesteps across [0, T)."""
    net = models.build_model(ck, prefix=prefix)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: more threads only spin, badly so on a busy machine
    try:
        with torch.no_grad():
            return net(x, torch.linspace(0, 999, 16).long())
    finally:
        torch.set_num_threads(threads)


def assert_same_training(a: ckpt.Checkpoint, b: ckpt.Checkpoint) -> None:
    for prefix in ("model.", "ema."):
        torch.testing.assert_close(outputs(a, prefix), outputs(b, prefix), atol=ATOL, rtol=RTOL)
    moments = [k for k in a.tensors if k.endswith(".exp_avg")]
    assert moments and moments == [k for k in b.tensors if k.endswith(".exp_avg")]
    for k in moments:
        torch.testing.assert_close(
            a.tensors[k], b.tensors[k], atol=ATOL / 10, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process run to step 4 (each rank's final weights dumped, a preview at the end) and a 1-process run to 6.

    The preview draws from its own generator, so it does not change the training run.
    """
    root = tmp_path_factory.mktemp("dist")
    dump = root / "ranks"
    dump.mkdir()
    two = train(
        root / "two",
        4,
        2,
        "--sample-every",
        "4",
        env=_env(DUMP_DIR=str(dump)),
        entry=[str(Path(__file__).with_name("rank_dump.py"))],
    )
    assert two.returncode == 0, two.stdout + two.stderr
    one = train(root / "one", 6)
    assert one.returncode == 0, one.stdout + one.stderr
    return root, two


def test_ranks_agree_and_match_one_process(runs):
    root, _ = runs
    from safetensors.torch import load_file

    rank0, rank1 = load_file(root / "ranks" / "rank0.safetensors"), load_file(root / "ranks" / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any(k.startswith("ema.") for k in rank0)
    for k in rank0:  # DDP and the EMA keep the replicas bit-identical, not just close
        assert torch.equal(rank0[k], rank1[k]), k

    two, one = state(root / "two", 4), state(root / "one", 4)
    for k, v in rank0.items():  # the dump is the state rank 0 saved
        assert torch.equal(v, two.tensors[k]), k
    assert_same_training(two, one)
    with pytest.raises(AssertionError):  # the tolerance is tight enough to tell steps apart
        assert_same_training(two, state(root / "one", 2))
    assert torch.equal(two.tensors["rng.data"], one.tensors["rng.data"])  # both drew the same global batches


def test_only_rank_zero_writes(runs):
    root, proc = runs
    run = root / "two"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == ["checkpoints/state-00000002.safetensors", "checkpoints/state-00000004.safetensors",
                     "config.json", "log.jsonl", "model.safetensors", "report.png", "samples/step-000004.png"]  # fmt: skip
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    one = [json.loads(line) for line in (root / "one" / "log.jsonl").read_text().splitlines()]
    for a, b in zip(log, one, strict=False):  # the logged loss is the global mean over both ranks
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert ckpt.load(run / "model.safetensors").step == 4
    assert proc.stdout.count("done 4 steps") == 1  # only rank 0 talks


def test_two_process_run_resumes_in_one_process(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "two"
    shutil.copytree(root / "two", run)
    res = train(run, 6, 1, "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming at step 4" in res.stdout
    assert_same_training(state(run, 6), state(root / "one", 6))
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == [2, 4, 6]


@pytest.mark.slow  # one more torchrun launch (about 10 s on 2 busy cores)
def test_micro_batches_under_torchrun_train_the_one_process_run(runs, tmp_path):
    """2 processes x 4 images, each in passes of 3 + 1 (gradient accumulation, DDP syncing only the last pass):
    still the 1-process run of 8 images."""
    root, _ = runs
    res = train(tmp_path / "micro", 4, 2, "--micro-batch", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert_same_training(state(tmp_path / "micro", 4), state(root / "one", 4))


def test_failure_on_rank_zero_stops_every_rank(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    res = train(out, 4, 2)
    assert res.returncode != 0
    assert "is not empty" in res.stderr  # rank 0's own message
    assert "stopped because rank 0 failed" in res.stderr  # rank 1 heard about it instead of waiting
    assert (out / "notes.txt").read_text() == "not a run"


# --- two nodes ------------------------------------------------------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_multinode_command() -> list[str]:
    """The README's multi-node torchrun command, as words (its line continuations joined)."""
    import shlex

    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("torchrun --nnodes"))
    text = ""
    for line in lines[start:]:
        text += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    return shlex.split(text)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set(words: list[str], option: str, value: str) -> None:
    words[words.index(option) + 1] = value


@pytest.fixture(scope="module")
def gray_folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("gray8")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8 + i % 4, 8), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return d


@pytest.mark.slow  # about 20 s on 2 busy cores: four torch start-ups (two agents, two workers) plus the reference run
def test_two_nodes_train_the_one_process_run(gray_folder, tmp_path):
    """Two torchrun agents on this machine as two 'nodes' (c10d rendezvous on 127.0.0.1, gloo, 1 process each),
    launched with the README's multi-node command, train what one process trains on the same global batches.

    Both nodes share one cache directory here, as nodes on a shared file system would: one builds, one checks.
    """
    words = readme_multinode_command()
    assert words[0] == "torchrun" and words[words.index("-m") + 1 :][:2] == ["diffuse_cli", "train"]
    _set(words, "--nproc-per-node", "1")
    _set(words, "--rdzv-endpoint", f"127.0.0.1:{_free_port()}")
    _set(words, "--rdzv-id", f"test-{os.getpid()}")
    _set(words, "--out", str(tmp_path / "two"))
    _set(words, "--batch-size", "8")
    words[words.index("train") + 1] = str(gray_folder)
    assert ARGS[:2] == ["--batch-size", "8"]
    tail = ["--steps", "4", "--image-size", "8", "--channels", "1", *ARGS[2:]]  # folders: random flips on
    cmd = [sys.executable, "-m", "torch.distributed.run", *words[1:], *tail]
    env = _env(DIFFUSE_CACHE_DIR=str(tmp_path / "cache"))
    agents = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outs = [a.communicate(timeout=TIMEOUT) for a in agents]
    for a, (out, err) in zip(agents, outs, strict=True):
        assert a.returncode == 0, out + err
    text = "".join(out for out, _ in outs)
    assert text.count("done 4 steps") == 1 and "2 process(es)" in text  # one rank 0 over both nodes
    assert "batches read from the memory-mapped cache" in text

    one = subprocess.run([sys.executable, "-m", "diffuse_cli", "train", str(gray_folder), "--out", str(tmp_path / "one"),
                          "--batch-size", "8", *tail], capture_output=True, text=True, timeout=TIMEOUT, env=env)  # fmt: skip
    assert one.returncode == 0, one.stdout + one.stderr
    assert "memory-mapped from the cache" in " ".join(one.stdout.split())  # the nodes left one valid cache file
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    two, single = state(tmp_path / "two", 4), state(tmp_path / "one", 4)
    assert_same_training(two, single)
    assert torch.equal(two.tensors["rng.data"], single.tensors["rng.data"])
    with pytest.raises(AssertionError):  # a different run is told apart
        assert_same_training(two, state(tmp_path / "one", 2))
