"""Tensors to pictures (engine/images.py): pixel values, grids, upscaling, GIFs, plots, written atomically.

Oracles: the [-1, 1] <-> 0..255 map and its inverse (data.to_model_range), numpy's repeat for a
nearest-neighbour upscale, and the grid's layout arithmetic, pixel by pixel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse_cli.engine import images as img
from diffuse_cli.engine.data import to_model_range
from diffuse_cli.engine.fileio import TMP_PREFIX


def _u8(shape, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_to_pil_round_trips_uint8_through_the_model_range(channels, mode):
    u8 = _u8((channels, 5, 7))
    for x in (u8, to_model_range(u8), to_model_range(u8, torch.float64)):
        pil = img.to_pil(x)
        assert pil.mode == mode and pil.size == (7, 5)  # PIL sizes are (width, height)
        arr = np.asarray(pil)
        assert np.array_equal(arr if arr.ndim == 3 else arr[..., None], u8.permute(1, 2, 0).numpy())


def test_to_uint8_clips_and_rounds_to_nearest():
    x = torch.tensor([-5.0, -1.0, -1 + 0.4 / 127.5, -1 + 0.6 / 127.5, 0.0, 1.0, 7.0, math.inf, -math.inf])
    assert img.to_uint8(x).tolist() == [0, 0, 0, 1, 128, 255, 255, 255, 0]  # 0.0 -> 127.5 -> 128 (half to even)


@pytest.mark.parametrize("size, min_size, factor", [((8, 8), 64, 8), ((10, 4), 9, 3), ((5, 5), 5, 1), ((6, 3), 2, 1)])
def test_upscale_repeats_each_pixel_by_an_integer_factor(size, min_size, factor):
    src = Image.fromarray(_u8((size[1], size[0])).numpy(), "L")
    out = img.upscale(src, min_size)
    assert out.size == (size[0] * factor, size[1] * factor)
    assert min(out.size) >= min_size or factor == 1
    want = np.repeat(np.repeat(np.asarray(src), factor, 0), factor, 1)
    assert np.array_equal(np.asarray(out), want)
    if factor == 1:
        assert out is src


@pytest.mark.parametrize("b, nrow, rows, cols", [(1, None, 1, 1), (5, None, 2, 3), (9, None, 3, 3), (6, 2, 3, 2),
                                                 (3, 7, 1, 7)])  # fmt: skip
@pytest.mark.parametrize("channels", [1, 3])
def test_make_grid_places_image_i_at_row_i_div_nrow(b, nrow, rows, cols, channels):
    h, w, pad = 4, 6, 2
    u8 = _u8((b, channels, h, w), seed=b)
    grid = np.asarray(img.make_grid(u8, nrow=nrow, pad=pad, pad_value=17))
    grid = grid if grid.ndim == 3 else grid[..., None]
    assert grid.shape == (rows * (h + pad) + pad, cols * (w + pad) + pad, channels)
    filled = np.zeros(grid.shape[:2], bool)
    for i in range(b):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        assert np.array_equal(grid[y : y + h, x : x + w], u8[i].permute(1, 2, 0).numpy()), i
        filled[y : y + h, x : x + w] = True
    assert (grid[~filled] == 17).all()  # padding and empty cells


def test_make_grid_of_model_range_images_is_their_uint8_grid():
    u8 = _u8((4, 3, 5, 5))
    assert np.array_equal(np.asarray(img.make_grid(to_model_range(u8))), np.asarray(img.make_grid(u8)))


def test_save_image_writes_atomically_and_round_trips(tmp_path):
    pil = img.to_pil(_u8((3, 9, 11)))
    path = tmp_path / "sub" / "a.png"
    img.save_image(pil, path)
    with Image.open(path) as back:
        assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(pil))
    assert not list(tmp_path.rglob(f"{TMP_PREFIX}*"))


def test_save_gif_holds_the_last_frame(tmp_path):
    frames = [img.to_pil(torch.full((1, 8, 8), v, dtype=torch.uint8)) for v in (0, 100, 200)]
    img.save_gif(frames, tmp_path / "a.gif", duration_ms=120)
    with Image.open(tmp_path / "a.gif") as g:
        assert g.n_frames == 3 and g.info.get("loop") == 0
        durations = []
        for k in range(3):
            g.seek(k)
            durations.append(g.info["duration"])
            assert np.asarray(g.convert("L"))[0, 0] == (0, 100, 200)[k]
    assert durations == [120, 120, 1500]
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))


@pytest.mark.parametrize("lo, hi", [(0, 1), (0, 999), (-13.2, 4.1), (1e-4, 0.02), (-7.5, -7.1), (3, 1e6)])
def test_nice_ticks_are_round_and_cover_the_range(lo, hi):
    ticks = img.nice_ticks(lo, hi)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6, step  # 1, 2 or 5 times a power of ten
    assert all(b - a == pytest.approx(step) for a, b in zip(ticks, ticks[1:], strict=False))
    assert lo - 1e-9 * abs(step) <= ticks[0] < lo + step and hi - step < ticks[-1] <= hi + 1e-9 * abs(step)
    assert 3 <= len(ticks) <= 11  # about 5


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (2.0, 1.0), (0.0, math.inf), (math.nan, 1.0)])
def test_nice_ticks_of_an_empty_or_unbounded_range_is_one_tick(lo, hi):
    ticks = img.nice_ticks(lo, hi)
    assert len(ticks) == 1 and (ticks[0] == lo or math.isnan(lo) and math.isnan(ticks[0]))


def test_line_plot_draws_each_series_in_its_colour_and_survives_infinities():
    xs = list(range(50))
    series = [("a", xs, [x / 49 for x in xs]), ("b", xs, [math.inf if x > 40 else -x / 49 for x in xs])]
    plot = img.line_plot(series, title="t", xlabel="x", ylabel="y", size=(300, 200))
    assert plot.size == (300, 220)  # a legend row below the axes for two series
    colours = {c for _, c in plot.getcolors(1 << 20)}
    assert img.PALETTE[0] in colours and img.PALETTE[1] in colours
    flat = img.line_plot([("only", [0, 1], [math.inf, math.inf])], title="t", xlabel="x", ylabel="y")
    assert flat.size == (520, 340) and img.PALETTE[0] not in {c for _, c in flat.getcolors(1 << 20)}


def test_labelled_strip_and_grid_of_plots_sizes():
    panels = [img.to_pil(_u8((3, 8, 8), seed=k)) for k in range(3)]
    strip = img.labelled_strip(panels, ["a", "b", "c"], panel_size=32)
    assert strip.width == 3 * (32 + 6) + 6 and strip.height > 32
    assert np.array_equal(np.asarray(strip)[6 : 6 + 32 : 4, 6 : 6 + 32 : 4], np.asarray(panels[0]))  # 4x pixels
    with pytest.raises(ValueError):
        img.labelled_strip(panels, ["a", "b"])  # one label per panel
    grid = img.grid_of_plots([Image.new("RGB", (10, 20))] * 3, ncol=2, gap=4)
    assert grid.size == (2 * 10 + 4, 2 * 20 + 4)


@pytest.mark.parametrize("n, max_frames, kept", [(5, 40, 5), (100, 40, 34), (81, 40, 27), (1, 1, 1)])
def test_trajectory_frames_thins_evenly_and_keeps_the_last(n, max_frames, kept):
    frames = [(torch.full((2, 1, 4, 4), -1 + k / n), torch.full((2, 1, 4, 4), 1 - k / n)) for k in range(n)]
    out = img.trajectory_frames(frames, max_frames=max_frames)
    assert len(out) == kept <= max_frames
    last = img.upscale(img.make_grid(torch.cat(frames[-1]), nrow=2), 256)
    assert np.array_equal(np.asarray(out[-1]), np.asarray(last))


def test_schedule_plot_writes_four_panels(tmp_path):
    from diffuse_cli.engine.config import DiffusionConfig
    from diffuse_cli.engine.diffusion import Diffusion

    d = {"linear": Diffusion(DiffusionConfig(timesteps=20)), "cosine": Diffusion(DiffusionConfig("cosine", 20))}
    img.schedule_plot(d, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as p:
        assert p.size == (2 * 520 + 8, 2 * 360 + 8)
