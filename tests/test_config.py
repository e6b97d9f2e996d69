"""Configs and their defaults (engine/config.py): presets and batch size by device, --time durations."""

import pytest

from diffuse_cli.engine.config import UNetConfig, auto_preset, default_batch_size, parse_duration
from diffuse_cli.engine.errors import ConfigError
from diffuse_cli.engine.unet import UNet, count_parameters


def test_preset_and_batch_by_device():
    assert auto_preset(16, "cpu") == "cpu" and auto_preset(32, "cpu") == "cpu"
    assert auto_preset(32, "cuda") == "ddpm-cifar10" and auto_preset(16, "cuda") == "small"
    cpu16 = UNetConfig.preset("auto", 16, 1, "cpu")
    gpu32 = UNetConfig.preset("auto", 32, 3, "cuda")
    assert cpu16.attention_resolutions == (8,) and cpu16.num_res_blocks == 2
    assert count_parameters(UNet(cpu16)) < 2_000_000  # minutes on a CPU, not hours
    assert count_parameters(UNet(gpu32)) == 35_746_307  # DDPM's CIFAR-10 model on a GPU
    assert UNetConfig.preset("auto", 64, 3, "cpu").attention_resolutions == (16,)  # attention stays cheap
    assert default_batch_size("cpu") == 32 and default_batch_size("cuda") == 128


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("1.5h", 5400), ("2h30m", 9000), ("45", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-3m", "0", "m5", "5m5"])
def test_parse_duration_refuses(text):
    with pytest.raises(ConfigError, match="--time"):
        parse_duration(text)
