#!/usr/bin/env python
"""Evaluate a trained image run: ELBO and importance-weighted bound, KL per group, active units, and
optionally anomaly detection against an out-of-distribution set with L^{>k}.

    python scripts/report_image.py --run runs/cifar10 --split test --iw-samples 1000
    python scripts/report_image.py --run runs/cifar10 --ood-dataset svhn --ood-k 0 3 6 9 11 13
    python scripts/report_image.py --run runs/patches --split valid --ood-data-dir other_images/

Prints a table and writes RUN/report-<split>.json (read by compare_image.py; docs/reference.md lists its
keys), the --json copy if asked, RUN/report-<split>-kl.png (KL per latent group), with an OOD set
RUN/report-<split>-anomaly.png (bits/dim of both sets and AUROC against k) and, for a semi-supervised
run (train_image.py --labels-per-class), RUN/report-<split>-confusion.png: the report then holds
classification_error (argmax of q(y|x), EMA weights) and confusion_matrix (C x C counts, rows = true
class) of the split (null, with the reason, when the split has no labels); for a hub id or a read-only
RUN these go to ./NAME instead. Likelihoods are positive
NLL: nats per image and bits/dim, lower is better. The evaluation noise is seeded per image
(--seed), so the numbers do not depend on --batch-size.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from biva_image.names import IMAGE_DATASETS
from biva_image.report import report_run
from shared.cli import ArgumentParser, nonneg_int, positive_int
from shared.errors import run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of scripts/train_image.py (its --output-dir), a folder of scripts/export.py, or a hub id owner/name")
    d = p.add_argument_group("data")
    d.add_argument("--split", choices=["train", "valid", "test"], default="test", help="split to evaluate (default test)")
    d.add_argument("--data-dir", type=Path, help="read the images here instead of the run's recorded data")
    d.add_argument("--max-examples", type=positive_int,
                   help="evaluate N images of each set, a random draw seeded by --seed and stratified by class "
                        "where the data have labels (default all)")
    b = p.add_argument_group("bounds")
    b.add_argument("--iw-samples", type=nonneg_int, default=1000,
                   help="K of the importance-weighted bound L_K (default 1000; 0 skips it)")
    b.add_argument("--iw-chunk", type=positive_int,
                   help="importance samples per forward pass; memory grows with it, not with K (default: as many "
                        "as fit in half the free GPU memory; on a CPU about 512 images per pass)")
    b.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per forward pass (x --iw-chunk for L_K) (default 32)")
    b.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the evaluation noise and of the --max-examples draw (default 0)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto: cuda when available)")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile (inductor) the model's forward pass for the bounds: each pass of an L_K chunk "
                        "then runs as fused kernels, which pays on a GPU; every new batch shape compiles first "
                        "(the evaluation time printed includes it). Figures equal eager ones up to fp32 "
                        "reordering. On a CPU it compiles for minutes and is slower (default off)")
    a = p.add_argument_group("anomaly detection (paper Table 6)")
    a.add_argument("--ood-dataset", choices=IMAGE_DATASETS,
                   help="out-of-distribution hub dataset, e.g. svhn against a cifar10 run")
    a.add_argument("--ood-data-dir", type=Path, help="out-of-distribution image folder, e.g. one holding only test/ "
                   "(or a local copy of --ood-dataset); read into the arrays the run's own data become")
    a.add_argument("--ood-split", choices=["train", "valid", "test"],
                   help="split of the OOD set (default: --split; all its images when it has no such split)")
    a.add_argument("--ood-k", type=nonneg_int, nargs="+", metavar="K",
                   help="values of k for L^{>k}, each in 0..L-1 (default all)")
    a.add_argument("--ood-iw-samples", type=positive_int, default=1,
                   help="importance samples of L^{>k}_K (default 1, as in most of the paper's table)")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, help="also write the report JSON here")
    args = p.parse_args(argv)
    for flag in ("data_dir", "ood_data_dir"):
        path = getattr(args, flag)
        if path is not None and not path.is_dir():
            p.error(f"--{flag.replace('_', '-')} {path} is not a directory")
    if args.ood_dataset == "folder" and args.ood_data_dir is None:
        p.error("--ood-dataset folder needs --ood-data-dir")
    has_ood = args.ood_dataset is not None or args.ood_data_dir is not None
    if not has_ood and (args.ood_k is not None or args.ood_split is not None):
        p.error("--ood-k and --ood-split need an OOD set: give --ood-dataset or --ood-data-dir")
    if args.json is not None and args.json.exists() and args.json.is_dir():
        p.error(f"--json {args.json} is a directory; give a file name")
    return args


def main(argv=None) -> dict:
    return report_run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
