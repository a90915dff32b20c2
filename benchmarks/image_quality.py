#!/usr/bin/env python
"""Does the image model learn real images? A few CPU minutes of training on real photo patches,
scored on the test patches against an independent per-pixel histogram model.

    python benchmarks/image_quality.py                      # run times and results: docs/benchmarks.md
    python benchmarks/image_quality.py --max-steps 300      # a quick look

Data: 16x16 greyscale patches from benchmarks/real_images.py (CC0 / public-domain photographs;
train and test patches come from DIFFERENT photographs). Model: the ``tiny`` preset trained with
scripts/train_image.py, evaluated with scripts/report_image.py on the test split (bits/dim of the
ELBO and of L_K). Baseline: for each of the 256 pixel positions, a categorical over the 256 grey
levels with add-one smoothing, fit on the same training patches and scored on the same test patches.
The model should end clearly below the baseline. Prints both and writes OUT/image_quality.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def histogram_bits_per_dim(train: np.ndarray, test: np.ndarray, levels: int = 256) -> float:
    """Test bits/dim of independent per-position categoricals with add-one smoothing, fit on train.

    ``train``, ``test``: uint8 (N, C, H, W)."""
    flat_train = train.reshape(len(train), -1).astype(np.int64)
    flat_test = test.reshape(len(test), -1).astype(np.int64)
    positions = flat_train.shape[1]
    counts = np.zeros((positions, levels))
    np.add.at(counts, (np.broadcast_to(np.arange(positions), flat_train.shape), flat_train), 1.0)
    log2_p = np.log2((counts + 1.0) / (len(flat_train) + levels))
    return float(-log2_p[np.arange(positions)[None, :], flat_test].mean())


def _load_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    images = [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]
    stacked = np.stack(images)
    return stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench-out" / "image-quality",
                   help="patches, run directory and JSON go here (default bench-out/image-quality)")
    p.add_argument("--n-train", type=int, default=4000, help="training patches (default 4000)")
    p.add_argument("--n-test", type=int, default=1000, help="test patches, from other photographs (default 1000)")
    p.add_argument("--max-steps", type=int, default=2500, help="optimiser steps (default 2500)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--iw-samples", type=int, default=20, help="K of the test L_K (default 20)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch draw and of training (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    import real_images
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out_dir
    patches = out / f"patches-16x16x1-{args.n_train}-{args.n_test}-seed{args.seed}"
    if not (patches / "test").is_dir():
        real_images.write_image_folder(patches, size=16, channels=1, n_train=args.n_train, n_test=args.n_test,
                                       seed=args.seed)
    run = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"

    t0 = time.time()
    _script("train_image").main([
        "--data-dir", str(patches), "--preset", "tiny", "--output-dir", str(run), "--max-steps", str(args.max_steps),
        "--batch-size", str(args.batch_size), "--eval-every", str(max(args.max_steps // 5, 1)),
        "--save-every", str(args.max_steps), "--seed", str(args.seed), "--cache-dir", str(out / "cache")])
    train_s = time.time() - t0
    t0 = time.time()
    report = _script("report_image").main(["--run", str(run), "--split", "test", "--iw-samples", str(args.iw_samples),
                                           "--device", "cpu"])
    report_s = time.time() - t0

    # The baseline is fit on all of train/; the model trained on train/ less the validation images
    # carved from it (10%), so the baseline has at least the model's data.
    train_images, test_images = _load_folder(patches / "train"), _load_folder(patches / "test")
    hist = histogram_bits_per_dim(train_images, test_images)
    result = {
        "benchmark": "image_quality", "data": "real 16x16 grey photo patches (benchmarks/real_images.py)",
        "n_train": args.n_train, "n_test": args.n_test, "preset": "tiny", "max_steps": args.max_steps,
        "batch_size": args.batch_size, "num_params": report["num_params"],
        "test_bits_per_dim_elbo": report["bits_per_dim_elbo"], "test_bits_per_dim_iw": report["bits_per_dim_iw"],
        "iw_samples": report["iw_samples"], "histogram_test_bits_per_dim": hist,
        "active_units": report["active_units"]["total"], "kl_nats": report["kl"],
        "train_s": round(train_s, 1), "report_s": round(report_s, 1), "wall_s": round(time.time() - t_start, 1),
        "torch_threads": torch.get_num_threads(), "run": str(run),
    }
    (out / "image_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    margin = hist - report["bits_per_dim_elbo"]
    print(f"test bits/dim: BIVA tiny ELBO {report['bits_per_dim_elbo']:.3f}, L_{args.iw_samples} "
          f"{report['bits_per_dim_iw']:.3f}; per-pixel histogram {hist:.3f} "
          f"({'model better' if margin > 0 else 'MODEL NOT BETTER'} by {abs(margin):.3f} bits/dim); "
          f"wall {result['wall_s']:.0f} s; {out / 'image_quality.json'}")
    return result


if __name__ == "__main__":
    main()
