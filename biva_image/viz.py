"""Image grids as PNG."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .names import MIN_TILE_PX


def auto_scale(height: int, width: int) -> int:
    """The smallest integer factor that shows every image at least MIN_TILE_PX pixels on its shorter side."""
    return max(1, math.ceil(MIN_TILE_PX / max(1, min(height, width))))


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, pad: int = 1,
              scale: int | None = None) -> Path:
    """uint8 images (N, C, H, W), C in {1, 3, 4}, tiled into one PNG (written atomically) and enlarged
    ``scale`` times by pixel repetition (nearest neighbour; None: ``auto_scale``): a 32x32 image is
    tiny on a screen, and interpolation would blur the very pixels one wants to judge."""
    images = np.asarray(images)
    n, c, h, w = images.shape
    scale = auto_scale(h, w) if scale is None else scale
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = images[i].transpose(1, 2, 0)
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode).save(tmp)
    os.replace(tmp, path)
    return path
