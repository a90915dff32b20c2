"""Opening a trained image run for sampling, reconstruction and reports: its config, model and data
(the recorded splits, or an out-of-distribution set).

``check_image_run`` is torch-free, so a script refuses a wrong ``--run`` (missing, not a run, a text
run, no exported weights) before it imports anything heavy; the loaders import torch when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import RunConfig, from_dict, replace
from shared.errors import UserError
from shared.run_dir import CONFIG, WEIGHTS, read_run_config

SPLITS = ("train", "valid", "test")


def check_image_run(run_dir: str | Path) -> RunConfig:
    """The run config of an image run with exported weights, or a UserError naming what is wrong."""
    run = read_run_config(run_dir, "image")
    if not (Path(run_dir) / WEIGHTS).is_file():
        raise UserError(f"{run_dir} has no exported weights ({WEIGHTS}) yet; train until the first checkpoint "
                        f"is saved (--save-every)")
    return run


def load_image_model(run_dir: str | Path, run: RunConfig, device: str = "cpu"):
    """The run's ImageVAE with its EMA weights, in eval mode on ``device``."""
    from shared.run_dir import load_weights

    from .model import ImageModelConfig, ImageVAE

    cfg = from_dict(ImageModelConfig, run.model, f"{Path(run_dir) / CONFIG} model")
    model = load_weights(run_dir, ImageVAE(cfg))
    return model.to(device).eval()


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class SplitData:
    images: "object"  # uint8 (N, C, H, W) numpy array
    name: str  # what to call it in messages and tables, e.g. "test split of data/"
    shape: tuple[int, int, int]
    labels: "object" = None  # int64 (N,) numpy array, or None when the source has no classes


def run_data_config(run: RunConfig, data_dir: str | Path | None = None):
    """The data config saved with the run (config.json "data"), pointed at ``data_dir`` if given."""
    from .data import ImageDataConfig

    if not run.data:
        raise UserError("the run's config.json records no data; pass --data-dir with the images to use")
    cfg = from_dict(ImageDataConfig, run.data, "config.json data")
    if data_dir is not None:
        return replace(cfg, "data config", data_dir=str(data_dir))
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        hint = " (a path relative to where training ran)" if not Path(cfg.data_dir).is_absolute() else ""
        raise UserError(f"the run's recorded image folder {cfg.data_dir}{hint} is not found from here; "
                        f"pass --data-dir with the images the run was trained on")
    return cfg


def load_split(data_cfg, split: str, fallback_all: bool = False) -> SplitData:
    """One split as uint8 images. A source without that split is a UserError suggesting --split valid,
    unless ``fallback_all`` (an out-of-distribution set: any of its images will do), which then takes
    everything the source has."""
    import numpy as np

    from .data import load_image_splits

    splits = load_image_splits(data_cfg, require_train=False)  # an evaluation set may have no train/
    where = data_cfg.data_dir or data_cfg.dataset
    images = {"train": splits.train, "valid": splits.valid, "test": splits.test}[split]
    labels = {"train": splits.train_labels, "valid": splits.valid_labels, "test": splits.test_labels}[split]
    if images is None or len(images) == 0:
        if fallback_all:
            parts = [(a, lab) for a, lab in ((splits.train, splits.train_labels), (splits.valid, splits.valid_labels),
                                             (splits.test, splits.test_labels)) if a is not None and len(a)]
            all_labels = None if any(lab is None for _, lab in parts) else np.concatenate([lab for _, lab in parts])
            return SplitData(np.concatenate([a for a, _ in parts]), f"all images of {where}", splits.shape, all_labels)
        raise UserError(f"{where} has no {split} split (an image folder needs a {split}/ subfolder for it); "
                        f"pass --split valid")
    # with --valid-size 0 the validation images were trained on: say so wherever they are scored
    note = " (a seeded subset of train)" if split == "valid" and splits.valid_from == "train" else ""
    return SplitData(images, f"{split} split of {where}{note}", splits.shape, labels)


def load_ood(run: RunConfig, split: str, dataset: str | None = None, data_dir: str | Path | None = None,
             fallback_all: bool = True) -> SplitData:
    """The out-of-distribution set of a report: ``split`` of the hub ``dataset`` or the image folder
    ``data_dir`` (a folder of only test/ will do), or with ``fallback_all`` all its images when it has no
    such split. It is read with the run's split seed and cache folder, into the uint8 (N, C, H, W) arrays
    the in-distribution data become: the model then scales (and, for a Bernoulli run, binarises) both
    sets alike."""
    from .data import ImageDataConfig

    saved = run.data or {}
    cfg = ImageDataConfig(dataset=dataset or "folder", data_dir=str(data_dir) if data_dir else None,
                          split_seed=saved.get("split_seed", 0), cache_dir=saved.get("cache_dir"))
    try:
        return load_split(cfg, split, fallback_all=fallback_all)
    except UserError as err:  # data.py speaks of --data-dir; here the flag is --ood-data-dir
        raise UserError(str(err).replace("--data-dir", "--ood-data-dir")) from None


def check_shape(data: SplitData, model_shape, what: str) -> None:
    if list(data.shape) != list(model_shape):
        c, h, w = data.shape
        mc, mh, mw = model_shape
        raise UserError(f"the {what} ({data.name}) holds {h}x{w}x{c} images but the model takes {mh}x{mw}x{mc}; "
                        f"use images of the size the run was trained on")
