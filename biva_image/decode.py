"""Decoding image files: raw items (bytes, {bytes, path} dicts, paths, PIL images) -> uint8 (N, C, H, W)
through a recipe's ``to_array``, in a thread pool (PIL releases the GIL while decoding and resizing)."""
from __future__ import annotations

import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from tqdm import tqdm

from shared.errors import UserError

_PROGRESS_MIN = 5000  # no progress bar below this many images


def open_image(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return Image.open(io.BytesIO(item["bytes"]))
        if item.get("path"):
            return Image.open(item["path"])
    if isinstance(item, (bytes, bytearray)):
        return Image.open(io.BytesIO(item))
    if isinstance(item, (str, os.PathLike)):
        return Image.open(item)
    raise ValueError(f"holds no image (got {type(item).__name__})")


def _decode_batch(recipe, start: int, batch: list, describe: Callable[[int], str]) -> list[np.ndarray]:
    arrays = []
    for offset, item in enumerate(batch):
        try:
            with open_image(item) as image:
                arrays.append(recipe.to_array(image))
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for broken files
            raise UserError(f"could not read the image {describe(start + offset)} ({err}); "
                            "remove or replace that file") from None
    return arrays


def _describe_shape(shape: tuple[int, int, int]) -> str:
    height, width, channels = shape
    return f"{width}x{height} pixels with {channels} channel{'s' if channels != 1 else ''}"


def decode_all(batches: Iterable[list], n: int, recipe, describe: Callable[[int], str], desc: str) -> np.ndarray:
    """The ``n`` items of ``batches`` as uint8 (n, C, H, W), decoded by ``recipe`` (a sources.Recipe: its
    ``to_array``, ``shape`` and ``name``); ``describe(i)`` names item i in errors. Every image must have
    the recipe's shape, or (shape None) the first image's."""
    expected = None if recipe.shape is None else (recipe.shape[1], recipe.shape[2], recipe.shape[0])
    out = None
    workers = max(1, min(8, os.cpu_count() or 1))
    pending: deque = deque()
    done = 0
    with ThreadPoolExecutor(workers) as pool, tqdm(total=n, desc=desc, unit="img", disable=n < _PROGRESS_MIN) as bar:

        def drain_one() -> None:
            nonlocal out, expected
            start, future = pending.popleft()
            arrays = future.result()
            if start + len(arrays) > n:
                raise RuntimeError(f"{desc}: the source yielded more than the {n} rows it announced")
            for offset, array in enumerate(arrays):
                i = start + offset
                if expected is None:
                    expected = array.shape
                if array.shape != expected:
                    reference = f"as {recipe.name} expects" if recipe.shape else f"as {describe(0)}"
                    hint = "; use --dataset folder for other sizes" if recipe.shape else \
                        "; resize or remove it (all images must share one size and channel count)"
                    raise UserError(f"{describe(i)} is {_describe_shape(array.shape)}, expected "
                                    f"{_describe_shape(expected)} {reference}{hint}")
                if out is None:
                    out = np.empty((n, expected[2], expected[0], expected[1]), dtype=np.uint8)
                out[i] = array.transpose(2, 0, 1)
            bar.update(len(arrays))

        for batch in batches:
            pending.append((done, pool.submit(_decode_batch, recipe, done, list(batch), describe)))
            done += len(batch)
            if len(pending) >= 2 * workers:  # bounded: never holds the whole dataset's bytes at once
                drain_one()
        while pending:
            drain_one()
    if done != n:
        raise RuntimeError(f"{desc}: the source yielded {done} rows, not the {n} it announced")
    if out is None:
        shape = expected if expected is not None else (0, 0, 0)
        out = np.empty((0, shape[2], shape[0], shape[1]), dtype=np.uint8)
    return out
