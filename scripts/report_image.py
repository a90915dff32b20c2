#!/usr/bin/env python
"""Evaluate a trained image run: ELBO and importance-weighted bound, KL per group, active units, and
optionally anomaly detection against an out-of-distribution set with L^{>k}.

    python scripts/report_image.py --run runs/cifar10 --split test --iw-samples 1000
    python scripts/report_image.py --run runs/cifar10 --ood-dataset svhn --ood-k 0 3 6 9 11 13
    python scripts/report_image.py --run runs/patches --split valid --ood-data-dir other_images/

Prints a table and writes RUN/report-<split>.json (read by compare_image.py; CONTRACTS.md lists its
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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biva_image.names import IMAGE_DATASETS  # noqa: E402
from shared.cli import ArgumentParser, nonneg_int, positive_int  # noqa: E402
from shared.errors import UserError, run_cli  # noqa: E402


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
    a.add_argument("--ood-data-dir", type=Path, help="out-of-distribution image folder (or local copy of --ood-dataset)")
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


def _load_ood(args, run):
    from biva_image.data import ImageDataConfig
    from biva_image.runs import load_split

    saved = run.data or {}
    cfg = ImageDataConfig(dataset=args.ood_dataset or "folder",
                          data_dir=str(args.ood_data_dir) if args.ood_data_dir else None,
                          split_seed=saved.get("split_seed", 0), cache_dir=saved.get("cache_dir"))
    try:
        return load_split(cfg, args.ood_split or args.split, fallback_all=args.ood_split is None)
    except UserError as err:  # data.py speaks of --data-dir; here the flag is --ood-data-dir
        raise UserError(str(err).replace("--data-dir", "--ood-data-dir")) from None


def main(argv=None) -> dict:
    args = parse_args(argv)
    from biva_image.runs import check_image_run
    from shared.run_dir import output_dir, resolve_run

    args.run = resolve_run(args.run)
    run = check_image_run(args.run)
    levels = run.model["ladder"]["levels"]
    ood_k = sorted(set(args.ood_k)) if args.ood_k else list(range(levels))
    if ood_k[-1] >= levels:
        raise UserError(f"--ood-k {ood_k[-1]} is out of range for a ladder of {levels} levels; use 0..{levels - 1}")

    from biva_image.anomaly import anomaly_curve
    from biva_image.data import ImageDataset
    from biva_image.plots import plot_anomaly, plot_confusion, plot_kl_per_group
    from biva_image.report import check_class_labels, classification_report, format_report, image_report, report_path
    from biva_image.runs import check_shape, load_image_model, load_split, run_data_config
    from shared.config import write_json_atomic
    from shared.evaluate import subset_info
    from shared.run_dir import run_step

    # Every input is checked before the first (slow) evaluation and before anything is written.
    data = load_split(run_data_config(run, args.data_dir), args.split)
    check_shape(data, run.model["image_shape"], "data")
    ood = None
    if args.ood_dataset is not None or args.ood_data_dir is not None:
        ood = _load_ood(args, run)
        check_shape(ood, run.model["image_shape"], "OOD set")
    num_classes = run.model["ladder"].get("num_classes", 0)
    if num_classes:
        check_class_labels(data.labels, num_classes, data.name)
    from shared.cli import pick_device

    device = pick_device(args.device)
    model = load_image_model(args.run, run, device)
    if args.compile:
        import torch

        model = torch.compile(model)  # attributes and other methods reach the model itself, uncompiled
    t_eval = time.perf_counter()

    in_set = ImageDataset(data.images, data.labels)
    kw = dict(batch_size=args.batch_size, seed=args.seed, max_examples=args.max_examples, device=device,
              iw_chunk=args.iw_chunk)
    report = {"run": str(args.run), "split": args.split, "data": data.name, "preset": run.preset,
              "model": model.cfg.ladder.variant, "levels": model.cfg.ladder.levels,
              "likelihood": model.cfg.likelihood, "seed": args.seed}
    report["step"] = run_step(args.run)
    report["weights"] = "ema"  # model.safetensors: the EMA weights of the checkpoint at "step"
    report["compiled"] = args.compile
    report.update(image_report(model, in_set, iw_samples=args.iw_samples, **kw))
    if num_classes and data.labels is not None:
        report.update(classification_report(model, in_set, batch_size=args.batch_size, seed=args.seed,
                                            max_examples=args.max_examples, device=device))
    elif num_classes:
        report.update(classification_error=None, confusion_matrix=None,
                      classification_note=f"the {data.name} has no labels (an image folder needs class subfolders)")
    if ood is not None:
        report["ood"] = ood.name
        ood_set = ImageDataset(ood.images, ood.labels)
        report["ood_subset"] = subset_info(len(ood_set), args.max_examples, args.seed, ood_set.labels)
        report["anomaly"] = anomaly_curve(model, in_set, ood_set, ood_k, iw_samples=args.ood_iw_samples, **kw)
    if args.compile:
        print(f"--compile: the evaluation took {time.perf_counter() - t_eval:.1f} s, compilation included",
              file=sys.stderr)

    out = output_dir(args.run)  # the run itself, or ./NAME for a hub or read-only one
    path = report_path(out, args.split)
    write_json_atomic(path, report)
    written = [path]
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, report)
        written.append(args.json)
    title = f"{report['model']} L={report['levels']}, {args.split}"
    written.append(plot_kl_per_group(report["kl_per_group"], out / f"report-{args.split}-kl.png", title))
    if report.get("confusion_matrix") is not None:
        written.append(plot_confusion(report["confusion_matrix"], out / f"report-{args.split}-confusion.png",
                                      f"{title}: error {100 * report['classification_error']:.2f}%"))
    if ood is not None:
        written.append(plot_anomaly(report["anomaly"], out / f"report-{args.split}-anomaly.png",
                                    f"{data.name} vs {ood.name}"))
    print(format_report(report))
    print("wrote " + ", ".join(map(str, written)))
    return report


if __name__ == "__main__":
    run_cli(main)
