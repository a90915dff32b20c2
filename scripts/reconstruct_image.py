#!/usr/bin/env python
"""Reconstruct held-out images through a trained image run and save inputs beside reconstructions.

    python scripts/reconstruct_image.py --run runs/cifar10 --num 16 --out recon.png
    python scripts/reconstruct_image.py --run runs/cifar10 --from-level 0 5 10 14 --split test

The first row of the grid holds the inputs, each further row their reconstructions for one
--from-level k: the posterior of the levels > k is kept and levels <= k (both groups of BIVA) are drawn
from the conditional prior, so rows with growing k show what the upper levels alone encode
(k = 0: the ordinary reconstruction). The images come from the data recorded in the run's
config.json ("data"), or from --data-dir (a local copy of the same dataset, or an image folder).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from biva_image.generate import reconstruct_run
from biva_image.names import GRID_SCALE_HELP
from shared.cli import ArgumentParser, auto_or_positive_int, nonneg_int, positive_int
from shared.errors import run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of scripts/train_image.py (its --output-dir), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("--num", type=positive_int, default=16, help="number of images (default 16)")
    p.add_argument("--out", type=Path, help="PNG to write (default: RUN/samples/recon.png; ./NAME/samples/ for a hub or read-only RUN)")
    p.add_argument("--from-level", type=nonneg_int, nargs="+", default=[0], metavar="K",
                   help="one or more k in 0..L-1: keep the posterior of levels > k (default 0)")
    p.add_argument("--split", choices=["train", "valid", "test"], default="valid",
                   help="which split the images come from (default valid)")
    p.add_argument("--data-dir", type=Path, help="read the images here instead of the run's recorded data")
    p.add_argument("--output", choices=["sample", "mean"], default="mean",
                   help="draw x ~ p(x|z), or take its mean (default mean)")
    p.add_argument("--scale", type=auto_or_positive_int, default=None, metavar="N|auto", help=GRID_SCALE_HELP)
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the latent and pixel noise (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto: cuda when available)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.suffix.lower() != ".png":
        p.error(f"--out {args.out} must end in .png")
    if args.data_dir is not None and not args.data_dir.is_dir():
        p.error(f"--data-dir {args.data_dir} is not a directory")
    return args


def main(argv=None) -> Path:
    return reconstruct_run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
