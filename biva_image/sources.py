"""Image sources: the per-dataset recipes and the readers that turn each source into uint8 arrays
{split: (uint8 (N, C, H, W), int64 labels | None)} (cached by cache.py, split by splits.py).

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
  has 8,070), carved with ``split_seed`` (splits.py).
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
without ``test/`` has no test split; one without ``train/`` (e.g. only ``test/``: an out-of-distribution
set) has no training split, which only training refuses. Symbolic links to folders and files are
followed (a link to a folder the walk is already inside, a cycle, is not entered again).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from shared.errors import UserError

from .decode import decode_all, open_image
from .names import IMAGE_DATASETS

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
BINARIZED_MNIST_FILES = {
    "train": "binarized_mnist_train.amat",
    "validation": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}
OMNIGLOT_FILE = "chardata.mat"  # Burda et al.'s 28x28 OMNIGLOT (IWAE code)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
TABLE_SUFFIXES = (".parquet", ".arrow")

_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
}
_SKIPPED_SPLITS = ("extra",)

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
class Recipe:
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


RECIPES = {
    "cifar10": Recipe("cifar10", "uoft-cs/cifar10", None, (("train", "train"), ("test", "test")),
                       "img", "label", (3, 32, 32), "none", _rgb),
    "svhn": Recipe("svhn", "ufldl-stanford/svhn", "cropped_digits", (("train", "train"), ("test", "test")),
                    "image", "label", (3, 32, 32), "none", _rgb),
    "mnist": Recipe("mnist", "ylecun/mnist", None, (("train", "train"), ("test", "test")),
                     "image", "label", (1, 28, 28), "dynamic", _grey),
    "omniglot": Recipe("omniglot", "GATE-engine/omniglot", None, (("train", "full"),),
                        "image", "label", (1, 28, 28), "dynamic", _omniglot28, test_fraction=0.25),
    "celeba64": Recipe("celeba64", "flwrlabs/celeba", "img_align+identity+attr",
                        (("train", "train"), ("validation", "valid"), ("test", "test")),
                        "image", "celeb_id", (3, 64, 64), "none", _celeba64),
    "binarized-mnist": Recipe("binarized-mnist", None, None, (), None, None, (1, 28, 28), "static", _grey),
    "folder": Recipe("folder", None, None, (), None, "label", None, "none", _pil_to_array),
}


def recipe_of(dataset: str) -> Recipe:
    if dataset not in RECIPES:
        raise UserError(f"unknown image dataset {dataset!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    return RECIPES[dataset]


# ----------------------------------------------------------------------------------------------
# Conversion: source -> {split: (uint8 (N, C, H, W), int64 labels | None)}


def convert(recipe: Recipe, data_dir: Path | None) -> dict:
    """Every split of the source as {split: (uint8 (N, C, H, W), int64 labels | None)}."""
    if recipe.name == "binarized-mnist":
        return _convert_amat(data_dir)
    if recipe.name == "omniglot" and data_dir is not None:
        found = [p for p in walk_files(data_dir) if p.name == OMNIGLOT_FILE]
        if found:
            return _convert_chardata(found[0])
    if data_dir is None:
        return _convert_hub(recipe)
    tables = [p for p in walk_files(data_dir) if p.suffix.lower() in TABLE_SUFFIXES]
    if tables:
        return _convert_tables(recipe, data_dir, tables)
    images = [p for p in walk_files(data_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        return _convert_folder(recipe, data_dir)
    expected = f"{OMNIGLOT_FILE}, " if recipe.name == "omniglot" else ""
    if any(p.name == OMNIGLOT_FILE for p in walk_files(data_dir)):
        expected, fix = "", f"for OMNIGLOT's {OMNIGLOT_FILE} pass --dataset omniglot"
    else:
        fix = "point --data-dir at an image folder or a local copy of the dataset"
    raise UserError(f"no {expected}images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) or parquet/arrow files found in "
                    f"{data_dir}; {fix}")


def walk_files(root: Path) -> list[Path]:
    """The files under ``root`` (hidden ones skipped), each folder's own files by name before its
    subfolders by name. Symbolic links are followed, to files and to folders (a ``test`` link to where
    the images are); a link to a folder the walk is already inside (a cycle) is not entered again."""
    found = []
    above = {os.fspath(root): {os.path.realpath(root)}}  # folder -> real paths of it and its parents
    for folder, dirs, files in os.walk(root, followlinks=True):
        chain = above.pop(folder)
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(folder, name))
            if real not in chain:
                above[os.path.join(folder, name)] = chain | {real}
                kept.append(name)
        dirs[:] = kept
        found.extend(Path(folder) / name for name in sorted(files) if not name.startswith("."))
    return found


def _convert_hub(recipe: Recipe) -> dict:
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


def _convert_tables(recipe: Recipe, data_dir: Path, tables: list[Path]) -> dict:
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


def _label_column(features, recipe: Recipe) -> str | None:
    for name in (recipe.label_column, "label"):
        if name and name in (features or {}):
            return name
    return None


def _as_labels(values: list) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind in "iub":
        return array.astype(np.int64)
    return np.unique(array.astype(str), return_inverse=True)[1].astype(np.int64)  # names -> sorted ids


def _convert_table(recipe: Recipe, table, n: int, source: str, split: str) -> tuple[np.ndarray, np.ndarray | None]:
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

    images = decode_all(batches(), n, recipe, lambda i: f"row {i} of {source}",
                         desc=f"converting {recipe.name} {split}")
    return images, (_as_labels(labels) if label_column else None)


def _convert_folder(recipe: Recipe, data_dir: Path) -> dict:
    split_dirs = {}
    for child in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for split, aliases in _SPLIT_ALIASES.items():
            if child.name.lower() in aliases and split not in split_dirs:
                split_dirs[split] = child
    # Without train/ (an out-of-distribution set is often only test/) the folder has no training split.
    if not split_dirs:
        split_dirs = {"train": data_dir}
    files = {split: [p for p in walk_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
             for split, folder in split_dirs.items()}
    classes = {split: [p.parent.relative_to(split_dirs[split]).as_posix() for p in paths]
               for split, paths in files.items()}
    names = sorted({c for cs in classes.values() for c in cs})
    index = {name: i for i, name in enumerate(names)}
    parts = {}
    for split, paths in files.items():
        if not paths:  # an empty split folder is no split (training refuses a missing train split)
            continue
        images = decode_all(_chunks(paths, 256), len(paths), recipe, lambda i, p=paths: str(p[i]),
                             desc=f"converting {data_dir.name}/{split}")
        labels = None
        if names != ["."]:  # class subfolders present
            labels = np.array([index[c] for c in classes[split]], dtype=np.int64)
        parts[split] = (images, labels)
    if not parts:  # images only beside empty split folders
        raise UserError(f"no images found in {', '.join(str(d) for d in split_dirs.values())}; expected files such "
                        "as .png or .jpg in the split folders")
    return parts


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _convert_amat(data_dir: Path) -> dict:
    found = {p.name: p for p in walk_files(data_dir)}
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
# Cheap look at the first image (for image_shape).


def first_local_image(data_dir: Path) -> Image.Image:
    """The first image under ``data_dir`` (a file, or row 0 of the first table), for a cheap look at its shape."""
    files = walk_files(data_dir)
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
            with open_image(value) as image:
                return image.copy()
    raise UserError(f"found no image column in {path}; expected a column of images such as 'image' or 'img'")
