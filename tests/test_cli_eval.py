"""`diffuse eval` as a user runs it, on the session's tiny run (conftest `shared_run`, T = 50): the table, JSON,
the log it appends to, and its bad input. The metrics themselves are tested in test_evaluate.py."""

from __future__ import annotations

import json

from helpers import fake_pytorch_fid, one_line_error
from helpers import invoke as run


def test_eval_cli_table_json_and_log(shared_run_copy):
    r = run("eval", shared_run_copy, "builtin:digits", "--num-images", 24, "--steps", 5, "--device", "cpu")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "bits/dim" in text and "NOT FID" in text and "precision" in text and "eval.jsonl" in text
    r = run("eval", shared_run_copy, "builtin:digits", "-n", 24, "--steps", 5, "--terms", 5, "--format", "json",
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["nll"]["terms"] == 5 and rec["nll"]["timesteps"] == 50 and rec["images"] == 24
    lo, hi = rec["nll"]["ci95"]
    assert lo < rec["nll"]["bits_per_dim"] < hi
    assert rec["fd"]["features"] == "randconv" and rec["fd"]["is_fid"] is False
    assert 0 <= rec["precision"] <= 1 and 0 <= rec["recall"] <= 1
    lines = (shared_run_copy / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == rec


def test_eval_cli_bad_input_is_one_line(shared_run_copy, tmp_path, monkeypatch):
    assert "nothing to evaluate" in one_line_error(
        run("eval", shared_run_copy, "builtin:digits", "--no-nll", "--no-fd"), 2
    )
    assert "--num-images" in one_line_error(run("eval", shared_run_copy, "builtin:digits", "-n", 2), 2)
    assert "no such" in one_line_error(run("eval", tmp_path / "nope", "builtin:digits", "--log", tmp_path / "l.jsonl"))
    fake_pytorch_fid(monkeypatch)
    msg = one_line_error(run("eval", shared_run_copy, "builtin:digits", "-n", 8, "--steps", 2, "--no-nll",
                             "--features", "inception", "--log", tmp_path / "l.jsonl"))  # fmt: skip
    assert "cannot fetch the Inception-v3 weights" in msg


def test_a_seed_beyond_64_bits_is_a_usage_error(shared_run):
    r = run("eval", shared_run, "builtin:digits", "-n", 4, "--no-nll", "--steps", 1, "--seed", 2**64)
    assert "--seed" in one_line_error(r, 2)
