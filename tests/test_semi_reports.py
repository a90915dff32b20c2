"""Reports and samples of a semi-supervised (class-conditional) image run: classification error and
confusion matrix of q(y|x) in report_image.py, class-conditional grids from sample_image.py --class,
and their one-line errors. One tiny run (3 classes of 8x8 bars, trained a few steps with
--labels-per-class) is shared by the module; CPU, offline."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from core_utils import tiny_image_config, tiny_run
from script_utils import image_folder, load_script, run_main

from biva_image.model import ImageVAE
from biva_image.runs import load_image_model, load_split, run_data_config
from shared.distributions import HashedNoise
from shared.run_dir import export_weights, read_run_config, write_run_config

SIZE = 8
CLASSES = 3
TEST_PER_CLASS = (6, 5, 5)  # image_folder's 16 test images over 3 classes: rows must follow the true class

train_image, sample_image, report_image, export = (load_script(n) for n in ("train_image", "sample_image", "report_image",
                                                                         "export"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    data = image_folder(root / "data", n_train=90, n_test=sum(TEST_PER_CLASS), classes=CLASSES)
    run = root / "run"
    train_image.main(_argv("--data-dir", data, "--preset", "tiny", "--labels-per-class", "4", "--output-dir", run,
                      "--max-steps", "6", "--eval-every", "6", "--save-every", "6", "--batch-size", "8",
                      "--cache-dir", root / "cache"))
    # An unconditional run: the same tiny model without classes, exported without training.
    plain = root / "plain"
    plain.mkdir()
    cfg = tiny_image_config()
    write_run_config(plain, tiny_run(cfg))
    export_weights(plain, ImageVAE(cfg).state_dict())
    return {"root": root, "data": data, "run": run, "plain": plain}


def _argv(*args) -> list[str]:
    return [str(a) for a in args]


def _grid(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _side(n: int) -> int:
    return n * (SIZE + 1) + 1


def _confusion_by_hand(run_dir, seed: int = 0) -> np.ndarray:
    """argmax q(y|x) of the EMA weights on the whole test split, noise keyed like the report's."""
    run = read_run_config(run_dir, "image")
    model = load_image_model(run_dir, run)
    test = load_split(run_data_config(run), "test")
    index = torch.arange(len(test.images))
    with torch.no_grad():
        logits = model.classify({"index": index, "x": torch.from_numpy(test.images)}, HashedNoise(seed, index))
    confusion = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    np.add.at(confusion, (test.labels, logits.argmax(1).numpy()), 1)
    return confusion


def test_report_has_classification_error_of_its_confusion_matrix(world):
    report = report_image.main(_argv("--run", world["run"], "--iw-samples", "0", "--batch-size", "4"))
    saved = json.loads((world["run"] / "report-test.json").read_text())
    assert saved["classification_error"] == report["classification_error"]
    confusion = np.array(saved["confusion_matrix"])
    assert confusion.shape == (CLASSES, CLASSES)
    assert confusion.sum(axis=1).tolist() == list(TEST_PER_CLASS)  # rows are the true classes
    assert saved["classification_error"] == pytest.approx(1 - np.trace(confusion) / confusion.sum())
    # the same predictions as q(y|x) of the exported EMA weights, whatever the batch size
    assert np.array_equal(confusion, _confusion_by_hand(world["run"]))
    plot = world["run"] / "report-test-confusion.png"
    assert plot.is_file() and min(_grid(plot).shape[:2]) > 100


def test_report_classifies_the_max_examples_draw(world):
    report = report_image.main(_argv("--run", world["run"], "--iw-samples", "0", "--max-examples", "6"))
    confusion = np.array(report["confusion_matrix"])
    # a draw of 6 of the 16 test images, stratified: 2 of each class (quotas 2.25, 1.875, 1.875)
    assert confusion.sum() == 6 and confusion.sum(axis=1).tolist() == [2, 2, 2]
    assert report["subset"]["size"] == 6 and report["subset"]["stratified"] is True


def test_a_split_without_labels_gives_null_and_says_why(world, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(world["run"], copy)
    (copy / "report-test-confusion.png").unlink(missing_ok=True)
    flat = image_folder(tmp_path / "flat", n_train=20, n_test=5)  # no class subfolders
    code, out, err = run_main("report_image", ["--run", copy, "--iw-samples", "0", "--data-dir", flat], capsys)
    assert code == 0, err
    saved = json.loads((copy / "report-test.json").read_text())
    assert saved["classification_error"] is None and saved["confusion_matrix"] is None
    assert "no labels" in saved["classification_note"]
    assert [line for line in out.splitlines() if "classification error" in line and "no labels" in line]
    assert not (copy / "report-test-confusion.png").exists()


def test_labels_the_model_does_not_know_are_one_line(world, tmp_path, capsys):
    more = image_folder(tmp_path / "four", n_train=40, n_test=8, classes=4)
    before = (world["run"] / "report-test.json").read_bytes()
    code, _, err = run_main("report_image", ["--run", world["run"], "--iw-samples", "0", "--data-dir", more], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "3 classes" in err
    assert (world["run"] / "report-test.json").read_bytes() == before


def test_sample_class_draws_that_class_and_all_gives_one_row_per_class(world, tmp_path):
    run = world["run"]
    args = ["--run", run, "--scale", "1", "--output", "mean", "--seed", "5"]
    rows = [_grid(sample_image.main(_argv(*args + ["--class", c, "--num", "3", "--ncol", "3",
                                            "--out", tmp_path / f"c{c}.png"]))) for c in range(CLASSES)]
    grid = _grid(sample_image.main(_argv(*args + ["--class", "all", "--num", "3", "--batch-size", "4",
                                           "--out", tmp_path / "all.png"])))
    assert grid.shape == (_side(CLASSES), _side(3))  # one row per class, --num per row
    for c, row in enumerate(rows):
        assert row.shape == (_side(1), _side(3))
        # row c of the per-class grid is --class c: the same noise keys, the same images
        assert np.array_equal(grid[c * (SIZE + 1):(c + 1) * (SIZE + 1) + 1], row)
    assert not np.array_equal(rows[0], rows[1])  # y conditions the decoder: same noise, other class
    again = _grid(sample_image.main(_argv(*args + ["--class", "all", "--num", "3", "--out", tmp_path / "again.png"])))
    assert np.array_equal(again, grid)  # same seed, same images, whatever --batch-size


def test_an_exported_semi_supervised_run_keeps_its_labelled_set_and_its_classes(world, tmp_path):
    folder = tmp_path / "exported"
    export.main(_argv("--run", world["run"], "--to", folder))
    saved = json.loads((world["run"] / "labelled_indices.json").read_text())
    assert json.loads((folder / "labelled_indices.json").read_text()) == saved
    args = ["--scale", "1", "--output", "mean", "--seed", "5", "--class", "all", "--num", "3"]
    here = _grid(sample_image.main(_argv("--run", world["run"], *args, "--out", tmp_path / "run.png")))
    there = _grid(sample_image.main(_argv("--run", folder, *args, "--out", tmp_path / "exported.png")))
    assert np.array_equal(here, there)


@pytest.mark.parametrize("which, argv, words", [
    ("run", ["--class", "3"], "out of range"),
    ("run", ["--class", "all", "--ncol", "2"], "--ncol"),
    ("run", ["--class", "two"], "--class"),
    ("plain", ["--class", "0"], "unconditional"),
    ("plain", ["--class", "all"], "unconditional"),
])
def test_bad_class_is_one_line_and_writes_nothing(world, tmp_path, capsys, which, argv, words):
    out = tmp_path / "s.png"
    code, _, err = run_main("sample_image", ["--run", world[which], "--out", out, *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err
    assert not out.exists()
