"""The image report (docs/reference.md, Report JSON) of a run, as report_image.py writes it, and the
ablation table built from several reports.

Importing this module is torch-free (``compare_image.py`` only reads JSON, report_image.py checks its
flags first); ``image_report`` and ``report_run`` import the evaluation when called.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from shared.config import read_json
from shared.errors import UserError

REPORT = "report-{split}.json"


def report_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / REPORT.format(split=split)


def image_report(model, dataset, *, iw_samples: int, batch_size: int, seed: int, max_examples: int | None,
                 device, iw_chunk: int | None = None) -> dict:
    """Bounds, KL per group and active units of ``model`` on ``dataset`` (likelihoods as positive
    NLL: nats per image and bits/dim; ``*_iw`` from L_K with K = iw_samples, None when 0)."""
    from shared.evaluate import evaluate

    res = evaluate(model, dataset, batch_size=batch_size, seed=seed, iw_samples=iw_samples, iw_chunk=iw_chunk,
                   max_examples=max_examples, active_units=True, device=device, desc="report")
    kl_per_group = res.labelled_kl_per_group(model.group_info)
    active = res.active_units or {"total": 0, "per_group": []}
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_examples": res.num_examples,
        "dims_per_image": res.num_dims / max(res.num_examples, 1),
        "iw_samples": iw_samples,
        "nats_elbo": -res.elbo,
        "nats_iw": None if res.iw is None else -res.iw,
        "bits_per_dim_elbo": res.bits_per_dim_elbo,
        "bits_per_dim_iw": res.bits_per_dim_iw,
        "kl": res.kl,
        "kl_per_group": kl_per_group,
        "active_units": {"total": active["total"], "per_group": active["per_group"]},
        "active_groups": sum(1 for n in active["per_group"] if n > 0),
        "num_groups": len(kl_per_group),
        "noise_seed": seed,
        "subset": res.subset,  # {"size", "of", "seed", "stratified"}, or None: the whole split
    }


def classification_report(model, dataset, *, batch_size: int, seed: int, max_examples: int | None,
                          device) -> dict:
    """Test error of a conditional model's classifier q(y|x) (argmax, dropout off) on ``dataset``
    (its ``labels`` int64 (N,) in 0..C-1), over the same seeded subset as ``image_report``:
    ``classification_error`` and ``confusion_matrix`` (C x C counts, rows = true class)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Subset

    from shared.distributions import HashedNoise
    from shared.evaluate import subset_indices

    C = model.num_classes
    labels = np.asarray(dataset.labels, dtype=np.int64)
    chosen = subset_indices(len(dataset), max_examples, seed, dataset.labels)
    loader = DataLoader(Subset(dataset, chosen.tolist()), batch_size=batch_size, shuffle=False,
                        generator=torch.Generator())  # leaves the global RNG untouched
    was_training = model.training
    model.eval()
    confusion = np.zeros((C, C), dtype=np.int64)
    with torch.no_grad():
        for batch in loader:
            index = batch["index"].to(device)
            # keyed like the bounds' noise, so a dynamically binarised x is the same one they score
            logits = model.classify({"index": index, "x": batch["x"].to(device)}, HashedNoise(seed, index))
            predicted = logits.argmax(dim=1).cpu().numpy()
            np.add.at(confusion, (labels[batch["index"].numpy()], predicted), 1)
    model.train(was_training)
    total = int(confusion.sum())
    return {"classification_error": 1.0 - float(np.trace(confusion)) / max(total, 1),
            "confusion_matrix": confusion.tolist()}


def check_class_labels(labels, num_classes: int, name: str) -> None:
    """A UserError when the split's labels do not fit the model's classes (before any evaluation)."""
    import numpy as np

    if labels is None or len(labels) == 0:
        return
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0 or high >= num_classes:
        raise UserError(f"the {name} has class labels {low}..{high} but the model knows {num_classes} classes "
                        f"(0..{num_classes - 1}); evaluate data with the classes the run was trained on")


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_report(report: dict) -> str:
    """The report as a plain-text table for the terminal."""
    K = report["iw_samples"]
    subset = report.get("subset")
    drawn = "" if not subset else (f" (a draw of {subset['size']} of {subset['of']}, seed {subset['seed']}"
                                   + (", stratified by class)" if subset["stratified"] else ")"))
    lines = [
        f"{report.get('model', '?')} ({report.get('preset', '?')} preset, L={report.get('levels', '?')}), "
        f"{report['num_params'] / 1e6:.2f}M parameters, {report['num_examples']} images of the {report.get('data', '?')}"
        + drawn,
        f"  {'bound':<14}{'nats/image':>12}{'bits/dim':>10}",
        f"  {'ELBO L_1':<14}{_fmt(report['nats_elbo'], '.2f'):>12}{_fmt(report['bits_per_dim_elbo']):>10}",
    ]
    if K:
        lines.append(f"  {'L_' + str(K):<14}{_fmt(report['nats_iw'], '.2f'):>12}{_fmt(report['bits_per_dim_iw']):>10}")
    au = report["active_units"]
    lines.append(f"  KL {report['kl']:.2f} nats/image; active units {au['total']}; active groups "
                 f"{report['active_groups']}/{report['num_groups']}")
    lines.append(f"  {'group':<10}{'KL nats':>10}{'active':>8}")
    for g, n in zip(report["kl_per_group"], au["per_group"] or [None] * len(report["kl_per_group"])):
        name = f"z{g['level']}" + ("" if g["kind"] == "top" else f" {g['kind']}")
        lines.append(f"  {name:<10}{g['kl']:>10.3f}{_fmt(n, 'd'):>8}")
    if "classification_error" in report:
        if report["classification_error"] is None:
            lines.append(f"  classification error: none ({report['classification_note']})")
        else:
            cm = report["confusion_matrix"]
            lines.append(f"  classification error {100 * report['classification_error']:.2f}% (argmax q(y|x), "
                         f"{sum(map(sum, cm))} labelled images, {len(cm)} classes)")
    if report.get("anomaly"):
        lines.append(f"  anomaly vs {report.get('ood', 'the OOD set')} (OOD positive, score = bits/dim):")
        lines.append(f"  {'k':>4}{'K':>6}{'bpd in':>10}{'bpd ood':>10}{'AUROC':>8}")
        for r in report["anomaly"]:
            lines.append(f"  {r['k']:>4}{r['iw_samples']:>6}{r['bpd_in']:>10.4f}{r['bpd_ood']:>10.4f}{r['auroc']:>8.3f}")
    return "\n".join(lines)


def read_report(run_dir: str | Path, split: str) -> dict:
    path = report_path(run_dir, split)
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass run directories of scripts/train_image.py")
    if not path.is_file():
        raise UserError(f"{run_dir} has no {path.name}; run python scripts/report_image.py --run {run_dir} "
                        f"--split {split} first")
    report = read_json(path, "report")
    missing = [k for k in ("num_params", "bits_per_dim_elbo", "kl_per_group", "active_units") if k not in report]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; rerun scripts/report_image.py --run {run_dir}")
    return report


def compare_table(rows: list[tuple[str, dict]]) -> str:
    """The paper's Table 1 layout as Markdown: one row per run."""
    lines = ["| run | model | L | params | bits/dim ELBO | bits/dim IW (K) | active groups | active units |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        iw = "-" if r.get("bits_per_dim_iw") is None else f"{r['bits_per_dim_iw']:.3f} ({r['iw_samples']})"
        groups = r.get("num_groups", len(r["kl_per_group"]))
        active_groups = r.get("active_groups", sum(1 for n in r["active_units"]["per_group"] if n > 0))
        lines.append(f"| {name} | {r.get('model', '?')} | {r.get('levels', '?')} | {r['num_params'] / 1e6:.2f}M | "
                     f"{r['bits_per_dim_elbo']:.3f} | {iw} | {active_groups}/{groups} | {r['active_units']['total']} |")
    return "\n".join(lines)


def report_run(args: argparse.Namespace) -> dict:
    """What report_image.py does with its parsed flags: every input checked before the first (slow)
    evaluation and before anything is written, then the bounds (and the classifier's error, the anomaly
    curve against an OOD set) of ``args.run``, written as RUN/report-<split>.json (and ``args.json``) with
    its plots, and printed as a table. Returns the report."""
    from shared.checkpoints import run_step
    from shared.run_dir import output_dir, resolve_run

    from .runs import check_image_run

    args.run = resolve_run(args.run)
    run = check_image_run(args.run)
    levels = run.model["ladder"]["levels"]
    ood_k = sorted(set(args.ood_k)) if args.ood_k else list(range(levels))
    if ood_k[-1] >= levels:
        raise UserError(f"--ood-k {ood_k[-1]} is out of range for a ladder of {levels} levels; use 0..{levels - 1}")

    from shared.cli import pick_device
    from shared.config import write_json_atomic
    from shared.evaluate import subset_info

    from .anomaly import anomaly_curve
    from .data import ImageDataset
    from .plots import plot_anomaly, plot_confusion, plot_kl_per_group
    from .runs import check_shape, load_image_model, load_ood, load_split, run_data_config

    data = load_split(run_data_config(run, args.data_dir), args.split)
    check_shape(data, run.model["image_shape"], "data")
    ood = None
    if args.ood_dataset is not None or args.ood_data_dir is not None:
        ood = load_ood(run, args.ood_split or args.split, args.ood_dataset, args.ood_data_dir,
                       fallback_all=args.ood_split is None)
        check_shape(ood, run.model["image_shape"], "OOD set")
    num_classes = run.model["ladder"].get("num_classes", 0)
    if num_classes:
        check_class_labels(data.labels, num_classes, data.name)

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
