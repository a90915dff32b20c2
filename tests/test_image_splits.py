"""Standard splits: Burda et al.'s OMNIGLOT ``chardata.mat`` with its own train/test split, and
``--valid-size 0`` (train on the whole training split, validate on a seeded subset of it).

The ``.mat`` files are generated here with scipy.io.savemat in the layout of the real file (IWAE code):
``data`` (784, N) and ``testdata`` (784, M) floats in [0, 1], one column-major image per column,
``target`` / ``testtarget`` (50, N) one-hot alphabets.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from biva_image import sources
from biva_image.data import ImageDataConfig, load_image_splits
from shared.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
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
    assert len(splits.train) == N_TRAIN - 4 and len(splits.valid) == 4 and splits.valid_from == "carved"
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

    monkeypatch.setattr(sources, "_convert_chardata", must_not_be_called)
    second = load_image_splits(cfg)
    np.testing.assert_array_equal(first.test, second.test)
    np.testing.assert_array_equal(first.train_labels, second.train_labels)


def test_valid_size_zero_trains_on_every_training_image_and_validates_on_a_seeded_subset(tmp_path):
    _write_chardata(tmp_path / "omniglot")
    load = lambda **kw: load_image_splits(_cfg(tmp_path, tmp_path / "omniglot", **kw))  # noqa: E731

    full, again, other = load(valid_size=0), load(valid_size=0), load(valid_size=0, split_seed=1)
    n_valid = N_TRAIN // 10  # min(VALID_FROM_TRAIN, 10% of train)
    assert full.valid_from == "train"
    assert _ids(full.train) == list(range(N_TRAIN))  # every training image, in the file's order
    assert len(full.valid) == n_valid and set(_ids(full.valid)) <= set(_ids(full.train))
    assert _ids(full.valid) == _ids(again.valid) and _ids(full.valid) != _ids(other.valid)
    # the same images a carve of that size would hold out with the same seed
    assert _ids(full.valid) == _ids(load(valid_size=n_valid).valid)
    assert full.valid_labels.tolist() == [i % 7 for i in _ids(full.valid)]


def test_valid_size_zero_keeps_a_sources_own_validation_split(tmp_path):
    root = tmp_path / "bmnist"
    root.mkdir()
    for split, n in (("train", 12), ("valid", 5), ("test", 4)):
        rows = np.zeros((n, 784), dtype=int)
        rows[:, 0] = 1 if split == "valid" else 0
        (root / f"binarized_mnist_{split}.amat").write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    splits = load_image_splits(ImageDataConfig(dataset="binarized-mnist", data_dir=str(root), valid_size=0,
                                               cache_dir=str(tmp_path / "cache")))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (12, 5, 4)
    assert splits.valid_from == "validation" and (splits.valid[:, 0, 0, 0] == 255).all()


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


# ----------------------------------------------------------------------------------------------
# Through train_image.py, as a user runs it.


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_image_omniglot_trains_on_the_whole_split_by_default_and_says_so(tmp_path, capsys):
    _write_chardata(tmp_path / "omniglot")
    train_image = _script("train_image")
    run = tmp_path / "run"
    common = ["--dataset", "omniglot", "--data-dir", str(tmp_path / "omniglot"), "--preset", "tiny",
              "--batch-size", "8", "--eval-every", "2", "--save-every", "2", "--cache-dir", str(tmp_path / "cache")]
    train_image.main(common + ["--output-dir", str(run), "--max-steps", "2"])
    err = capsys.readouterr().err
    assert f"{N_TRAIN} train / {N_TRAIN // 10} valid images" in err
    assert f"validation: {N_TRAIN // 10} of the {N_TRAIN} training images (split seed 0)" in err
    assert json.loads((run / "config.json").read_text())["data"]["valid_size"] == 0
    report = _script("report_image").main(["--run", str(run), "--split", "valid", "--iw-samples", "2"])
    assert report["data"].endswith("(a seeded subset of train)")  # scored images that were trained on

    # A run started with a carved validation split resumes with it, whatever today's default is.
    carved = tmp_path / "carved"
    train_image.main(common + ["--output-dir", str(carved), "--max-steps", "2", "--valid-size", "4"])
    assert f"{N_TRAIN - 4} train / 4 valid images" in capsys.readouterr().err
    train_image.main(common + ["--output-dir", str(carved), "--max-steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert f"{N_TRAIN - 4} train / 4 valid images" in err and "validation:" not in err
