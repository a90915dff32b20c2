"""Image grids as PNG."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def save_grid(images: np.ndarray, path: str | Path, ncol: int | None = None, pad: int = 1) -> Path:
    """uint8 images (N, C, H, W), C in {1, 3, 4}, tiled into one PNG (written atomically)."""
    images = np.asarray(images)
    n, c, h, w = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = images[i].transpose(1, 2, 0)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode).save(tmp)
    os.replace(tmp, path)
    return path
