"""Sample and reconstruction grids (biva_image.viz.save_grid): enlarged by an integer factor with the
pixels repeated, so that a grid of 32x32 images is readable and still shows the model's exact pixels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from biva_image.viz import auto_scale, save_grid


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size)).astype(np.uint8)


def _read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_a_4x4_grid_of_32px_images_is_enlarged_twice_by_default(tmp_path):
    images = _images(16, 32)
    native = _read(save_grid(images, tmp_path / "native.png", scale=1))
    assert native.shape == (133, 133, 3)  # 4 x (32 + 1 px border) + 1: the 128-pixel grid of old
    auto = _read(save_grid(images, tmp_path / "auto.png"))
    assert auto.shape == (266, 266, 3)  # every image 64 px wide
    assert np.array_equal(auto[::2, ::2], native)
    tripled = _read(save_grid(images, tmp_path / "x3.png", scale=3))
    assert tripled.shape == (399, 399, 3)
    assert np.array_equal(tripled, native.repeat(3, axis=0).repeat(3, axis=1))
    # the images themselves, not only the size: tile (row 1, column 2) of the tripled grid
    y, x = 3 * (1 + 1 * 33), 3 * (1 + 2 * 33)
    assert np.array_equal(tripled[y:y + 96:3, x:x + 96:3], images[6].transpose(1, 2, 0))


@pytest.mark.parametrize("size,factor", [(8, 8), (28, 3), (32, 2), (64, 1), (100, 1)])
def test_auto_scale_makes_every_image_at_least_64_pixels(size, factor, tmp_path):
    assert auto_scale(size, size) == factor
    grid = _read(save_grid(_images(4, size, channels=1), tmp_path / "g.png"))
    assert grid.shape == ((2 * (size + 1) + 1) * factor,) * 2


def test_a_scale_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError):
        save_grid(_images(1, 8), tmp_path / "g.png", scale=0)
    assert not (tmp_path / "g.png").exists()
