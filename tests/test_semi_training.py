"""Semi-supervised training: the labelled subset is class-balanced and seeded, no label
reaches the unlabelled stream, data without labels (or with too few) fail in one line, and the two
streams resume exactly and split over processes like the single stream."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from script_utils import TORCHRUN, image_folder, load_script, metrics, run_main, script_env, without_timing
from test_faults import assert_close, assert_same_tensors
from test_multiprocess import assert_ranks_agree, torchrun

from biva_image.data import (ImageDataConfig, ImageDataset, ImageSplits, labelled_subset, load_image_splits,
                             semi_supervised_sets)
from shared.batching import BatchPlan
from shared.errors import UserError, run_cli

CLASSES = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 training images in 3 class subfolders (108 train / 12 carved validation) and 20 test images."""
    root = tmp_path_factory.mktemp("semi")
    return image_folder(root / "data", n_train=120, n_test=20, classes=CLASSES), root / "cache"


def flags(data, out, *extra):
    folder, cache = data
    return ["--data-dir", folder, "--cache-dir", cache, "--preset", "tiny", "--output-dir", out, "--report-to", "none",
            "--labels-per-class", 4, "--batch-size", 8, "--labelled-batch-size", 4, "--eval-every", 3,
            "--save-every", 4, "--log-every", 2, *extra]


def _splits(counts=(30, 7, 12, 50)) -> ImageSplits:
    labels = np.repeat(np.arange(len(counts)), counts)  # sorted by class, as folders often are
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None].repeat(2, axis=2).repeat(2, axis=3)
    return ImageSplits(train=images, valid=images[:3], test=None, train_labels=labels, valid_labels=labels[:3])


def test_labelled_subset_is_class_balanced_seeded_and_keeps_labels_out_of_the_unlabelled_stream():
    splits = _splits()
    chosen = labelled_subset(splits, 5, seed=0)
    assert np.bincount(splits.train_labels[chosen]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(chosen, labelled_subset(splits, 5, seed=0))
    assert not np.array_equal(chosen, labelled_subset(splits, 5, seed=1))
    assert len(set(chosen.tolist())) == 20 and not np.array_equal(chosen[:5], np.arange(5))  # not the first ones

    labelled, unlabelled = semi_supervised_sets(splits, chosen)
    assert unlabelled.labels is None and all("y" not in unlabelled[i] for i in range(len(unlabelled)))
    assert [int(labelled[i]["y"]) for i in range(len(labelled))] == splits.train_labels[chosen].tolist()
    # Every training image is in exactly one stream (the pixel value is the image's index here).
    seen = sorted(int(labelled[i]["x"][0, 0, 0]) for i in range(len(labelled))) + \
        [int(unlabelled[i]["x"][0, 0, 0]) for i in range(len(unlabelled))]
    assert sorted(seen) == list(range(len(splits.train)))
    assert set(seen[:20]) == set(chosen.tolist())


def test_labelled_subset_refuses_missing_labels_and_small_classes():
    splits = _splits()
    with pytest.raises(UserError, match=r"^--labels-per-class 8 .* class 1 has 7;"):
        labelled_subset(splits, 8, seed=0)
    splits.train_labels = None
    with pytest.raises(UserError, match=r"^--labels-per-class needs labels"):
        labelled_subset(splits, 1, seed=0)


def test_two_process_streams_cover_the_single_process_batches():
    """Each step's global batch, labelled (cycling over epochs) and unlabelled, split over 2 processes x 2
    accumulation steps, is the single-process batch."""
    for n, batch in ((12, 4), (96, 8)):
        for stream in (0, 1):
            single = BatchPlan(n, batch, 1, 0, 1, seed=3, stream=stream)
            ranks = [BatchPlan(n, batch, 2, r, 2, seed=3, stream=stream) for r in range(2)]
            for epoch in range(4):
                whole = list(single.micro_batches(epoch, 0))
                parts = [list(p.micro_batches(epoch, 0)) for p in ranks]
                for b, global_batch in enumerate(whole):
                    split = [i for r in range(2) for j in range(2) for i in parts[r][2 * b + j]]
                    assert split == global_batch
    # The labelled stream is not the unlabelled stream's order.
    assert not torch.equal(BatchPlan(96, 8, 1, 0, 1, 3).permutation(0), BatchPlan(96, 8, 1, 0, 1, 3, 1).permutation(0))


def test_without_labels_with_too_few_or_too_big_a_labelled_batch_it_fails_in_one_line(tmp_path, data, capsys):
    plain = image_folder(tmp_path / "plain", n_train=30, n_test=4)  # no class subfolders
    out = tmp_path / "run"
    code, _, err = run_main("train_image", [*flags((plain, data[1]), out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --labels-per-class needs labels: ") and not out.exists()
    code, _, err = run_main("train_image", [*flags(data, out), "--labels-per-class", 40], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"class \d has 3\d\b", err) and "--labels-per-class 40" in err and not out.exists()
    code, _, err = run_main("train_image", [*flags(data, out), "--labelled-batch-size", 13], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--labelled-batch-size 13 is larger than the 12 labelled" in err and not out.exists()


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 14-step semi-supervised run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    captured = {}
    import shared.engine

    class Recording(shared.engine.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured["trainer"] = self

    mp = pytest.MonkeyPatch()
    mp.setattr(shared.engine, "Trainer", Recording)
    try:  # in process, as run_main does (a module-scoped fixture has no capsys)
        run_cli(lambda: load_script("train_image").main([str(a) for a in flags(data, out, "--max-steps", 14)]))
    finally:
        mp.undo()
    return out, captured["trainer"]


def test_a_short_run_writes_the_labelled_indices_and_classifier_metrics(data, reference):
    out, trainer = reference
    run = json.loads((out / "config.json").read_text())
    assert run["data"]["labels_per_class"] == 4 and run["model"]["ladder"]["num_classes"] == CLASSES
    saved = json.loads((out / "labelled_indices.json").read_text())
    assert saved["labels_per_class"] == 4 and saved["seed"] == 0
    splits = load_image_splits(ImageDataConfig(dataset="folder", data_dir=str(data[0]), cache_dir=str(data[1])))
    indices = np.asarray(saved["indices"])
    assert np.array_equal(indices, labelled_subset(splits, 4, 0))
    assert np.bincount(splits.train_labels[indices]).tolist() == [4] * CLASSES
    # The engine's labelled stream holds exactly those images and labels; the unlabelled one the others, unlabelled.
    assert torch.equal(trainer.labelled_set.images, torch.from_numpy(splits.train[indices]))
    assert trainer.labelled_set.labels.tolist() == splits.train_labels[indices].tolist()
    rest = np.setdiff1d(np.arange(len(splits.train)), indices)
    assert torch.equal(trainer.train_set.images, torch.from_numpy(splits.train[rest]))
    assert trainer.train_set.labels is None
    batches = trainer._loader()
    for _ in range(4):
        for unlabelled, labelled in next(batches):
            assert "y" not in unlabelled and len(unlabelled["x"]) == 8
            assert labelled["y"].tolist() == trainer.labelled_set.labels[labelled["index"]].tolist()

    records = metrics(out)
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    assert train and all(r["cross_entropy"] > 0 and 0 <= r["accuracy"] <= 1 for r in train)
    assert valid and all(0 <= r["classification_error"] <= 1 for r in valid)
    assert train[0]["cross_entropy"] == pytest.approx(np.log(CLASSES), rel=0.2)  # an untrained classifier


def test_another_split_seed_draws_another_labelled_subset(tmp_path, data, reference, capsys):
    out = tmp_path / "run"
    code, _, err = run_main("train_image", flags(data, out, "--max-steps", 1, "--split-seed", 1), capsys)
    assert code == 0, err[-3000:]
    saved = json.loads((out / "labelled_indices.json").read_text())
    splits = load_image_splits(ImageDataConfig(dataset="folder", data_dir=str(data[0]), cache_dir=str(data[1]),
                                               split_seed=1))
    assert saved["seed"] == 1 and saved["indices"] == labelled_subset(splits, 4, 1).tolist()
    assert saved["indices"] != json.loads((reference[0] / "labelled_indices.json").read_text())["indices"]
    assert json.loads((out / "config.json").read_text())["train"]["split_seed"] == 1


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, data, reference, capsys):
    ref, _ = reference
    out = tmp_path / "run"
    code, _, err = run_main("train_image", flags(data, out, "--max-steps", 7), capsys)
    assert code == 0, err[-3000:]
    state = json.loads((out / "checkpoints" / "step_7" / "trainer_state.json").read_text())["train"]
    # 12 labelled images in batches of 4: 7 steps are 2 labelled epochs and one batch into the third
    assert (state["labelled_epoch"], state["labelled_batch_in_epoch"]) == (2, 1)
    code, _, err = run_main("train_image", flags(data, out, "--max-steps", 14, "--resume"), capsys)
    assert code == 0 and "resuming from" in err, err[-3000:]

    assert_close(without_timing(metrics(out)), without_timing(metrics(ref)))
    assert_same_tensors(out / "model.safetensors", ref / "model.safetensors")
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(out / "checkpoints" / "step_14" / name, ref / "checkpoints" / "step_14" / name)
    state, ref_state = (json.loads((d / "checkpoints" / "step_14" / "trainer_state.json").read_text())
                        for d in (out, ref))
    assert state["train"] == ref_state["train"] and ref_state["train"]["labelled_epoch"] == 4
    assert (out / "labelled_indices.json").read_bytes() == (ref / "labelled_indices.json").read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed next to python")
def test_two_processes_agree_with_each_other_and_with_one(tmp_path, data, reference):
    """Weights cannot equal a one-process run's (each process draws its own training noise, docs/design.md §9);
    what must: the ranks among themselves, both streams' positions, the labelled subset, and the
    validation figures, classification error included, on the same weights."""
    ref, _ = reference
    out = tmp_path / "run"
    p = torchrun("train_image.py", *flags(data, out, "--max-steps", 14), env=script_env(BIVA_DUMP_DIR=tmp_path / "dump"))
    assert p.returncode == 0, p.stderr[-3000:]
    state = assert_ranks_agree(tmp_path / "dump")
    ref_state = json.loads((ref / "checkpoints" / "step_14" / "trainer_state.json").read_text())
    assert state["train"] == ref_state["train"]  # step, epochs and positions of both streams
    assert (out / "labelled_indices.json").read_bytes() == (ref / "labelled_indices.json").read_bytes()

    from biva_image.runs import load_image_model
    from shared.distributions import HashedNoise
    from shared.evaluate import evaluate
    from shared.run_dir import read_run_config

    run = read_run_config(out, "image")
    model = load_image_model(out, run)  # the EMA weights of step 14
    splits = load_image_splits(ImageDataConfig(dataset="folder", data_dir=str(data[0]), cache_dir=str(data[1])))
    valid = ImageDataset(splits.valid, splits.valid_labels)
    batch = torch.utils.data.default_collate([valid[i] for i in range(len(valid))])
    with torch.no_grad():
        logits = model.classify(batch, HashedNoise(run.train.eval_seed, batch["index"]))
    error = int((logits.argmax(-1) != valid.labels).sum()) / len(valid)
    last = [r for r in metrics(out) if r.get("split") == "valid"][-1]
    assert last["step"] == 14 and last["num_examples"] == len(valid) == 12
    assert last["classification_error"] == pytest.approx(error, abs=1e-12)
    single = evaluate(model, valid, batch_size=5, seed=run.train.eval_seed, progress=False)  # y summed out
    assert single.elbo == pytest.approx(last["elbo"], abs=1e-4)


def test_the_papers_mnist_run_is_the_binary_preset_with_ten_classes():
    """--dataset mnist --labels-per-class 10 (Table 3): the binary preset's architecture and schedule, plus
    the classifier and class conditioning of 10 classes; nothing else changes but compiling (off: the
    semi-supervised step runs the uncompiled model)."""
    from biva_image.model import ImageVAE
    from biva_image.names import DATASET_PRESET
    from biva_image.presets import get_preset, with_labels
    from shared.config import to_dict

    assert DATASET_PRESET["mnist"] == "binary"
    plain, semi = get_preset("binary"), with_labels(get_preset("binary"), 10)
    changed = to_dict(semi.model)
    assert changed["ladder"].pop("num_classes") == 10 and plain.model.ladder.num_classes == 0
    plain_dict = to_dict(plain.model)
    plain_dict["ladder"].pop("num_classes")
    assert changed == plain_dict and semi.train == dataclasses.replace(plain.train, compile=False)
    model = ImageVAE(semi.model).eval()
    batch = {"index": torch.arange(2), "x": torch.zeros(2, 1, 28, 28, dtype=torch.uint8)}
    from shared.distributions import HashedNoise

    assert model.classify(batch, HashedNoise(0, batch["index"])).shape == (2, 10)
