"""Image data: the data config, the split and dataset types, and their assembly (``load_image_splits``,
``image_shape``): every source becomes uint8 arrays (N, C, H, W), converted once and cached.

What each source is and how it is read: sources.py; the cache: cache.py; how train / validation / test
are carved and the labelled subsets of semi-supervised runs: splits.py. Their public names are
importable from here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.errors import UserError

from .cache import CACHE_VERSION, cached_meta, load_cached  # noqa: F401  (CACHE_VERSION: importable here)
from .names import IMAGE_DATASETS  # noqa: F401  (torch-free, for the CLIs)
from .sources import (BINARIZED_MNIST_FILES, BINARIZED_MNIST_URL, IMAGE_SUFFIXES, OMNIGLOT_FILE,  # noqa: F401
                      RECIPES, TABLE_SUFFIXES, Recipe, convert, first_local_image, recipe_of)
from .splits import VALID_FROM_TRAIN, carve, carve_splits, labelled_subset, num_classes  # noqa: F401

@dataclass
class ImageDataConfig:
    dataset: str = "cifar10"  # one of IMAGE_DATASETS; "folder" for a local image folder
    data_dir: str | None = None  # local image folder, or a local copy of a hub dataset
    split_seed: int = 0  # seed of the train/validation (and OMNIGLOT test) carving
    # Carved from train when the source has no validation split; <= 10% of train. 0: train on all of
    # train, validate on a seeded subset of it (train_image.py's default for FULL_TRAIN_DATASETS).
    valid_size: int = 5000
    cache_dir: str | None = None  # converted uint8 arrays; default ~/.cache/biva/images
    # Semi-supervised runs: this many labelled training examples per class (labelled_subset); the rest
    # of the training split trains without labels. None: every example unlabelled (the usual run).
    labels_per_class: int | None = None

@dataclass
class ImageSplits:
    train: np.ndarray  # uint8 (N, C, H, W)
    valid: np.ndarray  # uint8 (N, C, H, W)
    test: np.ndarray | None
    train_labels: np.ndarray | None = None  # int64 (N,)
    valid_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    # "none" | "dynamic" (Bernoulli with p = x/255, resampled by the model) | "static" (already 0/255)
    binarize: str = "none"
    name: str = ""
    # "validation": the source's own split; "carved": held out of train; "train": a seeded subset of
    # the training images, which are all trained on (valid_size 0); "none": no training split to carve
    # from (load_image_splits(require_train=False) of a set without one: train and valid are empty)
    valid_from: str = "validation"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

class ImageDataset(torch.utils.data.Dataset):
    """Items ``{"index": i, "x": uint8 (C, H, W)}``; scaling to floats happens on the device.
    ``labels`` (int64 (N,) or None) stratify evaluation subsets; items carry them as ``"y"`` only with
    ``carry_labels`` (the labelled stream of a semi-supervised run)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, carry_labels: bool = False):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
        images = np.ascontiguousarray(images)
        if not images.flags.writeable:  # torch.from_numpy warns on read-only memory
            images = images.copy()
        self.images = torch.from_numpy(images)
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if carry_labels and self.labels is None:
            raise ValueError("carry_labels needs labels")
        self.carry_labels = carry_labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        if self.carry_labels:
            return {"index": index, "x": self.images[index], "y": self.labels[index]}
        return {"index": index, "x": self.images[index]}

def semi_supervised_sets(splits: ImageSplits, labelled: np.ndarray) -> tuple[ImageDataset, ImageDataset]:
    """(labelled, unlabelled) training sets: the examples ``labelled`` (indices into the training split),
    whose items carry ``"y"``, and the rest of the training split, built without its labels so that
    none can reach the unlabelled stream."""
    rest = np.setdiff1d(np.arange(len(splits.train)), labelled)
    return (ImageDataset(splits.train[labelled], splits.train_labels[labelled], carry_labels=True),
            ImageDataset(splits.train[rest]))

def image_shape(cfg: ImageDataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the images ``load_image_splits`` would return, without converting anything."""
    recipe = recipe_of(cfg.dataset)
    if recipe.shape is not None:
        return recipe.shape
    data_dir = _require_data_dir(cfg, recipe)
    meta = cached_meta(cfg.dataset, data_dir, cfg.cache_dir)
    if meta is not None:
        return tuple(meta["shape"])
    image = first_local_image(data_dir)
    height, width, channels = recipe.to_array(image).shape
    return channels, height, width

def load_image_splits(cfg: ImageDataConfig, require_train: bool = True) -> ImageSplits:
    """Train/validation/test uint8 arrays of ``cfg.dataset``, converted once and then read from the cache.

    ``require_train=False`` (evaluation, e.g. an out-of-distribution folder of only ``test/``) accepts a
    source without training images: train and a missing validation split are then empty."""
    recipe = recipe_of(cfg.dataset)
    if cfg.valid_size < 0 or cfg.split_seed < 0:
        raise UserError(f"valid_size and split_seed must be >= 0, got {cfg.valid_size} and {cfg.split_seed}")
    data_dir = None
    if cfg.data_dir is not None or recipe.hub_id is None:
        data_dir = _require_data_dir(cfg, recipe)
    parts = load_cached(cfg.dataset, data_dir, cfg.cache_dir, lambda: convert(recipe, data_dir))
    fields = carve_splits(parts, valid_size=cfg.valid_size, split_seed=cfg.split_seed,
                          test_fraction=recipe.test_fraction, where=cfg.data_dir or recipe.hub_id,
                          require_train=require_train)
    return ImageSplits(**fields, binarize=recipe.binarize, name=recipe.name)

def _require_data_dir(cfg: ImageDataConfig, recipe: Recipe) -> Path:
    if cfg.data_dir is None:
        if recipe.name == "binarized-mnist":
            raise UserError("binarized-mnist needs --data-dir pointing at a folder with "
                            f"{', '.join(BINARIZED_MNIST_FILES.values())} (download them from {BINARIZED_MNIST_URL})")
        raise UserError(f"dataset {recipe.name!r} needs --data-dir pointing at a local image folder "
                        "(train/ and test/ subfolders optional) or parquet files")
    data_dir = Path(cfg.data_dir).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {cfg.data_dir} is not an existing folder; point it at the folder holding the images")
    return data_dir
