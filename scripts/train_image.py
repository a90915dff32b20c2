#!/usr/bin/env python
"""Train BIVA (or LVAE / LVAE+) on images.

    python scripts/train_image.py --dataset cifar10
    accelerate launch scripts/train_image.py --dataset cifar10 --model lvae+
    python scripts/train_image.py --data-dir my_images/ --preset tiny --max-steps 500

The defaults reproduce the paper's setup for the chosen dataset (Appendix C).

Splits (which trains / validates / is reported; our choices, following the usual protocols):
  cifar10, mnist, omniglot  train on the whole training split (50,000 / 60,000 / 24,345), validate
                            on a seeded subset of it (5,000, at most 10%; the free-bits schedule's
                            signal), report the test split (10,000 / 10,000 / 8,070): --valid-size 0
  binarized-mnist           Larochelle's own 50,000 train / 10,000 valid / 10,000 test
  celeba64                  the official train / valid / test partition
  svhn, folder              --valid-size images (default 5,000, at most 10%) carved out of train
                            (a folder's own validation/ subfolder is used as it is)
  omniglot: --data-dir with Burda et al.'s chardata.mat is the standard split; without --data-dir
  a hub copy (GATE-engine/omniglot) is used, with a carved test split that is not the standard one.

Semi-supervised (the seed's Table 3 and Appendix B): --labels-per-class N keeps the labels of N
training images per class (a class-balanced draw from --split-seed, saved in RUN/labelled_indices.json)
and trains the rest of the training split without labels; the model gets the classifier q(y|x) and a
class-conditioned ladder, with as many classes as the data have. Each step draws a labelled and an
unlabelled batch. The paper's run is --dataset mnist --labels-per-class 10 (100 labels; the binary
preset's architecture, the paper's); the classifier weight follows Kingma et al. (2014) and Maaloe
et al. (2016) (--classifier-weight); the labelled batch size and the binary preset's schedule for
this run are our choices. --preset tiny works with labels too.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from biva_image.names import IMAGE_DATASETS, IMAGE_MODELS, IMAGE_PRESETS, LIKELIHOODS
from biva_image.train import train_image
from shared.cli import ArgumentParser, add_training_flags, nonneg_float, nonneg_int, positive_int
from shared.errors import run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data and model")
    d.add_argument("--dataset", choices=IMAGE_DATASETS,
                   help="hub dataset, or 'folder' for --data-dir (default: cifar10, or folder with --data-dir)")
    d.add_argument("--data-dir", type=Path, help="local image folder or local copy of a hub dataset; for omniglot "
                   "the folder holding Burda et al.'s chardata.mat (the standard split)")
    d.add_argument("--cache-dir", type=Path, help="where converted uint8 arrays are cached (default ~/.cache/biva/images)")
    d.add_argument("--valid-size", type=nonneg_int,
                   help="validation images carved from train, at most 10%% (default 0 for cifar10, mnist, "
                        "omniglot, else 5000); 0: train on all of train, validate on a seeded subset of it "
                        "(5000, at most 10%%); sources with their own validation split ignore it")
    d.add_argument("--model", choices=IMAGE_MODELS, help="biva, or the ablations lvae+ / lvae (default biva)")
    d.add_argument("--likelihood", choices=LIKELIHOODS, help="default: the preset's (bernoulli for binary images)")
    d.add_argument("--levels", type=positive_int, help="ladder depth L (default: the preset's; e.g. 29 for LVAE+ L=29)")
    s = p.add_argument_group("semi-supervised (docs/design.md §9b)")
    s.add_argument("--labels-per-class", type=positive_int,
                   help="train semi-supervised with the labels of this many training images per class (a seeded, "
                        "class-balanced draw from --split-seed); the other training images train unlabelled "
                        "(default: none, an unsupervised run)")
    s.add_argument("--classifier-weight", type=nonneg_float,
                   help="beta of the classifier's weight alpha = beta * (N_l + N_u) / N_l, with N_l labelled and "
                        "N_u unlabelled training images: the labelled loss is the mean over its batch of "
                        "-ELBO(x, y) + alpha * (-log q(y|x)) (Kingma et al. 2014, Maaloe et al. 2016; default 0.1)")
    s.add_argument("--labelled-batch-size", type=positive_int,
                   help="labelled images per optimiser step, over processes x --grad-accum like --batch-size (the "
                        "unlabelled batch); default min(--batch-size, labelled images)")
    add_training_flags(p, list(IMAGE_PRESETS), modality="image")
    args = p.parse_args(argv)
    if args.data_dir is not None and not args.data_dir.is_dir():
        hint = ""
        if args.data_dir.is_file():
            hint = f"; pass the folder that holds it, {args.data_dir.resolve().parent}"
        p.error(f"--data-dir {args.data_dir} is not a directory{hint}")
    if args.dataset is None:
        args.dataset = "folder" if args.data_dir is not None else "cifar10"
    if args.dataset == "folder" and args.data_dir is None:
        p.error("--dataset folder needs --data-dir")
    for flag in ("classifier_weight", "labelled_batch_size"):
        if getattr(args, flag) is not None and args.labels_per_class is None and not args.resume:
            p.error(f"--{flag.replace('_', '-')} needs --labels-per-class (a semi-supervised run)")
    return args


def main(argv=None) -> dict:
    return train_image(parse_args(argv), argv, script=__file__)


if __name__ == "__main__":
    run_cli(main)
