"""Carving a source's splits into train / validation / test (``carve``, validation counts) and the
labelled subsets of semi-supervised runs.

Splits without their own validation part get one carved from train with ``split_seed`` (a numpy
Generator permutation): ``valid_size`` examples, at most 10% of train. ``valid_size=0`` carves nothing:
training uses the whole train split, and validation (the plateau schedule's signal) is a seeded subset
of those training images, min(``VALID_FROM_TRAIN``, 10% of train), chosen as a carve of that size would
be (``valid_from == "train"``). Sources with their own validation split keep it. The carving is redone
on every load (cheap, seed-dependent); the cache holds the source's splits as they are.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from shared.errors import UserError

if TYPE_CHECKING:
    from .data import ImageSplits

# Validation images drawn from train when valid_size is 0 (at most a tenth of train): enough for a
# stable plateau signal, as many as a default carve would hold out.
VALID_FROM_TRAIN = 5000


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


def valid_count(n_train: int, valid_size: int) -> int:
    if n_train < 2:
        return 0
    # A tenth of train at most, so that small sets keep most of their data for training, but at
    # least one example so that there is something to evaluate on.
    return max(1, min(valid_size, n_train // 10))


def carve_splits(parts: dict, *, valid_size: int, split_seed: int, test_fraction: float, where: str,
                 require_train: bool = True) -> dict:
    """The ImageSplits fields (train, valid, test, their labels, valid_from) of a source's ``parts``
    {split: (images, labels | None)}: a test split carved per label when the source has none and
    ``test_fraction`` > 0, a validation split carved from train (or drawn from it: ``valid_size`` 0)
    when it has none. Without training images a UserError, unless not ``require_train`` (an evaluation
    set, e.g. a folder of only test/): train and a missing validation split are then empty
    (``valid_from`` "none")."""
    has_train = "train" in parts and len(parts["train"][0]) > 0
    if not has_train:
        if require_train:
            others = [split for split, (images, _) in parts.items() if len(images)]
            if others:
                raise UserError(f"{where} has {' and '.join(others)} images but no training images; add a train/ "
                                "folder with the training images (the other split folders are optional)")
            raise UserError(f"no training images found in {where}; expected a train split (or images at the top level)")
        return _without_train(parts)
    train, train_labels = parts["train"]
    test, test_labels = parts.get("test", (None, None))
    if test is None and test_fraction > 0:
        n_test = int(round(test_fraction * len(train)))
        kept, carved_idx = carve(len(train), n_test, [split_seed, 1], train_labels)
        test, test_labels = train[carved_idx], _take(train_labels, carved_idx)
        train, train_labels = train[kept], _take(train_labels, kept)
    valid_from = "validation"
    if "validation" in parts:
        valid, valid_labels = parts["validation"]
    elif valid_size == 0:
        # The whole split trains (the usual protocol when only the test split is reported); the
        # plateau schedule still needs a signal, so it watches the same images a carve would take.
        n_valid = valid_count(len(train), VALID_FROM_TRAIN) or len(train)
        _, chosen = carve(len(train), n_valid, split_seed)
        valid, valid_labels, valid_from = train[chosen], _take(train_labels, chosen), "train"
    else:
        n_valid = valid_count(len(train), valid_size)
        kept, carved_idx = carve(len(train), n_valid, split_seed)
        valid, valid_labels, valid_from = train[carved_idx], _take(train_labels, carved_idx), "carved"
        train, train_labels = train[kept], _take(train_labels, kept)
    return dict(train=train, valid=valid, test=test, train_labels=train_labels, valid_labels=valid_labels,
                test_labels=test_labels, valid_from=valid_from)


def _without_train(parts: dict) -> dict:
    images, labels = next(iter(parts.values()))
    empty_images = np.empty((0, *images.shape[1:]), dtype=images.dtype)
    empty_labels = None if labels is None else np.empty(0, dtype=np.int64)
    valid, valid_labels = parts.get("validation", (empty_images, empty_labels))
    test, test_labels = parts.get("test", (None, None))
    return dict(train=empty_images, valid=valid, test=test, train_labels=empty_labels, valid_labels=valid_labels,
                test_labels=test_labels, valid_from="validation" if "validation" in parts else "none")


def _take(labels: np.ndarray | None, index: np.ndarray) -> np.ndarray | None:
    return None if labels is None else labels[index]


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
