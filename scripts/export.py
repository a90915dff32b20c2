#!/usr/bin/env python
"""Export a trained run as a self-contained model folder, optionally pushed to the Hugging Face Hub.

    python scripts/export.py --run runs/cifar10 --to exported/biva-cifar10
    python scripts/export.py --run runs/cifar10 --to exported/biva-cifar10 --push-to-hub user/biva-cifar10

The folder holds model.safetensors (the EMA weights), config.json (plus the training step of the
weights), tokenizer.model for text runs, the run's report-<split>.json files and a model card
README.md with their numbers. No checkpoints, no metrics. Every script that takes --run takes the
folder, or its hub repository id once pushed. An existing non-empty --to is refused unless
--overwrite; the folder is written under a temporary name and renamed, so a failed export leaves
nothing behind. --push-to-hub needs a token (`hf auth login` or HF_TOKEN) and the hub online.
"""
from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from shared.cli import ArgumentParser
from shared.errors import UserError, run_cli

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TOKENIZER = "tokenizer.model"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True,
                   help="run directory of a training script (its --output-dir), an exported folder or a hub id")
    p.add_argument("--to", type=Path, required=True, help="the model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --to (default: refuse)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub model repository (owner/name)")
    p.add_argument("--private", action="store_true", help="create the hub repository as private (with --push-to-hub)")
    args = p.parse_args(argv)
    if args.push_to_hub is not None and not REPO_ID_RE.match(args.push_to_hub):
        p.error(f"--push-to-hub {args.push_to_hub} is not a repository id; give owner/name")
    if args.private and args.push_to_hub is None:
        p.error("--private needs --push-to-hub")
    return args


def _load(run_dir: Path, run):
    """(model, facts about its data) of an image or text run; loading checks that the weights fit the config."""
    if run.modality == "image":
        from biva_image.runs import check_image_run, load_image_model

        check_image_run(run_dir)
        model = load_image_model(run_dir, run)
        cfg = model.cfg
        kind = f"{cfg.ladder.variant} L={cfg.ladder.levels}, {cfg.likelihood} likelihood"
        return model, kind, _image_datasets(run.data or {})
    from biva_text.report import load_text_run

    if not (run_dir / TOKENIZER).is_file():
        raise UserError(f"{run_dir} has no {TOKENIZER}; export a text run directory written by train_text.py")
    _, model, _ = load_text_run(run_dir)
    return model, model.cfg.model, _text_datasets(run.data or {})


def _image_datasets(data: dict) -> tuple[str, list[str]]:
    from biva_image.sources import RECIPES  # the hub id each named dataset is read from

    name = data.get("dataset")
    if name == "folder" or name not in RECIPES:
        return f"image folder {data.get('data_dir')}", []
    recipe = RECIPES[name]
    where = f" (local copy {data['data_dir']})" if data.get("data_dir") else ""
    return f"{name}{where}", [recipe.hub_id] if recipe.hub_id else []


def _text_datasets(data: dict) -> tuple[str, list[str]]:
    from biva_text.data import HUB_ALIASES
    from biva_text.names import BUNDLED_DATASETS

    if data.get("train_files"):
        return "local text files " + ", ".join(Path(f).name for f in data["train_files"]), []
    if data.get("dataset") in BUNDLED_DATASETS:  # shipped with the package: no hub dataset to link
        return f"{data['dataset']} (the corpus bundled with the package, biva_text/corpora)", []
    hub_id = HUB_ALIASES.get(data.get("dataset"), data.get("dataset"))
    return hub_id, [hub_id] if hub_id else []


def main(argv=None) -> Path:
    args = parse_args(argv)
    from shared.config import read_json
    from shared.export import CARD, check_can_push, check_destination, model_card, push_folder, write_folder_atomic
    from shared.config import write_json_atomic
    from shared.checkpoints import run_step
    from shared.run_dir import CONFIG, LABELLED, WEIGHTS, read_run_config, resolve_run

    run_dir = resolve_run(args.run)
    run = read_run_config(run_dir)
    if not (run_dir / WEIGHTS).is_file():
        raise UserError(f"{run_dir} has no exported weights ({WEIGHTS}) yet; train until the first checkpoint is saved")
    check_destination(args.to, run_dir, args.overwrite)
    if args.push_to_hub:
        check_can_push()

    model, kind, (dataset, hub_datasets) = _load(run_dir, run)
    reports = {p.name[len("report-"):-len(".json")]: read_json(p, "report")
               for p in sorted(run_dir.glob("report-*.json"))}
    step = run_step(run_dir)
    config = run.to_json()
    config["extra"] = {**config.get("extra", {}), "step": step}  # the export has no checkpoints to say it

    name = args.push_to_hub or args.to.name
    where = args.push_to_hub or str(args.to)
    if run.modality == "image":
        usage = [f"python scripts/sample_image.py --run {where} --num 64 --out samples.png",
                 f"python scripts/report_image.py --run {where} --split test --data-dir IMAGES  "
                 f"# IMAGES: the data it was trained on"]
    else:
        usage = [f"python scripts/sample_text.py --run {where} --num 10",
                 f"python scripts/reconstruct_text.py --run {where} --input sentences.txt",
                 f"python scripts/report_text.py --run {where} --split test"]
    usage.append(f"python scripts/export.py --run {where} --to another-folder  # a copy of this folder")
    facts = {
        "model": f"{kind} (BIVA toolkit, {run.modality})",
        "preset": run.preset,
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "dataset": dataset,
        "training steps": "unknown" if step is None else f"{step:,} optimiser steps",
        "weights": f"EMA (decay {run.train.ema_decay}) of the latest checkpoint, `{WEIGHTS}`",
    }
    front = {"library_name": "biva", "tags": ["biva", "vae", f"{run.modality}-generation"],
             "datasets": hub_datasets,
             "pipeline_tag": "unconditional-image-generation" if run.modality == "image" else "text-generation"}
    card = model_card(title=name.split("/")[-1], modality=run.modality, facts=facts, reports=reports,
                      front_matter=front, usage=usage)

    def fill(tmp: Path) -> None:
        shutil.copyfile(run_dir / WEIGHTS, tmp / WEIGHTS)
        write_json_atomic(tmp / CONFIG, config)
        if run.modality == "text":
            shutil.copyfile(run_dir / TOKENIZER, tmp / TOKENIZER)
        for split in reports:
            shutil.copyfile(run_dir / f"report-{split}.json", tmp / f"report-{split}.json")
        if (run_dir / LABELLED).is_file():  # semi-supervised runs: which training images were labelled
            shutil.copyfile(run_dir / LABELLED, tmp / LABELLED)
        (tmp / CARD).write_text(card)

    write_folder_atomic(args.to, fill)
    print(f"exported {run_dir} ({run.modality}, step {step}, {len(reports)} report(s)) -> {args.to}")
    if args.push_to_hub:
        url = push_folder(args.to, args.push_to_hub, args.private)
        print(f"pushed {args.to} -> {url}")
    return args.to


if __name__ == "__main__":
    run_cli(main)
