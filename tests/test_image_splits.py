"""Standard splits: Burda et al.'s OMNIGLOT ``chardata.mat`` with its own train/test split.

The ``.mat`` files are generated here with scipy.io.savemat in the layout of the real file (IWAE code):
``data`` (784, N) and ``testdata`` (784, M) floats in [0, 1], one column-major image per column,
``target`` / ``testtarget`` (50, N) one-hot alphabets.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from biva_image import data
from biva_image.data import ImageDataConfig, load_image_splits
from shared.errors import UserError

N_TRAIN, N_TEST, ALPHABETS = 40, 12, 50


def _characters(n: int, offset: int) -> np.ndarray:
    """(n, 28, 28) floats: a bright pixel at row 2, column 5 (asymmetric, so a transposed read is
    caught), a mid-grey pixel 0.5, and the image's id at row 27, column 0 (as id / 255)."""
    images = np.zeros((n, 28, 28))
    images[:, 2, 5] = 1.0
    images[:, 20, 10] = 0.5
    images[:, 27, 0] = (offset + np.arange(n)) / 255
    return images


def _column_major(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) -> (784, n), each image flattened in MATLAB (column-major) order."""
    return np.stack([image.flatten(order="F") for image in images], axis=1)


def _one_hot(labels: np.ndarray) -> np.ndarray:
    onehot = np.zeros((ALPHABETS, len(labels)))
    onehot[labels, np.arange(len(labels))] = 1.0
    return onehot


def _write_chardata(folder: Path, **overrides) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    contents = {"data": _column_major(_characters(N_TRAIN, 0)), "testdata": _column_major(_characters(N_TEST, 100)),
                "target": _one_hot(np.arange(N_TRAIN) % 7), "testtarget": _one_hot(np.arange(N_TEST) % 5 + 3)}
    contents.update(overrides)
    scipy.io.savemat(str(folder / "chardata.mat"), {k: v for k, v in contents.items() if v is not None})
    return contents


def _cfg(tmp_path, folder, **kwargs) -> ImageDataConfig:
    return ImageDataConfig(dataset="omniglot", data_dir=str(folder), cache_dir=str(tmp_path / "cache"), **kwargs)


def _ids(images: np.ndarray) -> list[int]:
    return [int(image[0, 27, 0]) for image in images]


def test_chardata_keeps_its_train_test_split_orientation_values_and_alphabet_labels(tmp_path):
    contents = _write_chardata(tmp_path / "omniglot")
    splits = load_image_splits(_cfg(tmp_path, tmp_path / "omniglot", valid_size=4))

    assert splits.binarize == "dynamic" and splits.train.dtype == np.uint8
    assert len(splits.train) == N_TRAIN - 4 and len(splits.valid) == 4
    assert sorted(_ids(splits.train) + _ids(splits.valid)) == list(range(N_TRAIN))
    assert _ids(splits.test) == list(range(100, 100 + N_TEST))  # the file's own test split, in order
    for images in (splits.train, splits.valid, splits.test):
        assert images.shape[1:] == (1, 28, 28)
        assert (images[:, 0, 2, 5] == 255).all() and (images[:, 0, 5, 2] == 0).all(), "upright, not transposed"
        assert (images[:, 0, 20, 10] == 128).all()  # x * 255 rounded
    # the IWAE code's reading of the same file
    iwae = contents["testdata"].T.reshape((-1, 28, 28), order="F")
    np.testing.assert_array_equal(splits.test[:, 0], np.rint(iwae * 255).astype(np.uint8))
    assert splits.test_labels.tolist() == (np.arange(N_TEST) % 5 + 3).tolist()
    assert splits.train_labels.tolist() == [i % 7 for i in _ids(splits.train)]
    assert splits.valid_labels.tolist() == [i % 7 for i in _ids(splits.valid)]


def test_chardata_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    _write_chardata(tmp_path / "omniglot")
    cfg = _cfg(tmp_path, tmp_path / "omniglot")
    first = load_image_splits(cfg)

    def must_not_be_called(path):
        raise AssertionError("the cached arrays should have been used")

    monkeypatch.setattr(data, "_convert_chardata", must_not_be_called)
    second = load_image_splits(cfg)
    np.testing.assert_array_equal(first.test, second.test)
    np.testing.assert_array_equal(first.train_labels, second.train_labels)


@pytest.mark.parametrize("overrides, message", [
    ({"testtarget": None}, r"lacks the key testtarget"),
    ({"data": np.zeros((783, N_TRAIN))}, r"data is \(783, 40\).*expected \(784, N\)"),
    ({"target": np.zeros((ALPHABETS, N_TRAIN - 1))}, r"target \(50, 39\), expected"),
    ({"testdata": np.full((784, N_TEST), 255.0)}, r"testdata holds values outside \[0, 1\]"),
])
def test_a_malformed_chardata_is_a_one_line_user_error(tmp_path, overrides, message):
    _write_chardata(tmp_path / "omniglot", **overrides)
    with pytest.raises(UserError, match=message) as info:
        load_image_splits(_cfg(tmp_path, tmp_path / "omniglot"))
    assert "\n" not in str(info.value) and "chardata.mat" in str(info.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("meta.json"))


def test_a_file_that_is_not_matlab_is_a_user_error(tmp_path):
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "chardata.mat").write_bytes(b"not a MATLAB file at all\n" * 10)
    with pytest.raises(UserError, match=r"could not read .*chardata\.mat as a MATLAB file"):
        load_image_splits(_cfg(tmp_path, tmp_path / "omniglot"))
