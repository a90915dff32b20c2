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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biva_image.names import (DATASET_PRESET, FULL_TRAIN_DATASETS, IMAGE_DATASETS, IMAGE_MODELS,  # noqa: E402
                              IMAGE_PRESETS, LIKELIHOODS, PRESET_BY_SIZE)
from shared.cli import ArgumentParser, add_training_flags, nonneg_float, nonneg_int, positive_int  # noqa: E402
from shared.errors import UserError, run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
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
    d.add_argument("--levels", type=nonneg_int, help="ladder depth L (default: the preset's; e.g. 29 for LVAE+ L=29)")
    s = p.add_argument_group("semi-supervised (DESIGN.md §9b)")
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
    if args.levels is not None and args.levels < 1:
        p.error("--levels must be at least 1")
    for flag in ("classifier_weight", "labelled_batch_size"):
        if getattr(args, flag) is not None and args.labels_per_class is None and not args.resume:
            p.error(f"--{flag.replace('_', '-')} needs --labels-per-class (a semi-supervised run)")
    return args


def choose_preset(args, shape) -> str:
    if args.preset:
        return args.preset
    if args.dataset != "folder":
        return DATASET_PRESET[args.dataset]
    size = shape[1]
    if shape[1] == shape[2] and size in PRESET_BY_SIZE:
        return PRESET_BY_SIZE[size]
    raise UserError(f"no preset fits {shape[2]}x{shape[1]} images (28 -> binary, 32 -> cifar10, 64 -> celeba64); "
                    f"pass --preset tiny or another --preset")


def main(argv=None) -> None:
    from shared.train import init_source

    args = parse_args(argv)
    source = init_source(args, "image")  # fine-tuning: the source's preset and model unless given
    if source is not None and args.model is None:
        args.model = source.config.extra.get("flags", {}).get("model")
    # Heavy imports only after the flags are known to be good.
    from biva_image.data import (ImageDataConfig, ImageDataset, labelled_subset, load_image_splits, num_classes,
                                 semi_supervised_sets)
    from biva_image.model import ImageVAE
    from biva_image.presets import get_preset, with_labels
    from biva_image.viz import save_grid
    from shared.config import RunConfig, from_dict, replace, to_dict
    from shared.engine import Trainer, default_resume_command, labelled_batch_size, process_state
    from shared.nn import set_channels_last
    from shared.run_dir import read_labelled_indices, write_labelled_indices, write_run_config
    from shared.train import check_init_reset, init_summary, open_run, start_weights
    from biva_image.model import ImageModelConfig
    import numpy as np

    data_cfg = ImageDataConfig(dataset=args.dataset, data_dir=str(args.data_dir) if args.data_dir else None,
                               split_seed=args.split_seed or 0,
                               cache_dir=str(args.cache_dir) if args.cache_dir else None,
                               labels_per_class=args.labels_per_class)
    if args.valid_size is not None:
        data_cfg.valid_size = args.valid_size
    elif args.dataset in FULL_TRAIN_DATASETS:
        data_cfg.valid_size = 0  # the usual protocol: train on the whole split, report test
    flags = {"dataset": args.dataset, "model": args.model, "likelihood": args.likelihood, "levels": args.levels,
             "labels_per_class": args.labels_per_class}

    def fresh_run(shape) -> RunConfig:
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
        model.validate()
        from shared.cli import training_overrides

        train = replace(preset.train, "training flags", **{**training_overrides(args), "split_seed": data_cfg.split_seed})
        effective = {"dataset": args.dataset, "model": model.ladder.variant, "likelihood": model.likelihood,
                     "levels": model.ladder.levels, "labels_per_class": args.labels_per_class}
        return RunConfig(modality="image", preset=preset_name, model=to_dict(model), data=to_dict(data_cfg),
                         train=train, extra={"flags": effective})

    state = process_state()  # not PartialState(): CPU processes under torchrun must join
    with state.main_process_first():  # only the main process converts and caches the data
        splits = load_image_splits(data_cfg)
    loaded_cfg = data_cfg
    where = data_cfg.data_dir or data_cfg.dataset
    # A new semi-supervised run draws its labelled subset now: no labels, or too few, fail before anything is written.
    labelled = None
    if args.labels_per_class and not args.resume:
        labelled = labelled_subset(splits, args.labels_per_class, data_cfg.split_seed, where)
    run, out = open_run(args, "image", lambda: fresh_run(splits.shape), flags, source)
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
    if list(model_cfg.image_shape) != list(splits.shape):
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
    trainer = Trainer(run, lambda: set_channels_last(ImageVAE(model_cfg), run.train.channels_last), train_set, ImageDataset(splits.valid, splits.valid_labels), out,
                      resume=args.resume, on_evaluate=on_evaluate, labelled_set=labelled_set,
                      init_weights=start_weights(run, out, args.resume),
                      resume_command=default_resume_command(__file__, argv))
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


if __name__ == "__main__":
    run_cli(main)
