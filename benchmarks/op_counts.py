#!/usr/bin/env python
"""Operators dispatched per training step, by phase: a device-independent stand-in for kernel launches.

    python benchmarks/op_counts.py                                  # CIFAR-10 image step and biva-lstm text step
    python benchmarks/op_counts.py --what image --json counts.json
    python benchmarks/op_counts.py --what text --text-batch-size 4 --check-batch-size 8

One training step is run on the CPU under a torch.utils._python_dispatch.TorchDispatchMode that counts
every aten operator reaching the backend, by phase, the way shared/engine.py's Trainer._update runs
a step (one micro-batch, one process): ``forward`` (shared.objective.ElboObjective.loss, i.e.
shared.objective.training_loss, under autocast), ``backward`` ((loss / A).backward()), ``guard`` (the
non-finite flag, the step's figures, shared.optim.grad_norm, the skip guard and the one host transfer),
``optimizer`` (torch.optim.Adamax's step and zero_grad) and ``ema`` (shared.ema.EMA.update). The
count, not the time, is the figure: it is the same on any machine for the same graph.

Image: the CIFAR-10 preset (biva_image.presets.get_preset("cifar10"), biva_image.model.ImageVAE,
channels_last maps as training runs them) at batch 48. Text: the paper-sized ``biva-lstm`` (the
``paper`` text preset); its GPU batch, 512, needs gigabytes of activations on a CPU, so a smaller batch
is counted and --check-batch-size counts a second one: equal counts show that the batch size does not
change the graph (the sentences of one batch share one length, as length-bucketed training draws them,
and both batches are drawn with the same length).

What differs from a GPU (read the counts with these in mind):
  * Adamax: the optimiser runs with foreach=True (--foreach cuda, the default), what torch picks for
    CUDA parameters (on a CPU it would pick the per-tensor loop); one _foreach_* operator launches
    one kernel per chunk of tensors on a GPU, so the optimiser's launches are several times its count.
  * autocast: the CPU's bf16 policy, which casts nearly the same operators as CUDA's (convolutions,
    matmuls, linear); each cast is one _to_copy here as there.
  * the LSTM: on a CPU (autocast or not) it runs in fp32 (biva_text.parts.run_lstm) through
    oneDNN or the per-step ATen loop, where CUDA runs one cuDNN operator per direction: the text
    count's LSTM share is not the GPU's (the operators listed as lstm / mkldnn_rnn_layer / per-step
    matmuls show it).
  * views (view, transpose, detach, ...; OpOverload.is_view) launch nothing: counted apart (``views``).
    So do the optimiser's operators on 0-dim tensors only (``host``): Adamax's step counters and bias
    corrections, CPU scalars on a GPU too. ``compute`` = operators - views - host, the closest figure
    to kernel launches; factory and copy operators stay in it.
  * the counted step is the second: the optimiser's first step also creates its state.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import time
import types
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
PHASES = ("forward", "backward", "guard", "optimizer", "ema")


class OpCounter(TorchDispatchMode):
    """Counts each aten operator that reaches the backend, under the current ``phase``."""

    def __init__(self):
        super().__init__()
        self.phase = "setup"
        self.calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.views: dict[str, int] = collections.Counter()
        self.host: dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.calls[self.phase][func.overloadpacket.__name__] += 1
        if getattr(func, "is_view", False):
            self.views[self.phase] += 1
        elif self.phase == "optimizer" and _scalars_only(args, kwargs):
            # Adamax's step counters (and its bias corrections from them) are 0-dim CPU tensors on a GPU
            # too (capturable=False): host work there, no launch.
            self.host[self.phase] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before


def _scalars_only(args, kwargs) -> bool:
    tensors = [t for t in pytree.tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
    return all(t.dim() == 0 for t in tensors)


def _sibling(name: str):
    """The module of benchmarks/<name>.py (the benchmarks folder is no package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_step(model, batch: dict, cfg, lam: float, autocast, counter: OpCounter, foreach: bool | None) -> dict:
    """One optimiser step of shared/engine.py's Trainer._update with one micro-batch on one process (A = 1,
    no fault injection, no collective), each part under its phase. The optimiser and the EMA are built
    first, as the Trainer builds them once, and one uncounted step runs first: the counted one is a
    steady-state step (the optimiser's state exists; its first step also creates it)."""
    from shared.distributions import TrainNoise
    from shared.ema import EMA
    from shared.objective import ElboObjective
    from shared.optim import grad_norm

    device = next(model.parameters()).device
    ema = EMA(model, cfg.ema_decay)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr, foreach=foreach)
    # ElboObjective.loss is training_loss on the batch moved to the device; the stub stands for the
    # Accelerator, of which the objective reads the device only (and no_sync, never at the last micro-batch).
    objective = ElboObjective(types.SimpleNamespace(device=device), model, cfg.analytic_kl)
    noise = TrainNoise()
    model.train()
    A, G, extras = 1, model.num_groups, objective.extras
    state = {"step": 0}

    def step(counter: OpCounter):
        with counter.in_phase("guard"):
            local = torch.zeros(5 + G + len(extras), dtype=torch.float64, device=device)
        with objective.sync(last=True):
            with counter.in_phase("forward"), autocast():
                loss, out = objective.loss(batch, noise, lam)
            with counter.in_phase("guard"):
                local[0] += ~torch.isfinite(loss.detach())
            with counter.in_phase("backward"):
                (loss / A).backward()  # Accelerator.backward without a grad scaler (no, bf16)
        with counter.in_phase("guard"):
            local[2] += loss.detach().double() / A
            local[3:-1] += objective.figures(out) / A
            objective.after_backward()
            norm = grad_norm(list(model.parameters()), cfg.grad_clip or None)
            norm = torch.as_tensor(norm, device=device).detach().double()
            local[0] += ~torch.isfinite(norm)
            if cfg.skip_threshold is not None:
                local[0] += norm > cfg.skip_threshold
            local[1] = 0.0
            local[-1] = 0.0
            figures = torch.cat([local, norm.view(1)]).tolist()  # the step's one host transfer
        if figures[0] != 0:
            raise RuntimeError("a counted step was skipped (non-finite loss or gradient): no update to count")
        with counter.in_phase("optimizer"):
            optimizer.step()
            state["step"] += 1
            optimizer.zero_grad(set_to_none=True)
        with counter.in_phase("ema"):
            ema.update(model, state["step"])
        return {"loss": figures[2], "grad_norm": figures[-1]}

    step(OpCounter())  # uncounted: creates the optimiser's state
    with counter:
        return step(counter)


def count_step(build, batch_size: int, mixed_precision: str, foreach: bool | None, seed: int = 0) -> dict:
    """Counts of one engine step: ``build(batch_size)`` returns (model, batch, train config, lambda)."""
    torch.manual_seed(seed)
    model, batch, cfg, lam = build(batch_size)
    dtype = {"bf16": torch.bfloat16}.get(mixed_precision)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    counter = OpCounter()
    t0 = time.perf_counter()
    figures = engine_step(model, batch, cfg, lam, autocast, counter, foreach)
    seconds = time.perf_counter() - t0
    phases = {}
    for phase in PHASES:
        calls = counter.calls.get(phase, collections.Counter())
        total, views, host = sum(calls.values()), counter.views.get(phase, 0), counter.host.get(phase, 0)
        phases[phase] = {"ops": total, "views": views, "host": host, "compute": total - views - host,
                         "by_op": dict(calls.most_common())}
    every = sum((counter.calls.get(p, collections.Counter()) for p in PHASES), collections.Counter())
    total = sum(every.values())
    views = sum(counter.views.get(p, 0) for p in PHASES)
    host = sum(counter.host.get(p, 0) for p in PHASES)
    return {"batch_size": batch_size, "mixed_precision": mixed_precision, "phases": phases,
            "total": {"ops": total, "views": views, "host": host, "compute": total - views - host},
            "top_ops": dict(every.most_common()), "num_params": sum(p.numel() for p in model.parameters()),
            "param_tensors": len(list(model.parameters())), "step_s_counted": round(seconds, 2), **figures}


def image_builder(preset_name: str, channels_last: bool = True):
    from biva_image.model import ImageVAE
    from biva_image.presets import get_preset
    from shared.nn import set_channels_last

    def build(batch_size: int):
        preset = get_preset(preset_name)
        model = set_channels_last(ImageVAE(preset.model), channels_last)
        C, H, W = preset.model.image_shape
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch_size, C, H, W), dtype=torch.uint8, generator=g)
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        lam = float(preset.train.free_bits or 0.0)  # lambda per group at the start of training
        return model, {"index": torch.arange(batch_size), "x": x}, preset.train, lam

    return build


def text_builder(preset_name: str, model_name: str, vocab_size: int, max_tokens: int):
    from biva_text.model import build_text_model
    from biva_text.presets import get_preset

    random_batch = _sibling("text_throughput").random_batch

    def build(batch_size: int):
        preset = get_preset(preset_name, model_name, vocab_size=vocab_size, max_tokens=max_tokens)
        model = build_text_model(preset.model)
        # One length for the batch (a length bucket); the generator's first draw is that length, so
        # every batch size gets the same one.
        g = torch.Generator().manual_seed(0)
        batch = random_batch(batch_size, max_tokens, vocab_size, g, "cpu", one_length=True)
        lam = preset.train.free_bits_budget / max(model.num_groups, 1)  # the schedule's first lambda
        return model, batch, preset.train, lam

    return build


def table(name: str, result: dict, rows: int) -> str:
    lines = [(f"\n=== {name}: batch {result['batch_size']}, {result['mixed_precision']} precision, "
              f"{result['num_params'] / 1e6:.2f}M parameters in {result['param_tensors']} tensors ==="),
             f"{'phase':<12}{'operators':>11}{'views':>9}{'host':>7}{'compute':>10}"]
    for phase in PHASES:
        p = result["phases"][phase]
        lines.append(f"{phase:<12}{p['ops']:>11,}{p['views']:>9,}{p['host']:>7,}{p['compute']:>10,}")
    t = result["total"]
    lines.append(f"{'total':<12}{t['ops']:>11,}{t['views']:>9,}{t['host']:>7,}{t['compute']:>10,}")
    lines.append("\nmost frequent operators (whole step; then forward / backward):")
    lines.append(f"{'operator':<34}{'step':>8}{'fwd':>8}{'bwd':>8}")
    fwd, bwd = result["phases"]["forward"]["by_op"], result["phases"]["backward"]["by_op"]
    for op, n in list(result["top_ops"].items())[:rows]:
        lines.append(f"{op:<34}{n:>8,}{fwd.get(op, 0):>8,}{bwd.get(op, 0):>8,}")
    if "check" in result:
        c = result["check"]
        lines.append(f"\nbatch {c['batch_size']}: {c['total_ops']:,} operators ("
                     f"{'the same count' if c['same'] else 'A DIFFERENT COUNT'}: per phase "
                     + ", ".join(f"{k} {v:,}" for k, v in c["per_phase"].items()) + ")")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["image", "text", "all"], default="all")
    p.add_argument("--image-preset", default="cifar10", help="image preset (default cifar10)")
    p.add_argument("--image-batch-size", type=int, default=48, help="default 48 (the GPU check's)")
    p.add_argument("--text-preset", default="paper", help="text preset (default paper)")
    p.add_argument("--text-model", default="biva-lstm", help="text model (default biva-lstm)")
    p.add_argument("--text-batch-size", type=int, default=4,
                   help="sentences counted (default 4; the GPU's 512 gives the same count, see --check-batch-size)")
    p.add_argument("--vocab-size", type=int, default=20000)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--check-batch-size", type=int, default=8,
                   help="count the text step at this batch too, and the image step at it, to show the batch "
                        "does not change the graph (0 skips; default 8)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16",
                   help="autocast of the forward pass (default bf16, the GPU check's headline precision)")
    p.add_argument("--foreach", choices=["cuda", "default"], default="cuda",
                   help="Adamax's foreach: cuda (True, what torch picks for CUDA parameters; default) or "
                        "default (torch's choice for these CPU tensors: the per-tensor loop)")
    p.add_argument("--rows", type=int, default=15, help="operators listed (default 15)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the count needs no speed)")
    p.add_argument("--json", type=Path, help="write every count there")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    foreach = True if args.foreach == "cuda" else None
    out = {"benchmark": "op_counts", "torch": torch.__version__, "device": "cpu", "foreach": args.foreach,
           "mixed_precision": args.mixed_precision, "phases": list(PHASES)}

    def run(name, build, batch_size):
        result = count_step(build, batch_size, args.mixed_precision, foreach)
        if args.check_batch_size and args.check_batch_size != batch_size:
            other = count_step(build, args.check_batch_size, args.mixed_precision, foreach)
            result["check"] = {"batch_size": args.check_batch_size, "total_ops": other["total"]["ops"],
                               "per_phase": {k: v["ops"] for k, v in other["phases"].items()},
                               "same": all(other["phases"][k]["by_op"] == result["phases"][k]["by_op"]
                                           for k in PHASES)}
        print(table(name, result, args.rows), flush=True)
        return result

    if args.what in ("image", "all"):
        out["image"] = {"preset": args.image_preset, "model": "biva",
                        **run(f"image step, {args.image_preset} preset", image_builder(args.image_preset),
                              args.image_batch_size)}
    if args.what in ("text", "all"):
        out["text"] = {"preset": args.text_preset, "model": args.text_model, "vocab_size": args.vocab_size,
                       "max_tokens": args.max_tokens,
                       **run(f"text step, {args.text_preset} {args.text_model}",
                             text_builder(args.text_preset, args.text_model, args.vocab_size, args.max_tokens),
                             args.text_batch_size)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: ({"total": v["total"], **{p: v["phases"][p]["ops"] for p in PHASES}}
                          if isinstance(v, dict) and "total" in v else v) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
