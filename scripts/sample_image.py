#!/usr/bin/env python
"""Draw images from a trained image run's prior and save them as one PNG grid.

    python scripts/sample_image.py --run runs/cifar10 --num 64 --out samples.png
    python scripts/sample_image.py --run runs/cifar10 --latent-temperature 0.8 --output mean

z ~ p(z) with every prior standard deviation scaled by --latent-temperature, then x ~ p(x|z)
(--output sample) or the mean of p(x|z) (--output mean; for the logistic mixture, the mean of its
most likely component). The EMA weights of model.safetensors are used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biva_image.names import GRID_SCALE_HELP  # noqa: E402
from shared.cli import ArgumentParser, auto_or_positive_int, nonneg_int, positive_float, positive_int  # noqa: E402
from shared.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory of scripts/train_image.py (its --output-dir), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("--num", type=positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--out", type=Path, help="PNG to write (default: RUN/samples/samples.png; ./NAME/samples/ for a hub or read-only RUN)")
    p.add_argument("--latent-temperature", type=positive_float, default=1.0,
                   help="scale of every prior standard deviation (default 1.0; below 1 gives smoother images)")
    p.add_argument("--output", choices=["sample", "mean"], default="sample",
                   help="draw x ~ p(x|z), or take its mean (default sample)")
    p.add_argument("--ncol", type=positive_int, help="images per row of the grid (default: a square grid)")
    p.add_argument("--scale", type=auto_or_positive_int, default=None, metavar="N|auto", help=GRID_SCALE_HELP)
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the latent and pixel noise (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images drawn per forward pass (default 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default auto: cuda when available)")
    args = p.parse_args(argv)
    if args.out is not None and args.out.suffix.lower() != ".png":
        p.error(f"--out {args.out} must end in .png")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    from biva_image.runs import check_image_run
    from shared.run_dir import output_dir, resolve_run

    args.run = resolve_run(args.run)
    run = check_image_run(args.run)  # torch-free: a wrong --run fails before torch is imported
    import torch

    from biva_image.runs import load_image_model, pick_device
    from biva_image.viz import save_grid
    from shared.distributions import HashedNoise

    device = pick_device(args.device)
    model = load_image_model(args.run, run, device)
    images = []
    for start in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - start)
        # Noise keyed by (seed, image number): the same images whatever --batch-size or device.
        noise = HashedNoise(args.seed, torch.arange(start, start + n, device=device))
        images.append(model.sample(n, temperature=args.latent_temperature, mode=args.output, noise=noise).cpu())
    out = args.out or output_dir(args.run) / "samples" / "samples.png"
    save_grid(torch.cat(images).numpy(), out, ncol=args.ncol, scale=args.scale)
    print(f"{args.num} samples (latent temperature {args.latent_temperature}, output {args.output}) -> {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
