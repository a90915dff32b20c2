#!/usr/bin/env python
"""Training speed of the official BIVA PyTorch code (Liévin et al., PyPI ``biva-pytorch`` 0.1.4) on binary
28x28 images, as its ``run_deepvae.py`` trains them: ``get_deep_vae_mnist()`` stages and latents, ELU,
dropout 0.5 in both models, free bits 2 nats per group, Adamax 2e-3 with its ``LowerBoundedExponentialLR``,
EMA 0.9995, batch 48.

Run it with a Python that has the reference installed (it is not a dependency of this project, and its
pinned ``booster-pytorch`` would downgrade nothing here only in a separate environment)::

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 numpy tqdm matplotlib tensorboard
    /tmp/ref/bin/pip install --no-deps biva-pytorch==0.1.4 booster-pytorch==0.0.2
    /tmp/ref/bin/python benchmarks/reference_biva.py --threads 2

``benchmarks/cpu_speed.py --reference-python /tmp/ref/bin/python`` runs it next to this project's step.
Only ``torchvision.utils.make_grid`` (image logging, unused here) is stubbed: PyPI's torchvision does not
import beside a CPU torch 2.13. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                   help="bf16: its training step under torch.autocast, as this project's --mixed-precision bf16 "
                        "(a like-for-like row; the code itself has no such option)")
    args = p.parse_args()
    tv, tvu = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
    tvu.make_grid, tv.utils = None, tvu
    sys.modules.setdefault("torchvision", tv)
    sys.modules.setdefault("torchvision.utils", tvu)
    import torch
    from booster.utils import EMA
    from torch.distributions import Bernoulli

    from biva.evaluation import VariationalInference
    from biva.model import DeepVae, get_deep_vae_mnist
    from biva.utils import LowerBoundedExponentialLR, training_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    stages, latents = get_deep_vae_mnist()
    model = DeepVae(tensor_shp=(-1, 1, 28, 28), stages=stages, latents=latents, nonlinearity="elu",
                    q_dropout=0.5, p_dropout=0.5, type="biva", features_out=1)
    x = torch.rand(args.batch_size, 1, 28, 28).bernoulli()
    with torch.no_grad():
        model(x)  # its data-dependent weight-norm initialisation
    ema = EMA(model, 0.9995)
    evaluator = VariationalInference(Bernoulli, iw_samples=1)
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3, betas=(0.9, 0.999))
    scheduler = LowerBoundedExponentialLR(optimizer, 0.999999, 0.0001)
    kwargs = {"beta": 1.0, "freebits": [2.0] * (2 * len(latents) - 1)}

    def step():
        xb = torch.rand(args.batch_size, 1, 28, 28).bernoulli()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            training_step(xb, model, evaluator, optimizer, scheduler, **kwargs)
        ema.update()

    for _ in range(args.warmup):
        step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - t
    params = sum(q.numel() for q in model.parameters())
    print(json.dumps({"benchmark": "reference_biva", "num_params": params, "batch_size": args.batch_size,
                      "steps": args.steps, "threads": args.threads, "mixed_precision": args.mixed_precision,
                      "train_s": seconds,
                      "train_images_per_s": args.batch_size * args.steps / seconds}))


if __name__ == "__main__":
    main()
