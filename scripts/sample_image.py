#!/usr/bin/env python
"""Draw images from a trained image run's prior and save them as one PNG grid.

    python scripts/sample_image.py --run runs/cifar10 --num 64 --out samples.png
    python scripts/sample_image.py --run runs/cifar10 --latent-temperature 0.8 --output mean
    python scripts/sample_image.py --run runs/mnist-100-labels --class 3 --num 16
    python scripts/sample_image.py --run runs/mnist-100-labels --class all --num 10

z ~ p(z) with every prior standard deviation scaled by --latent-temperature, then x ~ p(x|z)
(--output sample) or the mean of p(x|z) (--output mean; for the logistic mixture, the mean of its
most likely component). The EMA weights of model.safetensors are used.

A semi-supervised run (train_image.py --labels-per-class) draws from p(z|y) p(x|z,y): --class c
fixes y = c; --class all draws one row per class, --num images each, and column j uses the same noise
in every row (and the same as image j of --class c), so a column shows one "style" under each class.
Without --class, y is drawn uniformly.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from biva_image.generate import sample_run
from biva_image.names import GRID_SCALE_HELP
from shared.cli import ArgumentParser, auto_or_positive_int, nonneg_int, positive_float, positive_int, word_or
from shared.errors import run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of scripts/train_image.py (its --output-dir), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("--num", type=positive_int,
                   help="number of images (default 64); with --class all, images per class (default 10)")
    p.add_argument("--class", dest="class_", type=word_or("all", nonneg_int, "a class number >= 0", value="all"), metavar="C|all",
                   help="semi-supervised runs only: draw every image of class C (0..classes-1), or with 'all' "
                        "one row per class (default: classes drawn uniformly)")
    p.add_argument("--out", type=Path, help="PNG to write (default: RUN/samples/samples.png; ./NAME/samples/ for a hub or read-only RUN)")
    p.add_argument("--latent-temperature", type=positive_float, default=1.0,
                   help="scale of every prior standard deviation (default 1.0; below 1 gives smoother images)")
    p.add_argument("--output", choices=["sample", "mean"], default="sample",
                   help="draw x ~ p(x|z), or take its mean (default sample)")
    p.add_argument("--ncol", type=positive_int,
                   help="images per row of the grid (default: a square grid; with --class all, --num)")
    p.add_argument("--scale", type=auto_or_positive_int, default=None, metavar="N|auto", help=GRID_SCALE_HELP)
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the latent and pixel noise (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images drawn per forward pass (default 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto: cuda when available)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.suffix.lower() != ".png":
        p.error(f"--out {args.out} must end in .png")
    if args.class_ == "all" and args.ncol is not None:
        p.error("--ncol does not go with --class all: the grid has one row per class, --num images per row")
    if args.num is None:
        args.num = 10 if args.class_ == "all" else 64
    return args


def main(argv=None) -> Path:
    return sample_run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
