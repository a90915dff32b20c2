"""Grids from a trained image run, as sample_image.py and reconstruct_image.py write them: seeded draws
from the prior (per class for a semi-supervised run) and inputs above their reconstructions from levels > k.

Importing this module is torch-free, so the scripts check their flags and ``--run`` before torch loads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from shared.errors import UserError


def check_class(choice, num_classes: int, run_dir) -> None:
    """--class C|all needs a semi-supervised run with class C."""
    if choice is None:
        return
    if not num_classes:
        raise UserError(f"--class needs a semi-supervised run (train_image.py --labels-per-class); {run_dir} "
                        f"is unconditional: drop --class")
    if choice != "all" and choice >= num_classes:
        raise UserError(f"--class {choice} is out of range: the run has {num_classes} classes, 0..{num_classes - 1} "
                        f"(or all)")


def draw_samples(model, num: int, *, class_=None, num_classes: int = 0, temperature: float = 1.0,
                 mode: str = "sample", seed: int = 0, batch_size: int = 64, device="cpu"):
    """uint8 images (N, C, H, W) on the CPU: ``num`` draws, or with ``class_`` "all" ``num`` per class in
    class order. Noise is keyed by (seed, image number), so the images do not depend on ``batch_size`` or
    the device; under "all" class c repeats the keys 0..num-1, so a column keeps its noise across rows."""
    import torch

    from shared.distributions import HashedNoise

    rows = num_classes if class_ == "all" else 1
    keys = torch.arange(num, device=device).repeat(rows)
    classes = None
    if class_ == "all":
        classes = torch.arange(num_classes, device=device).repeat_interleave(num)
    elif class_ is not None:
        classes = torch.full((num,), class_, dtype=torch.long, device=device)
    images = []
    for start in range(0, len(keys), batch_size):
        key = keys[start:start + batch_size]
        y = None if classes is None else classes[start:start + batch_size]
        images.append(model.sample(len(key), temperature=temperature, mode=mode, noise=HashedNoise(seed, key),
                                   y=y).cpu())
    return torch.cat(images)


def sample_run(args: argparse.Namespace) -> Path:
    """What sample_image.py does with its parsed flags: the grid of ``draw_samples`` of ``args.run``,
    written to ``args.out`` (default RUN/samples/samples.png). Returns the PNG's path."""
    from shared.run_dir import output_dir, resolve_run

    from .runs import check_image_run

    args.run = resolve_run(args.run)
    run = check_image_run(args.run)  # torch-free: a wrong --run fails before torch is imported
    num_classes = run.model["ladder"].get("num_classes", 0)
    check_class(args.class_, num_classes, args.run)
    from shared.cli import pick_device

    from .runs import load_image_model
    from .viz import save_grid

    device = pick_device(args.device)
    model = load_image_model(args.run, run, device)
    images = draw_samples(model, args.num, class_=args.class_, num_classes=num_classes,
                          temperature=args.latent_temperature, mode=args.output, seed=args.seed,
                          batch_size=args.batch_size, device=device)
    out = args.out or output_dir(args.run) / "samples" / "samples.png"
    ncol = args.num if args.class_ == "all" else args.ncol
    save_grid(images.numpy(), out, ncol=ncol, scale=args.scale)
    what = {None: "", "all": f", {args.num} per class, one row per class"}.get(args.class_, f", class {args.class_}")
    print(f"{len(images)} samples (latent temperature {args.latent_temperature}, output {args.output}{what}) -> {out}")
    return out


def reconstruction_rows(model, images, from_levels: list[int], *, mode: str = "mean", seed: int = 0,
                        device="cpu"):
    """uint8 (R * N, C, H, W) on the CPU: the N input ``images`` (binarised as the model sees them, for a
    Bernoulli model), then one row of reconstructions per k of ``from_levels`` (posterior of levels > k,
    the same latent noise for every k)."""
    import torch

    from shared.distributions import HashedNoise

    n = len(images)
    x = torch.from_numpy(images.copy()).to(device)
    batch = {"index": torch.arange(n, device=device), "x": x}
    rows = [x.cpu()]
    for k in from_levels:
        noise = HashedNoise(seed, batch["index"])  # the same latent noise for every k
        rows.append(model.reconstruct(batch, noise, from_level=k, mode=mode).cpu())
    if model.cfg.likelihood == "bernoulli":  # show what the model saw: the binarised inputs
        rows[0] = (model.binarized(x, HashedNoise(seed, batch["index"]).per_example()) * 255).to(torch.uint8).cpu()
    return torch.cat(rows)


def reconstruct_run(args: argparse.Namespace) -> Path:
    """What reconstruct_image.py does with its parsed flags: ``args.num`` images of ``args.split`` above
    their ``reconstruction_rows``, written to ``args.out`` (default RUN/samples/recon.png)."""
    from shared.run_dir import output_dir, resolve_run

    from .runs import check_image_run

    args.run = resolve_run(args.run)
    run = check_image_run(args.run)
    levels = run.model["ladder"]["levels"]
    bad = [k for k in args.from_level if k >= levels]
    if bad:
        raise UserError(f"--from-level {bad[0]} is out of range for a ladder of {levels} levels; use 0..{levels - 1}")

    from shared.cli import pick_device

    from .runs import check_shape, load_image_model, load_split, run_data_config
    from .viz import save_grid

    data = load_split(run_data_config(run, args.data_dir), args.split)
    check_shape(data, run.model["image_shape"], "data")
    device = pick_device(args.device)
    model = load_image_model(args.run, run, device)
    n = min(args.num, len(data.images))
    grid = reconstruction_rows(model, data.images[:n], args.from_level, mode=args.output, seed=args.seed,
                               device=device)
    out = args.out or output_dir(args.run) / "samples" / "recon.png"
    save_grid(grid.numpy(), out, ncol=n, scale=args.scale)
    print(f"{n} images from the {data.name}: inputs (top row), reconstructions from levels > "
          f"{', '.join(map(str, args.from_level))} below -> {out}")
    return out
