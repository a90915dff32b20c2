"""Image data layer: every source becomes uint8 (N, C, H, W), cached once, with seeded carving.

All data is made here in tmp_path (tiny parquet files standing in for the hub's, .amat files, image
folders); nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from biva_image import data, sources
from biva_image.data import ImageDataConfig, ImageDataset, image_shape, load_image_splits
from shared.errors import UserError


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(path, column, images, labels, hub_metadata):
    """A parquet file as saved from the hub (Image feature metadata) or as plain {bytes, path} structs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if hub_metadata:
        features = datasets.Features({column: datasets.Image(), "label": datasets.Value("int64")})
        rows = {column: [{"bytes": _png(a), "path": None} for a in images], "label": list(labels)}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    else:
        rows = [{"bytes": _png(a), "path": None} for a in images]
        pq.write_table(pa.table({column: rows, "label": list(labels)}), path)


def _cfg(tmp_path, **kwargs) -> ImageDataConfig:
    return ImageDataConfig(cache_dir=str(tmp_path / "cache"), **kwargs)


def _indexed_images(n, shape, offset=0):
    """(N, H, W[, C]) uint8 where image i is filled with the value offset + i, to track identity."""
    return np.stack([np.full(shape, offset + i, dtype=np.uint8) for i in range(n)])


def _ids(images: np.ndarray) -> set[int]:
    return {int(image.reshape(-1)[0]) for image in images}


# ----------------------------------------------------------------------------------------------
# Local copies of hub datasets (parquet), converted like the hub data.


@pytest.mark.parametrize("hub_metadata", [True, False])
def test_cifar10_parquet_copy_roundtrips_pixels_and_labels(tmp_path, hub_metadata):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    root = tmp_path / "cifar"
    _write_parquet(root / "plain_text" / "train-00000-of-00001.parquet", "img", train, np.arange(30) % 10, hub_metadata)
    _write_parquet(root / "plain_text" / "test-00000-of-00001.parquet", "img", test, np.arange(7) % 10, hub_metadata)

    splits = load_image_splits(_cfg(tmp_path, dataset="cifar10", data_dir=str(root), valid_size=3))

    assert splits.name == "cifar10" and splits.binarize == "none"
    assert splits.train.dtype == np.uint8 and splits.train.shape == (27, 3, 32, 32)
    assert splits.valid.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(splits.test, test.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(splits.test_labels, np.arange(7) % 10)
    assert splits.test_labels.dtype == np.int64
    # train + valid are exactly the source train images, each once, labels travelling with them
    together = np.concatenate([splits.train, splits.valid])
    together_labels = np.concatenate([splits.train_labels, splits.valid_labels])
    source = train.transpose(0, 3, 1, 2)
    order = [int(np.flatnonzero((source == image).all(axis=(1, 2, 3)))[0]) for image in together]
    assert sorted(order) == list(range(30))
    np.testing.assert_array_equal(together_labels, (np.arange(30) % 10)[order])


def test_svhn_copy_uses_its_config_and_skips_extra(tmp_path):
    root = tmp_path / "svhn"
    images = _indexed_images(12, (32, 32, 3))
    _write_parquet(root / "cropped_digits" / "train-00000-of-00001.parquet", "image", images[:10], range(10), True)
    _write_parquet(root / "cropped_digits" / "test-00000-of-00001.parquet", "image", images[10:], [1, 2], True)
    _write_parquet(root / "cropped_digits" / "extra-00000-of-00001.parquet", "image",
                   _indexed_images(5, (32, 32, 3), offset=100), range(5), True)
    # another config of the same hub repo, different size: must not be read
    _write_parquet(root / "full_numbers" / "train-00000-of-00001.parquet", "image",
                   _indexed_images(3, (40, 50, 3), offset=200), range(3), True)

    splits = load_image_splits(_cfg(tmp_path, dataset="svhn", data_dir=str(root)))

    assert _ids(splits.train) | _ids(splits.valid) == set(range(10))
    assert _ids(splits.test) == {10, 11}
    assert splits.train.shape[1:] == (3, 32, 32)


def test_mnist_copy_is_one_grey_channel_dynamically_binarised(tmp_path):
    digits = np.random.default_rng(1).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    root = tmp_path / "mnist"
    _write_parquet(root / "mnist" / "train-00000-of-00001.parquet", "image", digits[:10], range(10), True)
    _write_parquet(root / "mnist" / "test-00000-of-00001.parquet", "image", digits[10:], [3, 4], True)

    splits = load_image_splits(_cfg(tmp_path, dataset="mnist", data_dir=str(root)))

    assert splits.binarize == "dynamic"
    assert splits.train.shape[1:] == (1, 28, 28)
    np.testing.assert_array_equal(splits.test[:, 0], digits[10:])


def test_celeba_copy_is_centre_cropped_to_148_and_resized_to_64(tmp_path):
    # 178x218 aligned faces: a 148x148 centre square of one colour inside a frame of another
    face = np.zeros((218, 178, 3), dtype=np.uint8)
    face[:] = (250, 0, 0)
    top, left = (218 - 148) // 2, (178 - 148) // 2
    face[top:top + 148, left:left + 148] = (10, 200, 30)
    root = tmp_path / "celeba"
    config = "img_align+identity+attr"
    for split in ("train", "valid", "test"):
        _write_parquet(root / config / f"{split}-00000-of-00001.parquet", "image", np.stack([face] * 2), [0, 1], True)

    splits = load_image_splits(_cfg(tmp_path, dataset="celeba64", data_dir=str(root)))

    assert splits.train.shape == (2, 3, 64, 64)
    assert splits.valid.shape == (2, 3, 64, 64)  # the dataset's own validation split, not carved
    assert splits.test.shape == (2, 3, 64, 64)
    np.testing.assert_array_equal(splits.train[0, :, :, :].reshape(3, -1).T[0], (10, 200, 30))
    assert (splits.train[:, 0] == 10).all(), "nothing of the frame outside the 148x148 centre may remain"


def test_named_dataset_with_wrong_image_size_is_a_user_error(tmp_path):
    root = tmp_path / "small"
    _write_parquet(root / "train-00000-of-00001.parquet", "img", _indexed_images(3, (16, 16, 3)), range(3), True)
    with pytest.raises(UserError, match=r"16x16 .*32x32.*--dataset folder"):
        load_image_splits(_cfg(tmp_path, dataset="cifar10", data_dir=str(root)))


# ----------------------------------------------------------------------------------------------
# Hub path (load_dataset faked: no network in tests).


def test_omniglot_from_hub_is_inverted_resized_and_test_carved_per_character(tmp_path, monkeypatch):
    n_chars, drawers = 4, 20
    canvas = np.full((105, 105), 255, dtype=np.uint8)  # white paper
    canvas[40:65, 20:85] = 0  # black ink
    images = [Image.fromarray(canvas).convert("1") for _ in range(n_chars * drawers)]
    labels = [i // drawers for i in range(n_chars * drawers)]
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("shared.hub.require_hub_dataset", lambda repo_id, fix: None)  # this hub answers
    splits = load_image_splits(_cfg(tmp_path, dataset="omniglot", valid_size=1000))

    assert calls == [("GATE-engine/omniglot", None, "full")]
    assert splits.binarize == "dynamic"
    assert splits.train.shape[1:] == (1, 28, 28)
    # 5 of 20 drawings per character go to test (24,345 / 8,115; not the standard chardata.mat split)
    assert np.bincount(splits.test_labels).tolist() == [5] * n_chars
    assert len(splits.train) + len(splits.valid) == n_chars * 15
    assert len(splits.valid) == (n_chars * 15) // 10
    image = splits.train[0, 0]
    assert image[0, 0] == 0 and image[14, 14] == 255, "ink must be white (255) on a black background"


def test_hub_dataset_offline_is_a_user_error_naming_data_dir(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("shared.hub.require_hub_dataset", lambda repo_id, fix: None)  # the hub answered, the data not
    with pytest.raises(UserError) as info:
        load_image_splits(_cfg(tmp_path, dataset="cifar10"))
    message = str(info.value)
    assert "could not fetch uoft-cs/cifar10 (offline?)" in message and "--data-dir" in message
    assert "\n" not in message


def test_second_load_reads_the_cache_without_datasets(tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    images = _indexed_images(20, (32, 32, 3))
    _write_parquet(root / "train-00000-of-00001.parquet", "img", images, range(20), True)
    cfg = _cfg(tmp_path, dataset="cifar10", data_dir=str(root), valid_size=4)
    first = load_image_splits(cfg)

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    second = load_image_splits(cfg)

    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.valid_labels, second.valid_labels)
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder.name.startswith("cifar10-")
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.npy", "train_labels.npy"]
    assert np.load(folder / "train.npy").shape == (20, 3, 32, 32)  # cached before carving


def test_cache_is_rebuilt_when_the_folder_changes(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / f"{i}.png")
    cfg = _cfg(tmp_path, dataset="folder", data_dir=str(root))
    assert len(load_image_splits(cfg).train) + 1 == 10
    Image.fromarray(np.full((8, 8), 10, np.uint8)).save(root / "10.png")
    splits = load_image_splits(cfg)
    assert _ids(splits.train) | _ids(splits.valid) == set(range(11))


# ----------------------------------------------------------------------------------------------
# Statically binarised MNIST (.amat).


def _write_amat(path, bits):
    path.write_text("".join(" ".join(str(int(b)) for b in row) + "\n" for row in bits.reshape(len(bits), -1)))


def test_binarized_mnist_amat_keeps_its_own_validation_split(tmp_path):
    rng = np.random.default_rng(2)
    bits = {split: rng.integers(0, 2, (n, 28, 28)) for split, n in (("train", 12), ("valid", 5), ("test", 4))}
    root = tmp_path / "bmnist"
    root.mkdir()
    for split, array in bits.items():
        _write_amat(root / f"binarized_mnist_{split}.amat", array)

    splits = load_image_splits(_cfg(tmp_path, dataset="binarized-mnist", data_dir=str(root), valid_size=5000))

    assert splits.binarize == "static"
    np.testing.assert_array_equal(splits.train[:, 0], bits["train"] * 255)
    np.testing.assert_array_equal(splits.valid[:, 0], bits["valid"] * 255)
    np.testing.assert_array_equal(splits.test[:, 0], bits["test"] * 255)
    assert splits.train.dtype == np.uint8 and splits.train_labels is None


def test_binarized_mnist_without_files_names_the_download(tmp_path):
    with pytest.raises(UserError, match="larocheh/public/datasets/binarized_mnist"):
        load_image_splits(_cfg(tmp_path, dataset="binarized-mnist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"binarized_mnist_train\.amat.*larocheh"):
        load_image_splits(_cfg(tmp_path, dataset="binarized-mnist", data_dir=str(tmp_path / "empty")))


# ----------------------------------------------------------------------------------------------
# Image folders.


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)


def test_folder_with_splits_and_class_subfolders(tmp_path):
    root = tmp_path / "pets"
    rgb = lambda v: np.full((12, 10, 3), v, np.uint8)  # noqa: E731
    for i in range(6):
        _save(root / "train" / "dog" / f"d{i}.png", rgb(i))
        _save(root / "train" / "cat" / f"c{i}.png", rgb(50 + i))
    _save(root / "test" / "dog" / "t0.png", rgb(100))
    _save(root / "test" / "cat" / "t1.jpg", rgb(150))
    (root / "train" / "notes.txt").write_text("not an image")

    cfg = _cfg(tmp_path, dataset="folder", data_dir=str(root))
    splits = load_image_splits(cfg)

    assert image_shape(cfg) == (3, 12, 10)
    assert splits.train.shape[1:] == (3, 12, 10) and len(splits.train) + len(splits.valid) == 12
    together = np.concatenate([splits.train, splits.valid])
    labels = np.concatenate([splits.train_labels, splits.valid_labels])
    for image, label in zip(together, labels):  # sorted class names: cat -> 0, dog -> 1
        assert label == (0 if image[0, 0, 0] >= 50 else 1)
    assert splits.test_labels.tolist() == [0, 1]  # t1 (cat) and t0 (dog), files sorted by path
    assert abs(int(splits.test[0, 0, 0, 0]) - 150) <= 2 and splits.test[1, 0, 0, 0] == 100


def test_folder_validation_subfolder_is_used_instead_of_carving(tmp_path):
    root = tmp_path / "f"
    for i in range(20):
        _save(root / "train" / f"{i}.png", np.full((4, 4), i, np.uint8))
    for i in range(3):
        _save(root / "validation" / f"{i}.png", np.full((4, 4), 200 + i, np.uint8))
    splits = load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(root)))
    assert _ids(splits.train) == set(range(20))
    assert _ids(splits.valid) == {200, 201, 202}
    assert splits.test is None and splits.train_labels is None


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3), ("RGBA", 4), ("P", 3)])
def test_folder_keeps_the_channel_count(tmp_path, mode, channels):
    root = tmp_path / "g"
    for i in range(4):
        _save(root / f"{i}.png", np.full((9, 7, 3), 40 * i, np.uint8), mode=mode)
    cfg = _cfg(tmp_path, dataset="folder", data_dir=str(root))
    splits = load_image_splits(cfg)
    assert splits.train.shape[1:] == (channels, 9, 7)
    assert image_shape(cfg) == (channels, 9, 7)


def test_folder_with_mixed_sizes_names_the_offending_file(tmp_path):
    root = tmp_path / "mixed"
    _save(root / "a.png", np.zeros((16, 16), np.uint8))
    _save(root / "b.png", np.zeros((16, 16), np.uint8))
    _save(root / "c.png", np.zeros((20, 24), np.uint8))
    with pytest.raises(UserError) as info:
        load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(root)))
    message = str(info.value)
    assert "c.png" in message and "24x20" in message and "16x16" in message


def test_folder_with_mixed_channel_counts_is_a_user_error(tmp_path):
    root = tmp_path / "mixed"
    _save(root / "a.png", np.zeros((16, 16), np.uint8))
    _save(root / "b.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(UserError, match=r"b\.png is 16x16 pixels with 3 channels, expected 16x16 pixels with 1 channel"):
        load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(root)))


def test_a_folder_of_only_test_loads_for_evaluation_and_training_refuses_it(tmp_path):
    """An out-of-distribution set is often just test/: it loads (without train or validation images)
    wherever evaluation reads it; training still needs training images."""
    root = tmp_path / "ood"
    for i in range(5):
        _save(root / "test" / f"{i}.png", np.full((4, 6), 10 * i, np.uint8))
    cfg = _cfg(tmp_path, dataset="folder", data_dir=str(root))
    for _ in range(2):  # converted, then read from the cache
        splits = load_image_splits(cfg, require_train=False)
        assert splits.test.shape == (5, 1, 4, 6) and _ids(splits.test) == {0, 10, 20, 30, 40}
        assert splits.train.shape == splits.valid.shape == (0, 1, 4, 6) and splits.shape == (1, 4, 6)
        assert splits.valid_from == "none" and splits.test_labels is None
    assert image_shape(cfg) == (1, 4, 6)
    with pytest.raises(UserError, match=r"has test images but no training images; add a train/ folder"):
        load_image_splits(cfg)


def test_symbolic_links_are_followed_in_image_folders_without_looping(tmp_path):
    """A split folder (or a file, or a class folder) may be a symbolic link to where the images are; a
    link back to a folder above it is entered once, not forever."""
    elsewhere = tmp_path / "elsewhere"
    for i in range(6):
        _save(elsewhere / "train-images" / ("cat" if i < 3 else "dog") / f"{i}.png", np.full((4, 4), i, np.uint8))
    _save(elsewhere / "cat.png", np.full((4, 4), 100, np.uint8))
    _save(elsewhere / "dogs" / "d.png", np.full((4, 4), 101, np.uint8))
    root = tmp_path / "linked"
    (root / "test" / "cat").mkdir(parents=True)
    (root / "train").symlink_to(elsewhere / "train-images", target_is_directory=True)
    (root / "test" / "cat" / "c.png").symlink_to(elsewhere / "cat.png")
    (root / "test" / "dog").symlink_to(elsewhere / "dogs", target_is_directory=True)
    (elsewhere / "train-images" / "cat" / "again").symlink_to(elsewhere / "train-images", target_is_directory=True)  # a cycle
    (root / "test" / "dog" / "up").symlink_to(root / "test", target_is_directory=True)  # a cycle through a link
    splits = load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(root), valid_size=1))
    assert len(splits.train) + len(splits.valid) == 6 and _ids(splits.train) | _ids(splits.valid) == set(range(6))
    assert splits.test[:, 0, 0, 0].tolist() == [100, 101] and splits.test_labels.tolist() == [0, 1]  # cat, dog
    assert splits.train_labels.tolist() == [0 if i < 3 else 1 for i in sorted(_ids(splits.train))]
    assert sources.walk_files(root) == [root / "test" / "cat" / "c.png", root / "test" / "dog" / "d.png"] + [
        root / "train" / ("cat" if i < 3 else "dog") / f"{i}.png" for i in range(6)]


def test_empty_folder_and_missing_folder_are_user_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images"):
        load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(empty)))
    with pytest.raises(UserError, match="no images"):
        image_shape(_cfg(tmp_path, dataset="folder", data_dir=str(empty)))
    with pytest.raises(UserError, match="not an existing folder"):
        load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="--data-dir"):
        load_image_splits(_cfg(tmp_path, dataset="folder"))


def test_broken_image_file_is_a_user_error_naming_it(tmp_path):
    root = tmp_path / "broken"
    _save(root / "ok.png", np.zeros((8, 8), np.uint8))
    (root / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(UserError, match=r"bad\.png"):
        load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(root)))


def test_unknown_dataset_lists_the_valid_names(tmp_path):
    with pytest.raises(UserError) as info:
        load_image_splits(_cfg(tmp_path, dataset="imagenet"))
    assert "imagenet" in str(info.value)
    assert all(name in str(info.value) for name in data.IMAGE_DATASETS)
    with pytest.raises(UserError):
        image_shape(_cfg(tmp_path, dataset="imagenet"))


def test_image_shape_of_hub_datasets_touches_no_data(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("no data should be loaded"))
    assert image_shape(_cfg(tmp_path, dataset="cifar10")) == (3, 32, 32)
    assert image_shape(_cfg(tmp_path, dataset="omniglot")) == (1, 28, 28)
    assert image_shape(_cfg(tmp_path, dataset="celeba64")) == (3, 64, 64)


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGBA", 4)])
def test_image_shape_of_a_fresh_folder_reads_the_first_image(tmp_path, mode, channels):
    root = tmp_path / "fresh"
    for i in range(3):
        _save(root / "train" / f"{i}.png", np.zeros((20, 12, 3), np.uint8), mode=mode)
    assert image_shape(_cfg(tmp_path, dataset="folder", data_dir=str(root))) == (channels, 20, 12)
    assert not (tmp_path / "cache").exists(), "image_shape must not convert the folder"


def test_arrow_copy_saved_with_save_to_disk(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    images = _indexed_images(9, (28, 28))
    copy = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images[:6]],
                                             "label": range(6)}, features=features),
        "test": datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images[6:]],
                                            "label": range(3)}, features=features)})
    copy.save_to_disk(str(tmp_path / "mnist-arrow"))
    splits = load_image_splits(_cfg(tmp_path, dataset="mnist", data_dir=str(tmp_path / "mnist-arrow")))
    assert _ids(splits.train) | _ids(splits.valid) == set(range(6))
    assert _ids(splits.test) == {6, 7, 8} and splits.test_labels.tolist() == [0, 1, 2]


def test_image_shape_of_a_parquet_folder_reads_one_row(tmp_path):
    root = tmp_path / "pq"
    _write_parquet(root / "train-00000-of-00001.parquet", "image", _indexed_images(3, (20, 12)), range(3), True)
    assert image_shape(_cfg(tmp_path, dataset="folder", data_dir=str(root))) == (1, 20, 12)


# ----------------------------------------------------------------------------------------------
# Seeded validation carving.


def _folder_of(tmp_path, n):
    root = tmp_path / f"n{n}"
    for i in range(n):
        _save(root / "train" / f"{i:03d}.png", np.full((4, 4), i, np.uint8))
    return root


def test_validation_carving_is_seeded_disjoint_and_capped(tmp_path):
    root = _folder_of(tmp_path, 200)
    load = lambda seed, size: load_image_splits(  # noqa: E731
        _cfg(tmp_path, dataset="folder", data_dir=str(root), split_seed=seed, valid_size=size))

    a, b, c = load(0, 15), load(0, 15), load(1, 15)
    assert len(a.valid) == 15 and len(a.train) == 185
    assert _ids(a.valid) == _ids(b.valid) and np.array_equal(a.train, b.train)
    assert _ids(a.valid) != _ids(c.valid)
    assert not _ids(a.valid) & _ids(a.train)
    assert _ids(a.valid) | _ids(a.train) == set(range(200))
    assert len(load(0, 5000).valid) == 20  # capped at 10% of train


def test_carve_is_stratified_with_labels():
    labels = np.repeat(np.arange(3), 20)
    kept, carved = data.carve(60, 15, 0, labels)
    assert np.bincount(labels[carved]).tolist() == [5, 5, 5]
    assert np.intersect1d(kept, carved).size == 0 and kept.size + carved.size == 60


# ----------------------------------------------------------------------------------------------
# Dataset.


def test_image_dataset_items_and_batches():
    images = np.random.default_rng(3).integers(0, 256, (5, 3, 6, 4), dtype=np.uint8)
    dataset = ImageDataset(images)
    assert len(dataset) == 5
    item = dataset[2]
    assert item["index"] == 2 and item["x"].dtype == torch.uint8 and item["x"].shape == (3, 6, 4)
    assert np.array_equal(item["x"].numpy(), images[2])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["x"].shape == (4, 3, 6, 4) and batch["index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        ImageDataset(images.astype(np.float32))


def test_no_temporary_files_left_in_the_cache(tmp_path):
    root = _folder_of(tmp_path, 12)
    load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(root)))
    leftovers = [name for _, _, files in os.walk(tmp_path / "cache") for name in files if name.endswith(".tmp")]
    assert leftovers == []


# ----------------------------------------------------------------------------------------------
# The real-image benchmark folder (needs scikit-image's sample photographs; skipped without them).


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_real_image_patches_make_a_loadable_folder_with_disjoint_sources(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "real_images", Path(__file__).resolve().parents[1] / "benchmarks" / "real_images.py")
    real_images = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_images)
    for channels in (1, 3):
        train_photos = set(real_images.source_photos("train", channels))
        test_photos = set(real_images.source_photos("test", channels))
        assert train_photos and test_photos and not train_photos & test_photos

    patches = real_images.real_image_patches(size=8, channels=3, n=50, seed=0)
    assert patches.shape == (50, 3, 8, 8) and patches.dtype == np.uint8
    assert np.array_equal(patches, real_images.real_image_patches(size=8, channels=3, n=50, seed=0))

    real_images.write_image_folder(tmp_path / "real", size=8, channels=1, n_train=60, n_test=20)
    splits = load_image_splits(_cfg(tmp_path, dataset="folder", data_dir=str(tmp_path / "real"), valid_size=6))
    assert splits.train.shape == (54, 1, 8, 8) and splits.valid.shape == (6, 1, 8, 8)
    assert splits.test.shape == (20, 1, 8, 8)
    np.testing.assert_array_equal(splits.test, real_images.real_image_patches(8, 1, 20, seed=0, split="test"))
