#!/usr/bin/env python
"""Where the time goes: torch.profiler over the image training step, the text training step and the
L_K evaluation, on random data.

    python benchmarks/profile_step.py --what image --preset binary --device cpu --threads 2
    python benchmarks/profile_step.py --what all --preset cifar10 --mixed-precision bf16      # on a GPU

Each part runs --warmup untimed steps, then profiles --steps steps (the training step is the engine's,
benchmarks/image_throughput.engine_step; L_K is shared.bounds.iw_bound with --iw-samples samples on
--eval-batch-size examples) and prints the top operators by self CPU time. On a GPU it also prints
the top CUDA kernels, kernel launches per step, and the GPU's idle time between kernels per step
(host-side gaps: the step waits for Python and launches, not for arithmetic).

--op-times (CPU) times each operator by its own wall clock instead (a dispatch mode around every aten
call, no profiler): the profiler's per-event cost inflates small operators several times over on a
CPU (the binary preset's element-wise operators at 28x28 by up to ~10x), so its shares overstate
them. It times --steps plain steps, then --steps steps with every operator timed, and prints each
operator's milliseconds per step and its share of the plain step; the rest of the step is spent
between operators (Python, autograd bookkeeping).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from biva_image.names import IMAGE_MODELS, IMAGE_PRESETS
from biva_text.names import TEXT_MODELS, TEXT_PRESETS
from shared.cli import ArgumentParser, nonneg_int, pick_device, positive_int
from shared.errors import run_cli

HERE = Path(__file__).resolve().parent  # the sibling benchmarks are loaded by file


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["image", "text", "eval", "all"], default="all",
                   help="image training step, text training step, image L_K evaluation, or all (default all)")
    p.add_argument("--preset", choices=IMAGE_PRESETS, default="binary", help="image preset (default binary)")
    p.add_argument("--model", choices=IMAGE_MODELS, default="biva", help="image model (default biva)")
    p.add_argument("--text-preset", choices=TEXT_PRESETS, default="paper", help="text preset (default paper)")
    p.add_argument("--text-model", choices=TEXT_MODELS, default="biva-lstm", help="text model (default biva-lstm)")
    p.add_argument("--batch-size", type=positive_int, default=48, help="training batch, images or sentences (default 48)")
    p.add_argument("--steps", type=positive_int, default=3, help="profiled steps (default 3)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--iw-samples", type=positive_int, default=100, help="K of the profiled L_K (default 100)")
    p.add_argument("--eval-batch-size", type=positive_int, default=8, help="examples of the profiled L_K (default 8)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="autocast precision (default no)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads on a CPU (default: torch's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="image feature maps in channels_last memory format, as training runs them (default on)")
    p.add_argument("--rows", type=positive_int, default=15, help="operators listed per table (default 15)")
    p.add_argument("--op-times", action="store_true",
                   help="CPU: time every operator by its own wall clock instead of the profiler (see above)")
    args = p.parse_args(argv)
    if args.op_times and args.device != "cpu":
        p.error("--op-times times operators on the CPU; add --device cpu")
    return args


def sibling(name: str):
    """The module of benchmarks/<name>.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_report(prof, steps: int) -> str:
    """Kernel launches per step and the GPU's idle time between kernels (host-side gaps) per step."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    if not kernels:
        return "no CUDA kernels recorded"
    busy, idle, end = 0.0, 0.0, kernels[0][0]
    for start, stop in kernels:
        if start > end:
            idle += start - end
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return (f"per step: {launches / steps:.0f} kernel launches, GPU busy {busy / steps / 1e3:.2f} ms, "
            f"idle between kernels {idle / steps / 1e3:.2f} ms")


def op_times(name: str, run, args) -> None:
    """--op-times: each aten call of --steps steps timed as it runs, summed per operator."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    totals = collections.defaultdict(lambda: [0, 0.0])

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            entry = totals[func.overloadpacket.__name__]
            entry[0] += 1
            entry[1] += time.perf_counter() - t0
            return out

    start = time.perf_counter()
    for i in range(args.steps):  # untimed steps: the timer's own cost per call lands between operators
        run(i)
    step = (time.perf_counter() - start) / args.steps
    with Timer():
        for i in range(args.steps):
            run(i)
    in_ops = sum(seconds for _, seconds in totals.values()) / args.steps
    calls = sum(n for n, _ in totals.values()) / args.steps
    rest = (f"the rest ({100 * (1 - in_ops / step):.1f} %) between them (Python, autograd)" if in_ops < step else
            "more than the whole step: operators this short are inflated by the timer itself")
    print(f"\n=== {name}: {1000 * step:.1f} ms per step ({args.steps} steps); then, every operator timed, "
          f"{1000 * in_ops:.1f} ms in {calls:.0f} operator calls per step, {rest} ===")
    print(f"{'operator':<36}{'calls/step':>11}{'ms/step':>10}{'share':>9}")
    for op, (n, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:args.rows]:
        print(f"{op:<36}{n / args.steps:>11.0f}{1000 * seconds / args.steps:>10.1f}{100 * seconds / args.steps / step:>8.1f}%")


def profile(name: str, run, args, device) -> None:
    import torch
    from torch.profiler import ProfilerActivity

    cuda = device.type == "cuda"
    for i in range(args.warmup):
        run(i)
    if args.op_times:
        op_times(name, run, args)
        return
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(args.steps):
            run(i)
        if cuda:
            torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    table = prof.key_averages()
    print(f"\n=== {name}: {1000 * seconds:.1f} ms per step under the profiler ({args.steps} steps) ===")
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if cuda:
        print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows))
        print(gpu_report(prof, args.steps))


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    engine_step = sibling("image_throughput").engine_step
    from shared.distributions import TrainNoise
    from shared.ema import EMA
    from shared.launch import keep_freed_cpu_memory

    device = torch.device(pick_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        keep_freed_cpu_memory()  # as the engine's Trainer does on a CPU
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.mixed_precision == "bf16" \
        else contextlib.nullcontext
    print(f"device {device}, {torch.get_num_threads()} threads, precision {args.mixed_precision}", file=sys.stderr)

    def training(model, batches, lam):
        optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
        ema, counter, noise = EMA(model, 0.9995), {"steps": 0}, TrainNoise()
        model.train()
        return lambda i: engine_step(model, model, optimizer, ema, batches[i % len(batches)], noise, lam, autocast,
                                     counter)

    if args.what in ("image", "eval", "all"):
        from biva_image.model import ImageVAE
        from biva_image.presets import get_preset
        from shared.bounds import iw_bound
        from shared.nn import set_channels_last

        torch.manual_seed(0)
        preset = get_preset(args.preset, args.model)
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model = set_channels_last(ImageVAE(preset.model).to(device), args.channels_last)
        shape = preset.model.image_shape
        g = torch.Generator().manual_seed(0)
        images = [torch.randint(0, 256, (args.batch_size, *shape), dtype=torch.uint8, generator=g).to(device)
                  .contiguous(memory_format=memory_format) for _ in range(2)]
        batches = [{"index": torch.arange(args.batch_size, device=device), "x": x} for x in images]
        if args.what != "eval":
            profile(f"image training step, {args.preset} {args.model}, batch {args.batch_size}",
                    training(model, batches, float(preset.train.free_bits or 0.0)), args, device)
        if args.what != "image":
            model.eval()
            n = min(args.eval_batch_size, args.batch_size)
            batch = {"index": torch.arange(n, device=device), "x": images[0][:n]}

            def evaluate(i):
                with torch.no_grad(), autocast():
                    return iw_bound(model, batch, args.iw_samples, seed=i)

            profile(f"L_{args.iw_samples} of {n} images, {args.preset} {args.model}", evaluate, args, device)
    if args.what in ("text", "all"):
        from biva_text.model import build_text_model
        from biva_text.presets import get_preset as text_preset
        random_batch = sibling("text_throughput").random_batch

        torch.manual_seed(0)
        preset = text_preset(args.text_preset, args.text_model, vocab_size=20000, max_tokens=40)
        model = build_text_model(preset.model).to(device)
        g = torch.Generator().manual_seed(0)
        batches = [random_batch(args.batch_size, 40, 20000, g, device) for _ in range(2)]
        lam = preset.train.free_bits_budget / max(model.num_groups, 1)
        profile(f"text training step, {args.text_preset} {args.text_model}, batch {args.batch_size}",
                training(model, batches, lam), args, device)


if __name__ == "__main__":
    run_cli(main)
