"""Small fixed data and tiny models for the core tests (no network, seconds on a CPU)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from biva_image.model import ImageModelConfig, ImageVAE
from shared.config import RunConfig, TrainConfig, to_dict
from shared.ladder import VARIANTS, LadderConfig


class ArrayDataset(Dataset):
    def __init__(self, x: np.ndarray):
        self.x = torch.from_numpy(x)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"index": i, "x": self.x[i]}


def stripes(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    """Binary-ish 1x8x8 images: random horizontal/vertical bars with a little noise, as uint8."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, size, size), dtype=np.uint8)
    for i in range(n):
        k = rng.integers(0, size)
        if rng.random() < 0.5:
            x[i, 0, k, :] = 255
        else:
            x[i, 0, :, k] = 255
    flip = rng.random(x.shape) < 0.02
    x[flip] = 255 - x[flip]
    return x


def tiny_ladder(variant: str = "biva", levels: int = 3, kind: str = "dense", channels: int = 1,
                size: int = 8, width: int = 16, depth: int = 1) -> LadderConfig:
    bu, skip = VARIANTS[variant]
    return LadderConfig(ndim=2, input_channels=channels, input_size=[size, size], output_channels=width,
                        levels=levels, channels=[width] * levels, latent_channels=[4] * levels,
                        strides=[2] + [1] * (levels - 1), kernels=[3] * levels, depth=depth,
                        latent_kind=kind, bu_latents=bu, td_skip=skip)


def tiny_image_config(variant="biva", likelihood="bernoulli", **kw) -> ImageModelConfig:
    channels = 1 if likelihood == "bernoulli" else kw.pop("channels", 3)
    ladder = tiny_ladder(variant, channels=channels, **kw)
    return ImageModelConfig(image_shape=[channels, ladder.input_size[0], ladder.input_size[1]],
                            likelihood=likelihood, binarize="dynamic" if likelihood == "bernoulli" else "none",
                            mixture_components=3, ladder=ladder)


def tiny_run(model_cfg: ImageModelConfig, **train) -> RunConfig:
    base = dict(max_steps=20, batch_size=16, lr=2e-3, eval_every=10, save_every=10, log_every=5,
                ema_decay=0.99, free_bits=0.0)
    base.update(train)
    return RunConfig(modality="image", preset="test", model=to_dict(model_cfg), data={}, train=TrainConfig(**base))


def build(model_cfg: ImageModelConfig):
    return lambda: ImageVAE(model_cfg)


def image_batch(likelihood: str, n: int = 8) -> dict:
    """A batch of n images: stripes for a Bernoulli head, seeded random 3x8x8 uint8 for the mixture head."""
    x = torch.as_tensor(stripes(n)) if likelihood == "bernoulli" else \
        torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return {"index": torch.arange(n), "x": x}
