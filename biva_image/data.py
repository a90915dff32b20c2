"""Image data: every source becomes uint8 arrays (N, C, H, W), converted once and cached.

Sources (``ImageDataConfig.dataset``); hub data goes through ``datasets.load_dataset``:

* ``cifar10``: ``uoft-cs/cifar10`` (columns ``img``, ``label``; train 50k / test 10k), 32x32x3 as is.
* ``svhn``: ``ufldl-stanford/svhn`` config ``cropped_digits`` (``image``, ``label``; train 73,257 /
  test 26,032; ``extra`` unused), 32x32x3 as is.
* ``mnist``: ``ylecun/mnist`` (``image``, ``label``; 60k / 10k), 28x28x1 grey, ``binarize="dynamic"``.
* ``omniglot``: the standard 28x28 OMNIGLOT of the likelihood literature is Burda et al.'s
  ``chardata.mat`` (as read by their IWAE code) in ``data_dir``: ``data`` (784, 24,345) and ``testdata``
  (784, 8,070) floats in [0, 1], one column per image stored column-major, ``target`` / ``testtarget``
  (50, N) one-hot alphabets; its own train/test split, pixels x*255 rounded, labels = alphabet index,
  ``binarize="dynamic"``. Without ``data_dir`` (fallback, not the standard split):
  ``GATE-engine/omniglot`` (``image``, ``label`` = one of 1,623 characters; a single split ``full`` of
  32,460 = 1,623 x 20 drawings). Grey, ink made white on black as in MNIST, box-filtered to 28x28.
  Per character 5 of the 20 drawings go to test and 15 to train (8,115 / 24,345; Burda et al.'s test
  has 8,070), carved with ``split_seed``.
* ``celeba64``: ``flwrlabs/celeba`` config ``img_align+identity+attr`` (``image``: 178x218 aligned
  faces, ``celeb_id``, 40 boolean attribute columns; train 162,770 / valid 19,867 / test 19,962, the
  official partition). Centre crop 148x148, bilinear resize to 64x64 (the usual CelebA-64 recipe).
* ``binarized-mnist``: no hub source; ``data_dir`` holds Larochelle's statically binarised
  ``binarized_mnist_{train,valid,test}.amat`` (50k / 10k / 10k) from ``BINARIZED_MNIST_URL``.
  ``binarize="static"`` (values 0/255) and its own validation split.
* ``folder``: ``data_dir`` is any local image folder (or parquet/arrow files), kept as it is.

``data_dir`` can also hold a local copy of a hub dataset, for machines without network: parquet files as
on the hub (``train-00000-of-00001.parquet`` ...), arrow files (``save_to_disk`` or the ``datasets``
cache), or an image folder; the same conversion applies. Parquet/arrow files go through
``datasets.load_dataset("parquet"|"arrow", data_files=..., streaming=True)`` (read in place, no
arrow copy of the whole set); the split of a file comes from its name
or folder (``train``/``valid(ation)``/``test``; anything else, e.g. OMNIGLOT's ``full``, is train;
SVHN's ``extra`` is skipped).

Image folders follow the layout of ``datasets``' ``imagefolder``: optional ``train/``, ``validation/``
(or ``valid/``, ``val/``) and ``test/`` subfolders give the splits (otherwise everything is train),
class subfolders give labels (sorted names -> 0..K-1). Mode ``L`` stays one channel, ``RGB`` three,
``RGBA`` four, palette images become RGB. All images must share one size and channel count. A folder
without ``test/`` has no test split (``ImageSplits.test`` is None).

Splits without their own validation part get one carved from train with ``split_seed`` (a numpy
Generator permutation): ``valid_size`` examples, at most 10% of train. ``valid_size=0`` carves nothing:
training uses the whole train split, and validation (the plateau schedule's signal) is a seeded subset
of those training images, min(``VALID_FROM_TRAIN``, 10% of train), chosen as a carve of that size would
be (``ImageSplits.valid_from == "train"``). Sources with their own validation split keep it. The cache
(``cache_dir``, default ``~/.cache/biva/images``) holds one folder per dataset name (+ a hash of ``data_dir``) with
``train.npy``, ``test.npy`` ... written atomically and a ``meta.json`` written last; a second load
reads it without touching ``datasets``; a cache built from ``data_dir`` is rebuilt when the files there
change (names, sizes, modification times). The carving is redone on every load (cheap, seed-dependent).
Under several processes, let the main process load first so that only it converts.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from shared.errors import UserError

from .names import IMAGE_DATASETS  # noqa: E402,F401  (torch-free, for the CLIs)
BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
BINARIZED_MNIST_FILES = {
    "train": "binarized_mnist_train.amat",
    "validation": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}
OMNIGLOT_FILE = "chardata.mat"  # Burda et al.'s 28x28 OMNIGLOT (IWAE code)
# Validation images drawn from train when valid_size is 0 (at most a tenth of train): enough for a
# stable plateau signal, as many as a default carve would hold out.
VALID_FROM_TRAIN = 5000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
TABLE_SUFFIXES = (".parquet", ".arrow")
# Bump when a conversion recipe changes, so that old caches are rebuilt rather than reused.
CACHE_VERSION = 1

_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
}
_SKIPPED_SPLITS = ("extra",)
_PROGRESS_MIN = 5000  # no progress bar below this many images


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
    # the training images, which are all trained on (valid_size 0)
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


def num_classes(splits: ImageSplits) -> int:
    """Classes of a labelled source: labels are 0..C-1 (sorted class names or the hub's ids), C taken
    over every split, so a class missing from train still counts (and then has 0 training examples)."""
    found = [lab for lab in (splits.train_labels, splits.valid_labels, splits.test_labels)
             if lab is not None and len(lab)]
    return int(max(int(lab.max()) for lab in found)) + 1 if found else 0


def labelled_subset(splits: ImageSplits, per_class: int, seed: int, where: str = "the data") -> np.ndarray:
    """Sorted indices into ``splits.train`` of ``per_class`` examples of every class, drawn at random
    from ``seed`` (--split-seed) in its own stream (not the carving's). A UserError when the source has no
    labels or a class has fewer than ``per_class`` training examples."""
    if per_class < 1:
        raise UserError(f"--labels-per-class must be at least 1, got {per_class}")
    labels = splits.train_labels
    if labels is None:
        raise UserError(f"--labels-per-class needs labels: {where} has none (use a hub dataset with a label "
                        f"column, or an image folder with one subfolder per class), or drop --labels-per-class")
    classes = num_classes(splits)
    counts = np.bincount(labels, minlength=classes)
    short = [c for c in range(classes) if counts[c] < per_class]
    if short:
        listed = ", ".join(f"class {c} has {counts[c]}" for c in short[:5]) + (", ..." if len(short) > 5 else "")
        raise UserError(f"--labels-per-class {per_class} needs {per_class} training examples of every class, but in "
                        f"{where} {listed}; lower --labels-per-class")
    rng = np.random.default_rng([seed, 0x1ABE1])  # not the carving's or the evaluation subset's stream
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(classes)]
    return np.sort(np.concatenate(chosen))


def semi_supervised_sets(splits: ImageSplits, labelled: np.ndarray) -> tuple[ImageDataset, ImageDataset]:
    """(labelled, unlabelled) training sets: the examples ``labelled`` (indices into the training split),
    whose items carry ``"y"``, and the rest of the training split, built without its labels so that
    none can reach the unlabelled stream."""
    rest = np.setdiff1d(np.arange(len(splits.train)), labelled)
    return (ImageDataset(splits.train[labelled], splits.train_labels[labelled], carry_labels=True),
            ImageDataset(splits.train[rest]))


# ----------------------------------------------------------------------------------------------
# Per-dataset recipes: how one decoded PIL image becomes an (H, W, C) uint8 array.


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """(H, W, C) uint8 keeping the channel count: L -> 1, LA -> 2, RGB -> 3, RGBA -> 4."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode.startswith("I"):  # 16/32-bit greyscale: scale the 16-bit range to 8 bits
        wide = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if wide.max() > 255 else 1.0
        return np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8)[:, :, None]
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, F, ...
        img = img.convert("L" if mode == "F" else "RGB")
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]


def _omniglot28(img: Image.Image) -> np.ndarray:
    # Box filter: the grey level of a 28x28 pixel is the ink fraction of its 3.75x3.75 source area,
    # which is what the dynamic binarisation then samples from.
    grey = np.asarray(img.convert("L").resize((28, 28), Image.BOX), dtype=np.uint8)
    if grey.mean() > 127:  # the source draws black ink on white paper; the model sees ink = 1
        grey = 255 - grey
    return grey[:, :, None]


def _celeba64(img: Image.Image) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (64, 64):
        width, height = img.size
        side = min(148, width, height)  # 148x148 centre crop of the 178x218 aligned faces
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((64, 64), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True)
class _Recipe:
    name: str
    hub_id: str | None
    hub_config: str | None
    hub_splits: tuple[tuple[str, str], ...]  # (our split, the hub's split name)
    image_column: str | None
    label_column: str | None
    shape: tuple[int, int, int] | None  # (C, H, W) every image must have; None: taken from the data
    binarize: str
    to_array: Callable[[Image.Image], np.ndarray]  # PIL image -> (H, W, C) uint8
    test_fraction: float = 0.0  # per-label share carved out as test when the source has no test split


_RECIPES = {
    "cifar10": _Recipe("cifar10", "uoft-cs/cifar10", None, (("train", "train"), ("test", "test")),
                       "img", "label", (3, 32, 32), "none", _rgb),
    "svhn": _Recipe("svhn", "ufldl-stanford/svhn", "cropped_digits", (("train", "train"), ("test", "test")),
                    "image", "label", (3, 32, 32), "none", _rgb),
    "mnist": _Recipe("mnist", "ylecun/mnist", None, (("train", "train"), ("test", "test")),
                     "image", "label", (1, 28, 28), "dynamic", _grey),
    "omniglot": _Recipe("omniglot", "GATE-engine/omniglot", None, (("train", "full"),),
                        "image", "label", (1, 28, 28), "dynamic", _omniglot28, test_fraction=0.25),
    "celeba64": _Recipe("celeba64", "flwrlabs/celeba", "img_align+identity+attr",
                        (("train", "train"), ("validation", "valid"), ("test", "test")),
                        "image", "celeb_id", (3, 64, 64), "none", _celeba64),
    "binarized-mnist": _Recipe("binarized-mnist", None, None, (), None, None, (1, 28, 28), "static", _grey),
    "folder": _Recipe("folder", None, None, (), None, "label", None, "none", _pil_to_array),
}


def _recipe(dataset: str) -> _Recipe:
    if dataset not in _RECIPES:
        raise UserError(f"unknown image dataset {dataset!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    return _RECIPES[dataset]


# ----------------------------------------------------------------------------------------------
# Public entry points.


def image_shape(cfg: ImageDataConfig) -> tuple[int, int, int]:
    """(C, H, W) of the images ``load_image_splits`` would return, without converting anything."""
    recipe = _recipe(cfg.dataset)
    if recipe.shape is not None:
        return recipe.shape
    data_dir = _require_data_dir(cfg, recipe)
    meta = _read_meta(_cache_folder(cfg, data_dir), _fingerprint(data_dir))
    if meta is not None:
        return tuple(meta["shape"])
    image = _first_local_image(data_dir)
    height, width, channels = recipe.to_array(image).shape
    return channels, height, width


def load_image_splits(cfg: ImageDataConfig) -> ImageSplits:
    """Train/validation/test uint8 arrays of ``cfg.dataset``, converted once and then read from the cache."""
    recipe = _recipe(cfg.dataset)
    if cfg.valid_size < 0 or cfg.split_seed < 0:
        raise UserError(f"valid_size and split_seed must be >= 0, got {cfg.valid_size} and {cfg.split_seed}")
    data_dir = None
    if cfg.data_dir is not None or recipe.hub_id is None:
        data_dir = _require_data_dir(cfg, recipe)
    parts = _load_cached(cfg, recipe, data_dir)
    return _assemble(cfg, recipe, parts)


def carve(n: int, n_out: int, seed, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (kept, carved) sorted index arrays with ``n_out`` carved at random.

    With ``labels``, the carving is per label (stratified): each label gives up the same share.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[n_out:]), np.sort(perm[:n_out])
    carved = []
    fraction = n_out / max(n, 1)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        k = int(round(fraction * len(members)))
        carved.append(rng.permutation(members)[:k])
    carved = np.sort(np.concatenate(carved)) if carved else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(n), carved, assume_unique=True)
    return kept, carved


def _valid_count(n_train: int, valid_size: int) -> int:
    if n_train < 2:
        return 0
    # A tenth of train at most, so that small sets keep most of their data for training, but at
    # least one example so that there is something to evaluate on.
    return max(1, min(valid_size, n_train // 10))


def _assemble(cfg: ImageDataConfig, recipe: _Recipe, parts: dict) -> ImageSplits:
    where = cfg.data_dir or recipe.hub_id
    if "train" not in parts or len(parts["train"][0]) == 0:
        raise UserError(f"no training images found in {where}; expected a train split (or images at the top level)")
    train, train_labels = parts["train"]
    test, test_labels = parts.get("test", (None, None))
    if test is None and recipe.test_fraction > 0:
        n_test = int(round(recipe.test_fraction * len(train)))
        kept, carved_idx = carve(len(train), n_test, [cfg.split_seed, 1], train_labels)
        test, test_labels = train[carved_idx], _take(train_labels, carved_idx)
        train, train_labels = train[kept], _take(train_labels, kept)
    valid_from = "validation"
    if "validation" in parts:
        valid, valid_labels = parts["validation"]
    elif cfg.valid_size == 0:
        # The whole split trains (the usual protocol when only the test split is reported); the
        # plateau schedule still needs a signal, so it watches the same images a carve would take.
        n_valid = _valid_count(len(train), VALID_FROM_TRAIN) or len(train)
        _, chosen = carve(len(train), n_valid, cfg.split_seed)
        valid, valid_labels, valid_from = train[chosen], _take(train_labels, chosen), "train"
    else:
        n_valid = _valid_count(len(train), cfg.valid_size)
        kept, carved_idx = carve(len(train), n_valid, cfg.split_seed)
        valid, valid_labels, valid_from = train[carved_idx], _take(train_labels, carved_idx), "carved"
        train, train_labels = train[kept], _take(train_labels, kept)
    return ImageSplits(train=train, valid=valid, test=test, train_labels=train_labels,
                       valid_labels=valid_labels, test_labels=test_labels,
                       binarize=recipe.binarize, name=recipe.name, valid_from=valid_from)


def _take(labels: np.ndarray | None, index: np.ndarray) -> np.ndarray | None:
    return None if labels is None else labels[index]


def _require_data_dir(cfg: ImageDataConfig, recipe: _Recipe) -> Path:
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


# ----------------------------------------------------------------------------------------------
# Cache: <cache_dir>/<dataset>-v<version>[-<hash of data_dir>]/{train,validation,test}[_labels].npy + meta.json


def _cache_root(cfg: ImageDataConfig) -> Path:
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "biva" / "images"


def _cache_folder(cfg: ImageDataConfig, data_dir: Path | None) -> Path:
    key = f"{cfg.dataset}-v{CACHE_VERSION}"
    if data_dir is not None:
        key += "-" + hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return _cache_root(cfg) / key


def _fingerprint(data_dir: Path | None) -> str | None:
    """Hash of the names, sizes and modification times of the files under ``data_dir``.

    A cache built from a folder is rebuilt when the folder changes (files added, removed, rewritten).
    """
    if data_dir is None:
        return None
    digest = hashlib.sha1()
    for path in _walk_files(data_dir):
        stat = path.stat()
        digest.update(f"{path.relative_to(data_dir).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_meta(folder: Path, fingerprint: str | None) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
        return None
    for split, info in meta.get("splits", {}).items():
        names = [f"{split}.npy"] + ([f"{split}_labels.npy"] if info.get("labels") else [])
        if not all((folder / name).is_file() for name in names):
            return None
    return meta


def _load_cached(cfg: ImageDataConfig, recipe: _Recipe, data_dir: Path | None) -> dict:
    folder = _cache_folder(cfg, data_dir)
    fingerprint = _fingerprint(data_dir)
    meta = _read_meta(folder, fingerprint)
    if meta is not None:
        parts = {}
        for split, info in meta["splits"].items():
            labels = np.load(folder / f"{split}_labels.npy") if info["labels"] else None
            parts[split] = (np.load(folder / f"{split}.npy"), labels)
        return parts
    parts = _convert(recipe, data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)  # arrays and meta must never disagree
        for split, (images, labels) in parts.items():
            _save_atomic(folder / f"{split}.npy", lambda f, a=images: np.save(f, a))
            if labels is not None:
                _save_atomic(folder / f"{split}_labels.npy", lambda f, a=labels: np.save(f, a))
        shape = next(iter(parts.values()))[0].shape[1:]
        meta = {"version": CACHE_VERSION, "dataset": recipe.name, "data_dir": str(data_dir) if data_dir else None,
                "fingerprint": fingerprint, "shape": list(shape),
                "splits": {split: {"n": len(images), "labels": labels is not None}
                           for split, (images, labels) in parts.items()}}
        _save_atomic(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as err:
        raise UserError(f"could not write the image cache in {folder} ({err.strerror or err}); "
                        "set the cache folder (cache_dir) to a writable place") from None
    return parts


def _save_atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# Conversion: source -> {split: (uint8 (N, C, H, W), int64 labels | None)}


def _convert(recipe: _Recipe, data_dir: Path | None) -> dict:
    if recipe.name == "binarized-mnist":
        return _convert_amat(data_dir)
    if recipe.name == "omniglot" and data_dir is not None:
        found = [p for p in _walk_files(data_dir) if p.name == OMNIGLOT_FILE]
        if found:
            return _convert_chardata(found[0])
    if data_dir is None:
        return _convert_hub(recipe)
    tables = [p for p in _walk_files(data_dir) if p.suffix.lower() in TABLE_SUFFIXES]
    if tables:
        return _convert_tables(recipe, data_dir, tables)
    images = [p for p in _walk_files(data_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        return _convert_folder(recipe, data_dir)
    expected = f"{OMNIGLOT_FILE}, " if recipe.name == "omniglot" else ""
    if any(p.name == OMNIGLOT_FILE for p in _walk_files(data_dir)):
        expected, fix = "", f"for OMNIGLOT's {OMNIGLOT_FILE} pass --dataset omniglot"
    else:
        fix = "point --data-dir at an image folder or a local copy of the dataset"
    raise UserError(f"no {expected}images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) or parquet/arrow files found in "
                    f"{data_dir}; {fix}")


def _walk_files(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / name for name in sorted(files) if not name.startswith("."))
    return found


def _convert_hub(recipe: _Recipe) -> dict:
    from shared.hub import require_hub_dataset

    fix = "download it elsewhere and point --data-dir at a local copy (parquet files or an image folder)"
    require_hub_dataset(recipe.hub_id, fix)  # offline: fail now, not after half a minute of retries
    import datasets

    parts = {}
    for split, hub_split in recipe.hub_splits:
        try:
            table = datasets.load_dataset(recipe.hub_id, recipe.hub_config, split=hub_split)
        except Exception as err:  # offline, gated, renamed: all fixed the same way by the user
            raise UserError(f"could not fetch {recipe.hub_id} (offline?); {fix} [{_first_line(err)}]") from None
        parts[split] = _convert_table(recipe, table, len(table), f"the {hub_split} split of {recipe.hub_id}", split)
    return parts


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _split_of(relative: Path) -> str | None:
    """Split named by a file's name or folders (file name first): train / validation / test, None to skip."""
    components = [relative.name.split(".")[0]] + list(reversed(relative.parent.parts))
    for component in components:
        tokens = re.split(r"[-_.+ ]", component.lower())
        for split, aliases in _SPLIT_ALIASES.items():
            if any(alias in tokens for alias in aliases):
                return split
        if any(skip in tokens for skip in _SKIPPED_SPLITS):
            return None
    return "train"  # e.g. OMNIGLOT's single "full" split


def _convert_tables(recipe: _Recipe, data_dir: Path, tables: list[Path]) -> dict:
    import datasets

    relative = [p.relative_to(data_dir) for p in tables]
    if recipe.hub_config is not None:  # a copy of a whole hub repo may hold other configs too
        relative = [r for r in relative if recipe.hub_config in r.parent.parts] or relative
    kinds = {p.suffix.lower() for p in relative}
    if len(kinds) > 1:
        raise UserError(f"{data_dir} mixes parquet and arrow files; keep one kind of file per dataset folder")
    data_files: dict[str, list[str]] = {}
    for rel in relative:
        split = _split_of(rel)
        if split is not None:
            data_files.setdefault(split, []).append(str(data_dir / rel))
    if not data_files:
        raise UserError(f"no usable parquet/arrow files in {data_dir} (only skipped splits such as 'extra')")
    builder = "parquet" if kinds == {".parquet"} else "arrow"
    parts = {}
    try:
        # streaming: read the files where they are, without datasets' arrow copy of the whole set
        loaded = datasets.load_dataset(builder, data_files=data_files, streaming=True)
        for split, files in data_files.items():
            n = sum(_count_rows(Path(f)) for f in files)
            parts[split] = _convert_table(recipe, loaded[split], n, f"the {split} files in {data_dir}", split)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"could not read the {builder} files in {data_dir} ({_first_line(err)}); "
                        "check that they hold a dataset saved from the hub") from None
    return parts


def _count_rows(path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all().num_rows  # datasets' own arrow files
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all().num_rows


def _image_column(features, preferred: str | None) -> str:
    import datasets

    features = features or {}
    columns = list(features)
    if preferred in columns:
        return preferred
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "picture"):
        if name in columns:
            return name
    for name, feature in features.items():  # parquet written without the hub's metadata
        if isinstance(feature, dict) and "bytes" in feature:
            return name
    raise UserError(f"found no image column among {columns}; expected a column of images such as 'image' or 'img'")


def _label_column(features, recipe: _Recipe) -> str | None:
    for name in (recipe.label_column, "label"):
        if name and name in (features or {}):
            return name
    return None


def _as_labels(values: list) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind in "iub":
        return array.astype(np.int64)
    return np.unique(array.astype(str), return_inverse=True)[1].astype(np.int64)  # names -> sorted ids


def _convert_table(recipe: _Recipe, table, n: int, source: str, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``datasets`` Dataset or IterableDataset -> (images, labels), decoding the image bytes in threads."""
    import datasets

    column = _image_column(table.features, recipe.image_column)
    label_column = _label_column(table.features, recipe)
    table = table.select_columns([column] + ([label_column] if label_column else []))
    if isinstance(table.features[column], datasets.Image):
        table = table.cast_column(column, datasets.Image(decode=False))
    labels: list = []

    def batches() -> Iterator[list]:
        for batch in table.iter(batch_size=256):
            if label_column:
                labels.extend(batch[label_column])
            yield batch[column]

    images = _decode_all(batches(), n, recipe, lambda i: f"row {i} of {source}",
                         desc=f"converting {recipe.name} {split}")
    return images, (_as_labels(labels) if label_column else None)


def _convert_folder(recipe: _Recipe, data_dir: Path) -> dict:
    split_dirs = {}
    for child in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for split, aliases in _SPLIT_ALIASES.items():
            if child.name.lower() in aliases and split not in split_dirs:
                split_dirs[split] = child
    if split_dirs and "train" not in split_dirs:
        raise UserError(f"{data_dir} has {', '.join(d.name + '/' for d in split_dirs.values())} but no train/ folder; "
                        "add train/ (the other split folders are optional)")
    if not split_dirs:
        split_dirs = {"train": data_dir}
    files = {split: [p for p in _walk_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
             for split, folder in split_dirs.items()}
    classes = {split: [p.parent.relative_to(split_dirs[split]).as_posix() for p in paths]
               for split, paths in files.items()}
    names = sorted({c for cs in classes.values() for c in cs})
    index = {name: i for i, name in enumerate(names)}
    parts = {}
    for split, paths in files.items():
        if not paths:
            if split == "train":
                raise UserError(f"no images found in {split_dirs[split]}; expected files such as .png or .jpg")
            continue
        images = _decode_all(_chunks(paths, 256), len(paths), recipe, lambda i, p=paths: str(p[i]),
                             desc=f"converting {data_dir.name}/{split}")
        labels = None
        if names != ["."]:  # class subfolders present
            labels = np.array([index[c] for c in classes[split]], dtype=np.int64)
        parts[split] = (images, labels)
    return parts


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _convert_amat(data_dir: Path) -> dict:
    found = {p.name: p for p in _walk_files(data_dir)}
    missing = [name for name in BINARIZED_MNIST_FILES.values() if name not in found]
    if missing:
        raise UserError(f"{data_dir} lacks {', '.join(missing)}; download the binarized MNIST files from "
                        f"{BINARIZED_MNIST_URL} into that folder")
    return {split: (_read_amat(found[name]), None) for split, name in BINARIZED_MNIST_FILES.items()}


def _read_amat(path: Path) -> np.ndarray:
    """Larochelle's .amat: one image per line, 784 space-separated 0/1 values; -> uint8 0/255 (N, 1, 28, 28)."""
    raw = np.fromfile(path, dtype=np.uint8)
    bits = raw[(raw == ord("0")) | (raw == ord("1"))]
    n_lines = sum(1 for line in raw.tobytes().split(b"\n") if line.strip())
    if n_lines == 0 or bits.size != 784 * n_lines:
        raise UserError(f"{path} is not a binarized MNIST .amat file (expected lines of 784 values 0/1); "
                        f"download it again from {BINARIZED_MNIST_URL}")
    return ((bits - ord("0")) * 255).astype(np.uint8).reshape(n_lines, 1, 28, 28)


def _convert_chardata(path: Path) -> dict:
    """Burda et al.'s ``chardata.mat`` -> {train, test}: uint8 (N, 1, 28, 28) x*255, alphabet labels."""
    import scipy.io

    fix = f"expected Burda et al.'s 28x28 OMNIGLOT {OMNIGLOT_FILE} (the IWAE code's file)"
    keys = {"train": ("data", "target"), "test": ("testdata", "testtarget")}
    try:
        mat = scipy.io.loadmat(str(path), variable_names=[key for pair in keys.values() for key in pair])
    except Exception as err:  # scipy raises ValueError, TypeError, MatReadError... for a foreign file
        raise UserError(f"could not read {path} as a MATLAB file ({_first_line(err)}); {fix}") from None
    missing = [key for pair in keys.values() for key in pair if key not in mat]
    if missing:
        raise UserError(f"{path} lacks the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}; {fix}")
    parts = {}
    for split, (images_key, labels_key) in keys.items():
        pixels, onehot = mat[images_key], mat[labels_key]
        if pixels.ndim != 2 or pixels.shape[0] != 784 or onehot.ndim != 2 or not onehot.shape[0] \
                or onehot.shape[1] != pixels.shape[1]:
            raise UserError(f"{path}: {images_key} is {pixels.shape} and {labels_key} {onehot.shape}, "
                            f"expected (784, N) and (alphabets, N); {fix}")
        if pixels.dtype.kind not in "fiub" or not (np.isfinite(pixels).all() and (pixels >= 0).all()
                                                     and (pixels <= 1).all()):
            raise UserError(f"{path}: {images_key} holds values outside [0, 1]; {fix}")
        # Each column is one image stored column-major (MATLAB order), as the IWAE code reads it:
        # data.T.reshape((-1, 28, 28), order="F"); a C-order reshape would give transposed characters.
        images = pixels.T.reshape((-1, 28, 28), order="F")
        images = np.rint(images * 255).astype(np.uint8)[:, None]
        parts[split] = (np.ascontiguousarray(images), onehot.argmax(axis=0).astype(np.int64))
    return parts


# ----------------------------------------------------------------------------------------------
# Decoding: batches of raw items (bytes dicts or paths) -> uint8 (N, C, H, W), in a thread pool
# (PIL releases the GIL while decoding and resizing).


def _open_image(item) -> Image.Image:
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


def _decode_batch(recipe: _Recipe, start: int, batch: list, describe: Callable[[int], str]) -> list[np.ndarray]:
    arrays = []
    for offset, item in enumerate(batch):
        try:
            with _open_image(item) as image:
                arrays.append(recipe.to_array(image))
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for broken files
            raise UserError(f"could not read the image {describe(start + offset)} ({err}); "
                            "remove or replace that file") from None
    return arrays


def _describe_shape(shape: tuple[int, int, int]) -> str:
    height, width, channels = shape
    return f"{width}x{height} pixels with {channels} channel{'s' if channels != 1 else ''}"


def _decode_all(batches: Iterable[list], n: int, recipe: _Recipe, describe: Callable[[int], str], desc: str) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------
# Cheap look at the first image (for image_shape).


def _first_local_image(data_dir: Path) -> Image.Image:
    files = _walk_files(data_dir)
    tables = [p for p in files if p.suffix.lower() in TABLE_SUFFIXES]
    if tables:
        return _first_table_image(tables[0])
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                with Image.open(path) as image:
                    return image.copy()  # loaded, and usable once the file is closed
            except (OSError, ValueError, SyntaxError) as err:
                raise UserError(f"could not read the image {path} ({err}); remove or replace that file") from None
    raise UserError(f"no images or parquet/arrow files found in {data_dir}; "
                    "point --data-dir at an image folder or a local copy of the dataset")


def _first_table_image(path: Path) -> Image.Image:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
    else:
        with pa.memory_map(str(path)) as source:
            try:
                batch = pa.ipc.open_stream(source).read_next_batch()
            except (pa.ArrowInvalid, StopIteration):
                source.seek(0)
                batch = pa.ipc.open_file(source).get_batch(0)
    if batch is None or batch.num_rows == 0:
        raise UserError(f"{path} holds no rows; point --data-dir at a folder with images")
    row = batch.to_pylist()[0]
    for value in row.values():
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            with _open_image(value) as image:
                return image.copy()
    raise UserError(f"found no image column in {path}; expected a column of images such as 'image' or 'img'")
