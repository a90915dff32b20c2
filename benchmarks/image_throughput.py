#!/usr/bin/env python
"""Training and evaluation speed of an image preset on this machine, on random uint8 images.

    python benchmarks/image_throughput.py --preset cifar10 --batch-size 48 --mixed-precision bf16
    python benchmarks/image_throughput.py --preset tiny --device cpu --steps 5 --iw-samples 20

Training: the engine's step (shared.objective.training_loss: -log p(x|z) + free-bits KL; backward; the
gradient norm and the skip guard on the device, one host transfer; Adamax; EMA update) for --steps
timed steps after --warmup untimed ones; images/s = batch x steps / seconds. --mixed-precision bf16
works on a CPU too (autocast; log-densities stay fp32). Evaluation: the importance-weighted bound
L_K with K = --iw-samples on --eval-batch-size images (samples in chunks of --iw-chunk), images/s.
Peak memory: torch.cuda.max_memory_allocated on a GPU, the process's peak resident set size
(getrusage) on the CPU. The last line of output is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from biva_image.names import IMAGE_MODELS, IMAGE_PRESETS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=IMAGE_PRESETS, default="cifar10", help="image preset (default cifar10)")
    p.add_argument("--model", choices=IMAGE_MODELS, default="biva", help="biva, lvae+ or lvae (default biva)")
    p.add_argument("--levels", type=int, help="ladder depth L (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=48, help="training batch (default 48, the paper's)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast precision of training and evaluation (default no)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model and the optimiser's step for training (default: as training does, "
                        "the preset's choice for this device and precision: the binary preset compiles on a CPU in "
                        "fp32 or bf16); given explicitly, the L_K evaluation runs the compiled forward too. The "
                        "first (compiling) step and the evaluation's warm-up chunk are timed apart and not in the "
                        "figures")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="2-D feature maps in channels_last memory format, as training runs them (default on)")
    p.add_argument("--iw-samples", type=int, default=1000, help="K of the timed L_K evaluation (default 1000; 0 skips)")
    p.add_argument("--iw-chunk", type=int,
                   help="importance samples per forward pass (default: from free memory, shared.bounds.auto_iw_chunk)")
    p.add_argument("--eval-batch-size", type=int, default=8, help="images of the L_K evaluation (default 8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "steps", "iw_chunk", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.iw_samples < 0:
        p.error("--warmup and --iw-samples must be >= 0")
    return args


def engine_step(forward, model, optimizer, ema, batch: dict, noise, lam: float, autocast, counter: dict,
                scaler=None) -> float:
    """One optimiser step as shared.engine.Trainer._update takes it for one micro-batch on one process:
    training_loss, backward, the gradient norm (shared.optim.grad_norm) and the skip guard on the device,
    one host transfer, Adamax and the EMA update when the step is good. ``forward`` is the model to call
    (maybe compiled), ``model`` the one holding the parameters; ``counter["steps"]`` counts the updates.
    Returns the loss."""
    import torch

    from shared.objective import training_loss
    from shared.optim import grad_norm

    with autocast():
        loss, _ = training_loss(forward, batch, noise, lam)
    bad = ~torch.isfinite(loss.detach())
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = grad_norm(model.parameters())
    bad = bad | ~torch.isfinite(norm)
    figures = torch.stack([bad.double(), loss.detach().double(), norm.double()]).tolist()  # the one sync
    if figures[0] == 0:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        counter["steps"] += 1
        ema.update(model, counter["steps"])
    if scaler is not None:
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return figures[1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import contextlib

    import torch

    from biva_image.model import ImageVAE
    from biva_image.presets import get_preset
    from shared.bounds import auto_iw_chunk, iw_bound
    from shared.cli import pick_device
    from shared.distributions import TrainNoise
    from shared.ema import EMA
    from shared.launch import compile_wanted, keep_freed_cpu_memory
    from shared.optim import compile_optimizer_step
    from shared.nn import set_channels_last

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(pick_device(args.device))
    cuda = device.type == "cuda"
    heap_kept = not cuda and keep_freed_cpu_memory()  # as the engine's Trainer does on a CPU
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    kw = {"levels": args.levels} if args.levels and args.preset != "tiny" else {}
    preset = get_preset(args.preset, args.model, **kw)
    model = set_channels_last(ImageVAE(preset.model).to(device), args.channels_last)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    n_params = sum(p.numel() for p in model.parameters())
    compiled = args.compile if args.compile is not None else compile_wanted(preset.train.compile, device.type,
                                                                             args.mixed_precision)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.Adamax(model.parameters(), lr=preset.train.lr)
    if compiled:
        compile_optimizer_step(optimizer)  # as the engine does under --compile
    ema = EMA(model, preset.train.ema_decay)
    lam = float(preset.train.free_bits or 0.0)  # lambda per group, as at the start of training
    C, H, W = preset.model.image_shape
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    # A few fixed random batches, moved once: the timing is the model's, not the data loader's.
    batches = [torch.randint(0, 256, (args.batch_size, C, H, W), dtype=torch.uint8, generator=gen).to(device)
               .contiguous(memory_format=memory_format) for _ in range(4)]
    noise = TrainNoise()
    model.train()
    counter = {"steps": 0}

    def train_step(i: int) -> float:
        x = batches[i % len(batches)]
        batch = {"index": torch.arange(args.batch_size, device=device), "x": x}
        return engine_step(forward, model, optimizer, ema, batch, noise, lam, autocast, counter, scaler)

    first_s = None
    for i in range(args.warmup):
        t0 = time.perf_counter()
        train_step(i)
        sync()
        first_s = time.perf_counter() - t0 if first_s is None else first_s
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = train_step(i)
    sync()
    train_s = time.perf_counter() - t0
    final_loss = loss
    train_peak = torch.cuda.max_memory_allocated() if cuda else None

    result = {
        "benchmark": "image_throughput", "preset": args.preset, "model": args.model,
        "levels": preset.model.ladder.levels, "num_params": n_params, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(), "mixed_precision": args.mixed_precision, "compile": compiled,
        "keep_freed_cpu_memory": heap_kept,
        "channels_last": args.channels_last, "first_step_s": first_s,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "train_s": round(train_s, 4), "train_images_per_s": args.batch_size * args.steps / train_s,
        "train_step_ms": 1000 * train_s / args.steps, "final_loss": final_loss,
        "train_peak_memory_gib": train_peak / 2**30 if cuda else None,
    }
    print(f"{args.preset} {args.model} ({n_params / 1e6:.2f}M parameters) on {result['device_name']}, "
          f"{args.mixed_precision} precision, {'compiled' if compiled else 'eager'}: training "
          f"{result['train_images_per_s']:.1f} images/s "
          f"({result['train_step_ms']:.1f} ms per step of {args.batch_size})", file=sys.stderr)

    if args.iw_samples:
        model.eval()
        x = batches[0][: args.eval_batch_size]
        if len(x) < args.eval_batch_size:
            x = torch.randint(0, 256, (args.eval_batch_size, C, H, W), dtype=torch.uint8, generator=gen).to(device)
        batch = {"index": torch.arange(args.eval_batch_size, device=device), "x": x}
        # --compile given: L_K runs through the compiled forward too (training's evaluation never does). The
        # warm-up is one chunk of the timed batch's shape (a compiled model compiles it there), then the last,
        # smaller chunk's shape if any.
        scorer = forward if args.compile else model
        with torch.no_grad(), autocast():
            chunk = args.iw_chunk or auto_iw_chunk(model, batch, args.iw_samples)
            t0 = time.perf_counter()
            iw_bound(scorer, batch, min(chunk, args.iw_samples), chunk_size=chunk)
            if args.compile and args.iw_samples > chunk and args.iw_samples % chunk:
                iw_bound(scorer, batch, args.iw_samples % chunk, chunk_size=chunk)
        sync()
        warm_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast():
            bound = iw_bound(scorer, batch, args.iw_samples, seed=args.seed, chunk_size=chunk)
        sync()
        eval_s = time.perf_counter() - t0
        result.update({
            "iw_samples": args.iw_samples, "iw_chunk": chunk, "eval_batch_size": args.eval_batch_size,
            "eval_s": round(eval_s, 4), "eval_images_per_s": args.eval_batch_size / eval_s,
            "eval_forward_images_per_s": args.eval_batch_size * args.iw_samples / eval_s,
            "eval_bound_finite": bool(torch.isfinite(bound).all()),
            "eval_warmup_s": round(warm_s, 2),  # with --compile: the compilation of the evaluation
            "eval_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        })
        print(f"L_{args.iw_samples} evaluation: {result['eval_images_per_s']:.3f} images/s "
              f"({result['eval_forward_images_per_s']:.1f} importance samples/s, chunks of {chunk})",
              file=sys.stderr)
    # ru_maxrss is in KiB on Linux: the peak of the whole process (training and evaluation).
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
