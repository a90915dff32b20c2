"""Training an image run once its flags are parsed (scripts/train_image.py): the data config from the
flags, the data, a new run's config from its preset (or the resumed run's), the Trainer, and a grid
of samples at every evaluation.

Importing this module is torch-free, so the script checks its flags before anything heavy is loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import UserError

from .names import DATASET_PRESET, FULL_TRAIN_DATASETS, PRESET_BY_SIZE


def choose_preset(args: argparse.Namespace, shape) -> str:
    """--preset, else the dataset's (DATASET_PRESET), else for a folder the one of its image size."""
    if args.preset:
        return args.preset
    if args.dataset != "folder":
        return DATASET_PRESET[args.dataset]
    size = shape[1]
    if shape[1] == shape[2] and size in PRESET_BY_SIZE:
        return PRESET_BY_SIZE[size]
    raise UserError(f"no preset fits {shape[2]}x{shape[1]} images (28 -> binary, 32 -> cifar10, 64 -> celeba64); "
                    f"pass --preset tiny or another --preset")


def data_config(args: argparse.Namespace):
    """The ImageDataConfig of a new run's flags (FULL_TRAIN_DATASETS default to --valid-size 0)."""
    from .data import ImageDataConfig

    cfg = ImageDataConfig(dataset=args.dataset, data_dir=str(args.data_dir) if args.data_dir else None,
                          split_seed=args.split_seed or 0, cache_dir=str(args.cache_dir) if args.cache_dir else None,
                          labels_per_class=args.labels_per_class)
    if args.valid_size is not None:
        cfg.valid_size = args.valid_size
    elif args.dataset in FULL_TRAIN_DATASETS:
        cfg.valid_size = 0  # the usual protocol: train on the whole split, report test
    return cfg


def fresh_run(args: argparse.Namespace, data_cfg, splits, labelled):
    """The RunConfig of a new run: the preset (chosen for the data's shape), with the classifier when
    ``labelled`` is not None, and the model and training flags applied."""
    from shared.cli import training_overrides
    from shared.config import RunConfig, replace, to_dict

    from .presets import get_preset, with_labels
    from .splits import num_classes

    shape = splits.shape
    preset_name = choose_preset(args, shape)
    kw = {"levels": args.levels} if args.levels and preset_name != "tiny" else {}
    if preset_name == "tiny":
        kw = {"shape": tuple(shape), "likelihood": args.likelihood}
    preset = get_preset(preset_name, args.model or "biva", **kw)
    if labelled is not None:
        preset = with_labels(preset, num_classes(splits))
    model = preset.model
    if args.likelihood and args.likelihood != model.likelihood:
        model.likelihood = args.likelihood
        model.binarize = "dynamic" if args.likelihood == "bernoulli" else "none"
    if splits.binarize != "none" and model.likelihood == "bernoulli":
        model.binarize = splits.binarize
    if list(model.image_shape) != list(shape):
        raise UserError(f"the {preset_name} preset expects {model.image_shape[1]}x{model.image_shape[2]}x"
                        f"{model.image_shape[0]} images but the data are {shape[1]}x{shape[2]}x{shape[0]}; "
                        f"pick a matching --preset (tiny fits any size)")
    model.validate()  # before anything is written
    train = replace(preset.train, "training flags", **{**training_overrides(args), "split_seed": data_cfg.split_seed})
    effective = {"dataset": args.dataset, "model": model.ladder.variant, "likelihood": model.likelihood,
                 "levels": model.ladder.levels, "labels_per_class": args.labels_per_class}
    return RunConfig(modality="image", preset=preset_name, model=to_dict(model), data=to_dict(data_cfg),
                     train=train, extra={"flags": effective})


def train_image(args: argparse.Namespace, argv: list | None = None, script: str | None = None) -> dict:
    """Train (or --resume) the run the parsed flags of scripts/train_image.py describe; ``argv`` and
    ``script`` (the script's file) make the resume command printed on a stop. Returns the Trainer's
    summary of the last validation."""
    from shared.train import init_source

    source = init_source(args, "image")  # fine-tuning: the source's preset and model unless given
    if source is not None and args.model is None:
        args.model = source.config.extra.get("flags", {}).get("model")
    # Heavy imports only after the flags are known to be good.
    import numpy as np

    from shared.config import from_dict, replace
    from shared.batching import labelled_batch_size
    from shared.engine import Trainer
    from shared.launch import default_resume_command, process_state
    from shared.nn import set_channels_last
    from shared.run_dir import read_labelled_indices, write_labelled_indices, write_run_config
    from shared.train import check_init_reset, init_summary, open_run, start_weights

    from .data import ImageDataConfig, ImageDataset, load_image_splits, semi_supervised_sets
    from .model import ImageModelConfig, ImageVAE
    from .splits import labelled_subset
    from .viz import save_grid

    data_cfg = data_config(args)
    flags = {"dataset": args.dataset, "model": args.model, "likelihood": args.likelihood, "levels": args.levels,
             "labels_per_class": args.labels_per_class}
    state = process_state()  # not PartialState(): CPU processes under torchrun must join
    with state.main_process_first():  # only the main process converts and caches the data
        splits = load_image_splits(data_cfg)
    loaded_cfg = data_cfg
    where = data_cfg.data_dir or data_cfg.dataset
    # A new semi-supervised run draws its labelled subset now: no labels, or too few, fail before anything is written.
    labelled = None
    if args.labels_per_class and not args.resume:
        labelled = labelled_subset(splits, args.labels_per_class, data_cfg.split_seed, where)
    run, out = open_run(args, "image", lambda: fresh_run(args, data_cfg, splits, labelled), flags, source)
    if args.resume:
        # The run's own split settings (valid size, split seed), read from where the data are now.
        data_cfg = replace(from_dict(ImageDataConfig, run.data, "config.json data"), "config.json data",
                           data_dir=loaded_cfg.data_dir, cache_dir=loaded_cfg.cache_dir)
        if args.labels_per_class is not None and args.labels_per_class != data_cfg.labels_per_class:
            raise UserError(f"--labels-per-class {args.labels_per_class} differs from the resumed run's "
                            f"{data_cfg.labels_per_class}; drop the flag or choose a new --output-dir")
        if replace(data_cfg, labels_per_class=loaded_cfg.labels_per_class) != loaded_cfg:
            with state.main_process_first():
                splits = load_image_splits(data_cfg)
        if data_cfg.labels_per_class:  # the subset the run was started with, as saved
            labelled = np.asarray(read_labelled_indices(out, len(splits.train))["indices"], dtype=np.int64)
    model_cfg = from_dict(ImageModelConfig, run.model, "config.json model")
    if args.resume and list(model_cfg.image_shape) != list(splits.shape):  # a new run's preset was checked
        raise UserError(f"the run's model expects images of shape {model_cfg.image_shape} but the data are "
                        f"{list(splits.shape)}; use the data the run was trained on")
    if labelled is not None:
        labelled_batch_size(run.train, len(labelled), state.num_processes)  # a bad value fails before any write
    check_init_reset(run, lambda: ImageVAE(model_cfg))  # before config.json marks the run as started
    if state.is_main_process and not args.resume:
        out.mkdir(parents=True, exist_ok=True)
        if labelled is not None:  # before config.json, which marks the run as started
            write_labelled_indices(out, data_cfg.labels_per_class, data_cfg.split_seed, labelled)
        write_run_config(out, run)
    state.wait_for_everyone()

    def on_evaluate(ema_model, step, run_dir):
        images = ema_model.sample(64, mode="sample").cpu().numpy()
        save_grid(images, Path(run_dir) / "samples" / f"step_{step:07d}.png")
        return {"samples": images}  # for the trackers (--report-to)

    if labelled is None:
        labelled_set, train_set = None, ImageDataset(splits.train, splits.train_labels)
    else:
        labelled_set, train_set = semi_supervised_sets(splits, labelled)
    trainer = Trainer(run, lambda: set_channels_last(ImageVAE(model_cfg), run.train.channels_last), train_set,
                      ImageDataset(splits.valid, splits.valid_labels), out, resume=args.resume,
                      on_evaluate=on_evaluate, labelled_set=labelled_set,
                      init_weights=start_weights(run, out, args.resume),
                      resume_command=default_resume_command(script, argv))
    if state.is_main_process:
        n_params = sum(p.numel() for p in trainer.raw_model.parameters())
        print(f"{run.preset} preset, {model_cfg.ladder.variant}, {n_params / 1e6:.2f}M parameters, "
              f"{len(splits.train)} train / {len(splits.valid)} valid images -> {out}", file=sys.stderr)
        if run.init_from is not None:
            print(init_summary(run.init_from), file=sys.stderr)
        if splits.valid_from == "train":
            print(f"validation: {len(splits.valid)} of the {len(splits.train)} training images (split seed "
                  f"{data_cfg.split_seed}), all of which are trained on (--valid-size 0); report on the test split",
                  file=sys.stderr)
    summary = trainer.fit()
    if state.is_main_process:
        v = summary["valid"]
        error = f", classification error {v['classification_error']:.4f}" if "classification_error" in v else ""
        print(f"step {summary['step']}: valid ELBO {v['elbo']:.3f} nats, {v['bits_per_dim']:.4f} bits/dim, "
              f"KL {v['kl']:.3f} nats{error}; run directory {out}")
    return summary
