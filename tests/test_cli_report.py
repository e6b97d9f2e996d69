"""`diffuse train` with the in-training evaluation, `diffuse eval`'s near-copies, and `diffuse report`."""

import json

from PIL import Image

from diffuse_cli.engine.data import load_builtin
from diffuse_cli.engine.data.cache import default_cache_dir as _cache
from helpers import TINY_TRAIN, invoke, one_line_error


def test_train_eval_and_report_commands(tmp_path):
    folder, out = tmp_path / "digits", tmp_path / "run"
    folder.mkdir()
    for i, im in enumerate(load_builtin("digits").images[:60]):  # a small folder: quick real statistics
        Image.fromarray(im[0].numpy(), "L").save(folder / f"{i}.png")
    r = invoke("train", folder, "--out", out, *TINY_TRAIN, "-T", "20", "--eval-every", "2", "--eval-samples", "8")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "step 2: FD" in text and "real vs real at 8" in text and "near-copies" in text
    assert "best.safetensors (step" in text and "report.png" in text
    assert (out / "best.safetensors").exists() and (out / "report.png").exists()

    assert list(tmp_path.glob("**/*.stats.safetensors")) or list(_cache().glob("*.stats.safetensors"))
    r = invoke("eval", out, folder, "-n", 16, "--steps", 3, "--no-nll", "--format", "json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    mem = json.loads(r.stdout.strip().splitlines()[-1])["memorisation"]
    assert 0 <= mem["near_copy_share"] <= 1 and mem["samples"] == 16 and mem["k"] == 50 and mem["references"] == 60
    with Image.open(mem["picture"]) as im:  # each sample beside its 3 nearest training images
        assert im.width > 3 * im.height / 16

    r = invoke("report", out, out, "--out", tmp_path / "both.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "both.png").exists() and "best FD" in r.output
    assert "no log.jsonl" in one_line_error(invoke("report", tmp_path / "nothing"), 2)
    r = invoke("report", "-h")
    assert r.exit_code == 0 and "diffuse report" in r.stdout
