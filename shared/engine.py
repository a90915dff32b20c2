"""The one training engine (DESIGN.md §8), on Hugging Face Accelerate.

The same loop trains every model of both modalities with ``python``, ``accelerate launch`` or
``torchrun``: Adamax, EMA weights for evaluation and export, gradient accumulation, mixed precision,
free bits on plateau, update skipping on non-finite or huge gradients, periodic validation over the
whole validation set, atomic checkpoints through ``save_state`` and an exact ``--resume``
(mid-epoch data position, RNG, EMA, free-bits state) from the newest checkpoint whose files match the
checksums recorded when it was saved; a full disk stops the run and loses nothing.

Semi-supervised runs (DESIGN.md §9b; given a labelled set) draw at every optimiser step one batch from
the unlabelled stream and one from the labelled stream: two seeded ``BatchPlan`` streams, each with its
own position in the checkpoints (the small labelled set cycles through many epochs), both split over
processes and accumulation steps the same way.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import run_dir as rd
from . import tracking
from .debug_hooks import Faults, dump_state
from .distributions import TrainNoise
from .errors import DISK_FULL_EXIT_CODE, UserError
from .evaluate import evaluate, subset_info
from .free_bits import FreeBitsSchedule, free_bits_kl
from .model import LatentVariableModel

PREEMPT_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "stopped by signal" (130 after SIGINT)
STORAGE_EXIT_CODE = DISK_FULL_EXIT_CODE  # a checkpoint or the weights could not be written (disk full)


def use_cpu() -> bool:
    """Accelerate runs several processes on the CPU (gloo) only when it is told to use the CPU: tell it
    so when a launcher (torchrun, accelerate launch) started several processes on a machine without GPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched_processes() > 1 and not gpu


def native_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX512, fastest with AVX512-BF16 or AMX;
    torch.ops.mkldnn._is_mkldnn_bf16_supported). Without them bf16 convolutions fall back to slow
    generic code: the binary preset's training step measured 8.4x slower in bf16 than in fp32 on a
    2-core AVX2 EPYC (benchmarks/image_throughput.py)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())  # a torch without the check: assume so, warn never


def cpu_bf16_warning(device_type: str, mixed_precision: str) -> str | None:
    """One line for a user who asked for bf16 on a CPU without bf16 kernels; None otherwise."""
    if device_type != "cpu" or mixed_precision != "bf16" or native_cpu_bf16():
        return None
    return ("warning: --mixed-precision bf16 on a CPU without bf16 kernels (no AVX512, AVX512-BF16 or AMX) "
            "runs on slow generic code, several times slower than fp32 (8.4x for the binary preset's step "
            "on an AVX2 CPU); --mixed-precision no is the faster choice here")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
HEAP_KEEP_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap, and freed memory stays there


def keep_freed_cpu_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next step instead of returning it to the system.

    By default glibc serves every block above a dynamic threshold (128 KiB to 32 MiB) with a fresh
    mmap and unmaps it when freed, and trims the heap's top, so a CPU training step page-faults on
    (and zeroes) the memory of nearly every activation again, every step. Raising the mmap and trim
    thresholds keeps that memory mapped: measured on a 2-core AVX512-BF16 EPYC
    (benchmarks/image_throughput.py with and without BIVA_GLIBC_MALLOC=1, means of 3 interleaved
    rounds), the binary preset's step 1.06x faster in fp32 (29.3 -> 31.1 images/s) and 1.03x in bf16
    (50.0 -> 51.5). The process holds on to its peak memory instead of returning it between steps, as torch's
    CUDA allocator does on a GPU. Training on a CPU calls this; BIVA_GLIBC_MALLOC=1 in the environment
    leaves glibc's defaults. Returns whether the settings were applied (False: not glibc, or opted out)."""
    if os.environ.get("BIVA_GLIBC_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, HEAP_KEEP_BYTES), (_M_TRIM_THRESHOLD, HEAP_KEEP_BYTES), (_M_TOP_PAD, 1 << 28)))


def launched_processes() -> int:
    """How many processes the launcher says it started (torchrun, accelerate launch, mpirun)."""
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return max(int(os.environ.get(name, "1")) for name in names)


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched), readable before the group forms."""
    names = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
    return max(int(os.environ.get(name, "0")) for name in names)


def process_state():
    """Accelerate's process state, set up so that CPU processes started by torchrun join (gloo).
    Scripts call this instead of ``accelerate.PartialState()``. ``BIVA_DIST_TIMEOUT_S`` sets the
    process group's collective timeout (torch's default otherwise; the tests shorten it)."""
    from accelerate import PartialState

    timeout = os.environ.get("BIVA_DIST_TIMEOUT_S")
    if timeout:
        from datetime import timedelta

        return PartialState(cpu=use_cpu(), timeout=timedelta(seconds=float(timeout)))
    return PartialState(cpu=use_cpu())


def reset_state(model: "torch.nn.Module", parts: list[str]) -> dict:
    """Copies of the state-dict entries of the modules named ``parts`` (--init-reset); one line naming
    the modules there are when a name is not one of them."""
    names = dict(model.named_modules())
    unknown = [p for p in parts if p not in names or not p]
    if unknown:
        tops = sorted(n for n in names if n and "." not in n)
        raise UserError(f"--init-reset {' '.join(unknown)}: not a part of this model; its parts are {', '.join(tops)}")
    prefixes = tuple(p + "." for p in parts)
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def default_resume_command(script: str | None = None, argv: list[str] | None = None) -> str:
    """The command that continues this run: the same launcher and flags, plus --resume. A script's
    ``main(argv)`` called from Python (a benchmark) passes its own file and ``argv``: the command is then
    that script's, not the caller's."""
    args = list(sys.argv) if argv is None else [os.path.relpath(script), *map(str, argv)]
    if "--resume" not in args:
        args.append("--resume")
    world = launched_processes()
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by accelerate launch
        launcher = "accelerate launch"
    elif world > 1:
        launcher = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)}"
    else:
        launcher = "python"
    return f"{launcher} {shlex.join(args)}"


def compile_wanted(setting: bool | str, device_type: str, mixed_precision: str = "no") -> bool:
    """Whether TrainConfig.compile asks for a compiled training step here: True or False as given; "cpu"
    (the binary preset's default) where the step runs on a CPU in fp32 or bf16, the cases measured
    faster than eager on a 2-core CPU (fp32 1.03-1.10x in separate processes, bf16 1.20x in one);
    elsewhere (GPUs, fp16) it stays eager until measured."""
    if setting not in (True, False, "cpu"):
        raise UserError(f"compile must be true, false or \"cpu\", got {setting!r}")
    if setting != "cpu":
        return setting
    wanted = device_type == "cpu" and mixed_precision in ("no", "bf16")
    if wanted and not _inductor_finds_a_compiler():  # a default must not fail where inductor cannot build
        warnings.warn("the preset compiles its training step on a CPU, but inductor finds no C++ compiler "
                      "(g++, clang++ or $CXX): training runs eager (--no-compile silences this)", stacklevel=2)
        return False
    return wanted


def _inductor_finds_a_compiler() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - whatever inductor raises for "no compiler"
        return False
    return True


def compile_optimizer_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """--compile takes the optimiser's update into the compiled step too: ``optimizer.step`` becomes a
    torch.compile'd function (inductor fuses Adamax's per-tensor loop of lerp, abs, max, addcdiv into a
    few kernels; PyTorch's "compiled optimizer" recipe). The learning rate stays a constant of the
    graph, as nothing schedules it. Measured on a 2-core CPU, binary preset: 13 ms less per step, about
    a minute more of compiling."""
    optimizer.step = torch.compile(optimizer.step)
    return optimizer


def grad_norm(parameters, max_norm: float | None = None, accelerator=None) -> torch.Tensor:
    """The total 2-norm of the gradients (the skip guard's figure), clipping them to ``max_norm`` when set.

    ``torch.nn.utils.clip_grad_norm_(params, inf)``, the usual way to read the norm, still multiplies
    every gradient by 1.0: a pass over all of them for nothing (3.7 ms of the binary preset's 1.4 s
    step on a 2-core CPU). Without ``max_norm`` the norm alone is taken. With an ``accelerator`` its
    ``clip_grad_norm_`` is used wherever gradients may be sharded (FSDP, DeepSpeed, XLA, ...), and fp16
    gradients are unscaled first, as it does."""
    if accelerator is not None:
        from accelerate.utils import DistributedType

        plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
        if max_norm is not None or accelerator.distributed_type not in plain:
            return accelerator.clip_grad_norm_(parameters, float("inf") if max_norm is None else max_norm)
        accelerator.unscale_gradients()
    elif max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class EMA:
    """Exponential moving average of the weights, kept in fp32; used for evaluation and export."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Short warm-up of the decay so early evaluations are not dominated by the initialisation.
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # one fused launch per tensor list
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


class BatchPlan:
    """Which examples make each micro-batch: a seeded permutation per epoch, cut into global batches,
    each split over processes and accumulation steps. Deterministic given (seed, epoch), so a resumed
    run sees the same data order mid-epoch. ``stream`` tells apart plans that share a seed (the labelled
    stream of a semi-supervised run is stream 1).

    With ``lengths`` (one per example; text: tokens per sentence) the batches are length buckets: the
    epoch's permutation is sorted by length within pools of ``POOL_BATCHES`` global batches, cut into
    batches, and the batches are shuffled, so a batch holds sentences of nearly one length (an LSTM
    runs to its batch's longest sentence) while every example still comes once per epoch in a random
    batch order. Every process computes the same order from (seed, epoch)."""

    POOL_BATCHES = 64  # global batches sorted together: wide enough that a batch spans ~one length

    def __init__(self, n: int, global_batch: int, world: int, rank: int, accum: int, seed: int, stream: int = 0,
                 lengths=None):
        self.n, self.global_batch, self.world, self.rank, self.accum, self.seed = n, global_batch, world, rank, accum, seed
        self.stream = stream
        self.micro = global_batch // (world * accum)
        self.steps_per_epoch = n // global_batch
        # Kept as given (a memory-mapped array stays on disk: BookCorpus has ~70M sentences); read per pool.
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and self.lengths.shape != (n,):
            raise ValueError(f"lengths has shape {self.lengths.shape}, expected ({n},)")
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of examples; its first steps_per_epoch x global_batch make the batches."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.stream * 0x9E3779B9)
            perm = torch.randperm(self.n, generator=g)
            if self.lengths is not None:
                perm = self._bucketed(perm, g)
            self._perm = (epoch, perm)
        return self._perm[1]

    def _bucketed(self, perm: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # The remainder that makes no full batch is dropped at random, as without buckets.
        B, steps = self.global_batch, self.steps_per_epoch
        kept = perm[:steps * B]
        pool = self.POOL_BATCHES * B
        # A stable sort keeps equal lengths in their random order.
        kept = torch.cat([p[torch.sort(torch.from_numpy(self.lengths[p.numpy()].astype(np.int64)), stable=True).indices]
                          for p in kept.split(pool)])
        order = torch.randperm(steps, generator=g)
        return torch.cat([kept.view(steps, B)[order].reshape(-1), perm[steps * B:]])

    def micro_batches(self, epoch: int, start: int):
        """Index lists of this process's micro-batches from global batch ``start`` of ``epoch``."""
        perm = self.permutation(epoch)
        per_rank = self.global_batch // self.world
        for b in range(start, self.steps_per_epoch):
            batch = perm[b * self.global_batch:(b + 1) * self.global_batch]
            mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            for j in range(self.accum):
                yield mine[j * self.micro:(j + 1) * self.micro].tolist()


def training_loss(model, batch: dict, noise, lam: float, analytic_kl: bool = False):
    """The training loss of one micro-batch, (loss, model output): -log p(x|z) averaged over the batch
    plus the free-bits KL with lambda ``lam`` per group (DESIGN.md §5). Benchmarks call it too, so they
    time what the engine runs."""
    out = model(batch, noise, analytic_kl=analytic_kl)
    kl_for_loss = out.kl_analytic if (analytic_kl and out.kl_analytic is not None) else out.kl
    return -out.log_px.mean() + (free_bits_kl(kl_for_loss, lam) if out.kl.shape[1] else 0.0), out


def labelled_batch_size(cfg, n_labelled: int, world: int) -> int:
    """The global labelled batch of a semi-supervised run: --labelled-batch-size, by default
    min(--batch-size, labelled examples); it must split over processes x --grad-accum like --batch-size.
    Scripts call this before they write anything, so a bad value changes no file."""
    size = cfg.labelled_batch_size or min(cfg.batch_size, n_labelled)
    if size > n_labelled:
        raise UserError(f"--labelled-batch-size {size} is larger than the {n_labelled} labelled examples; lower it")
    if size % (world * cfg.grad_accum):
        raise UserError(f"the labelled batch of {size} does not split over {world} process(es) x --grad-accum "
                        f"{cfg.grad_accum}; set --labelled-batch-size to a multiple of {world * cfg.grad_accum}")
    return size


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of this epoch consumed (skipped updates included)
    skipped_total: int = 0
    skipped_in_row: int = 0
    examples_seen: int = 0
    # Semi-supervised runs: the labelled stream's position (it cycles through many epochs per unlabelled one).
    labelled_epoch: int = 0
    labelled_batch_in_epoch: int = 0


class LogWindow:
    """Sums of the training figures since the last ``train`` record; saved in checkpoints, so a run
    resumed between two records writes the same averages as an uninterrupted one."""

    def __init__(self):
        self.count, self.loss, self.elbo, self.grad_norm = 0, 0.0, 0.0, 0.0
        self.kl: list[float] = []
        self.cross_entropy, self.accuracy = 0.0, 0.0  # semi-supervised runs: the labelled batches' classifier

    def add(self, result: dict) -> None:
        self.count += 1
        self.loss += result["loss"]
        self.elbo += result["elbo"]
        self.grad_norm += result["grad_norm"]
        self.cross_entropy += result.get("cross_entropy", 0.0)
        self.accuracy += result.get("accuracy", 0.0)
        kl = result["kl_per_group"]
        self.kl = list(kl) if not self.kl else [a + b for a, b in zip(self.kl, kl)]

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class Trainer:
    def __init__(self, run: rd.RunConfig, build_model: Callable[[], LatentVariableModel],
                 train_set: Dataset, valid_set: Dataset, output_dir: str | Path, resume: bool = False,
                 on_evaluate: Callable | None = None, resume_command: str | None = None,
                 labelled_set: Dataset | None = None, init_weights: str | Path | None = None):
        """``labelled_set`` (items with ``"y"``) makes the run semi-supervised (DESIGN.md §9b):
        ``train_set`` is then the unlabelled stream, and each optimiser step draws one batch of each.
        ``init_weights``: a folder whose model.safetensors are the initial weights (fine-tuning, --init-from;
        shared.train.start_weights); a checkpoint found by ``resume`` replaces them."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.run, self.cfg = run, run.train
        self.output_dir = Path(output_dir)
        self.train_set, self.valid_set, self.labelled_set = train_set, valid_set, labelled_set
        self.semi = labelled_set is not None
        self.on_evaluate = on_evaluate
        self.resume_command = resume_command or default_resume_command()
        cfg = self.cfg
        process_state()
        self.tracker_names = tracking.resolve(cfg.report_to, f"report_to {cfg.report_to}")
        from accelerate import PartialState

        # the device accelerate will pick (one process-wide state, shared with the Accelerator below)
        self.compiled = compile_wanted(cfg.compile, PartialState(cpu=use_cpu()).device.type, cfg.mixed_precision)
        self.accelerator = Accelerator(
            cpu=use_cpu(),
            mixed_precision=cfg.mixed_precision,
            dynamo_backend="inductor" if self.compiled else None,
            step_scheduler_with_optimizer=False,
            log_with=self.tracker_names or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / tracking.LOG_DIR)),
        )
        acc = self.accelerator
        warning = cpu_bf16_warning(acc.device.type, cfg.mixed_precision)
        if warning and acc.is_main_process:
            print(warning, file=sys.stderr)
        if acc.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
        else:
            keep_freed_cpu_memory()
        world = acc.num_processes
        if world < launched_processes():
            raise RuntimeError(f"{launched_processes()} processes were started but only {world} joined: create the "
                               f"process state with shared.engine.process_state(), not PartialState()")
        self.faults = Faults(acc.process_index)
        self.pending_metrics: list[dict] = []  # records a full disk kept out of metrics.jsonl (main process)
        if cfg.batch_size % (world * cfg.grad_accum):
            raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} process(es) x "
                            f"--grad-accum {cfg.grad_accum}; choose a multiple of {world * cfg.grad_accum}")
        lengths = None
        if cfg.length_buckets:
            lengths = getattr(train_set, "lengths", None)
            if lengths is None:
                raise ValueError("length_buckets needs a training set with per-example lengths (.lengths)")
        self.plan = BatchPlan(len(train_set), cfg.batch_size, world, acc.process_index, cfg.grad_accum, cfg.seed,
                              lengths=lengths)
        if self.plan.steps_per_epoch == 0:
            raise UserError(f"the training set has {len(train_set)} examples, fewer than one batch of "
                            f"{cfg.batch_size}; lower --batch-size")
        if len(valid_set) == 0:
            raise UserError("the validation set is empty; give more data or a validation split")
        if self.semi:
            self.labelled_plan = self._labelled_plan(world, acc.process_index)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else (cfg.epochs or 1) * self.plan.steps_per_epoch

        # Same initial weights on every process; then per-process training noise.
        torch.manual_seed(cfg.seed)
        model = build_model()
        if init_weights is not None:  # before the EMA copy: both start from the source's weights
            reset = (run.init_from or {}).get("reset") or []
            fresh = reset_state(model, reset)  # this model's own random initial values of those parts
            rd.load_weights(init_weights, model)
            model.load_state_dict(fresh, strict=False)
        self.ema = EMA(model, cfg.ema_decay)
        optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
        if self.compiled:
            compile_optimizer_step(optimizer)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema.model.to(acc.device)
        self.raw_model: LatentVariableModel = acc.unwrap_model(self.model)
        if self.semi:
            self._check_semi_model()
        from accelerate.utils import set_seed

        set_seed(cfg.seed + 1, device_specific=True)
        G = self.raw_model.num_groups
        budget = cfg.free_bits * G if cfg.free_bits is not None else cfg.free_bits_budget
        self.free_bits = FreeBitsSchedule(budget, G, cfg.free_bits_patience, cfg.free_bits_factor,
                                          cfg.free_bits_threshold, cfg.free_bits_min, cfg.free_bits_threshold_mode)
        self.state = TrainState()
        self.window = LogWindow()
        self._stop_signal: str | None = None
        self.eval_batch_size = cfg.eval_batch_size or max(self.plan.micro, 1)
        subset = subset_info(len(valid_set), cfg.eval_examples, cfg.eval_seed, getattr(valid_set, "labels", None))
        if subset is not None and self.is_main:  # the same examples at every validation (evaluate draws them)
            print(f"validation: a fixed subset of {subset['size']} of {subset['of']} examples drawn with eval_seed "
                  f"{subset['seed']}" + (", stratified by class" if subset["stratified"] else ""), file=sys.stderr)
        self.resumed_from: int | None = None
        # --max-minutes: training time of earlier sessions of this run (from the checkpoint) + this one's
        self._seconds_before, self._clock = 0.0, None
        self.exported_step: int | None = None  # whose EMA weights model.safetensors holds, once known
        if resume:
            self._resume()
        self._start_tracking(resume)

    # ------------------------------------------------------------------ semi-supervised runs
    def _labelled_plan(self, world: int, rank: int) -> BatchPlan:
        """The labelled stream: its own seeded permutations (stream 1), split like the unlabelled batches."""
        cfg, n = self.cfg, len(self.labelled_set)
        size = labelled_batch_size(cfg, n, world)
        return BatchPlan(n, size, world, rank, cfg.grad_accum, cfg.seed, stream=1)

    def _check_semi_model(self) -> None:
        from .semi import alpha_rule

        classes = getattr(self.raw_model, "num_classes", 0)
        if not classes:
            raise ValueError("a semi-supervised run needs a model with num_classes > 0")
        # alpha weighs the classifier's cross-entropy in the labelled loss (DESIGN.md §9b).
        self.alpha = alpha_rule(len(self.labelled_set), len(self.train_set), self.cfg.classifier_weight)
        if self.is_main:
            print(f"semi-supervised: {len(self.labelled_set)} labelled / {len(self.train_set)} unlabelled training "
                  f"examples, {classes} classes, labelled batch {self.labelled_plan.global_batch}, classifier weight "
                  f"alpha = {self.alpha:.4g} (beta {self.cfg.classifier_weight} x (N_l + N_u) / N_l)", file=sys.stderr)

    @torch.no_grad()
    def classification_error(self) -> float:
        """Error of argmax q(y|x) under the EMA weights on the validation examples that ``validate``
        scores (the same eval_examples subset), sharded over processes like ``evaluate``."""
        from .distributions import HashedNoise
        from .evaluate import subset_indices

        acc, labels = self.accelerator, self.valid_set.labels
        chosen = subset_indices(len(self.valid_set), self.cfg.eval_examples, self.cfg.eval_seed, labels)
        mine = chosen[acc.process_index::acc.num_processes].tolist()
        counts = torch.zeros(2, dtype=torch.float64, device=acc.device)  # wrong, scored
        model = self.ema.model.eval()
        for start in range(0, len(mine), self.eval_batch_size):
            part = mine[start:start + self.eval_batch_size]
            batch = torch.utils.data.default_collate([self.valid_set[i] for i in part])
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with acc.autocast():
                logits = model.classify(batch, HashedNoise(self.cfg.eval_seed, batch["index"]))
            truth = labels[torch.as_tensor(part)].to(acc.device)
            counts[0] += (logits.argmax(-1) != truth).sum()
            counts[1] += len(part)
        if acc.num_processes > 1:
            counts = acc.reduce(counts, reduction="sum")
        return float(counts[0] / counts[1])

    def _semi_loss(self, pair: tuple[dict, dict], noise, lam: float) -> tuple[torch.Tensor, object]:
        """The semi-supervised loss of one (unlabelled, labelled) micro-batch pair, on the unwrapped model
        (its gradients are averaged over processes in ``_update``)."""
        from .semi import semi_supervised_loss

        unlabelled, labelled = ({k: v.to(self.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                                 for k, v in batch.items()} for batch in pair)
        terms = semi_supervised_loss(self.raw_model, labelled, unlabelled, noise, lam, self.alpha,
                                     analytic_kl=self.cfg.analytic_kl)  # lam: the same lambda for every group
        return terms.loss, terms

    def _average_gradients(self) -> None:
        """What DDP does after the last micro-batch, done by hand for semi-supervised runs: their loss calls
        the model several times (classifier, labelled and unlabelled passes), outside DDP's forward."""
        grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
        if self.accelerator.num_processes == 1 or not grads:
            return
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])

    # ------------------------------------------------------------------ bookkeeping
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, record: dict) -> None:
        if self.is_main:
            self.pending_metrics.append(record)
            self.write_metrics()
            self.tracking.log(record)  # after the source of truth is written (or held, on a full disk)

    def write_metrics(self, stop_when_full: bool = False) -> None:
        """Append the records not yet in metrics.jsonl. On a full disk (or quota) the file is left as it
        was and the records stay in memory, with one warning: training goes on, the next log writes
        them if space was freed, and the next checkpoint writes them first, so with the disk still
        full it stops every process there, with one line (``stop_when_full``, as every checkpoint write)."""
        if not self.pending_metrics:
            return
        full = self.faults.full_since("enospc-metrics", self.state.step)
        try:
            rd.append_metrics(self.output_dir, *self.pending_metrics, fail_after=10 if full else None)
        except OSError as error:
            if stop_when_full or not rd.is_disk_full(error):
                raise
            if len(self.pending_metrics) == 1:  # the first record held back: warn once per full spell
                tqdm.write(f"warning: {os.strerror(error.errno).lower()} ({error.filename}): metrics are held in "
                           f"memory from step {self.state.step} and written once there is space; the next "
                           f"checkpoint stops the run if there is still none", file=sys.stderr)
            return
        self.pending_metrics.clear()

    def _start_tracking(self, resume: bool) -> None:
        """Trackers, once the resumed checkpoint is known. TensorBoard hides what the interrupted launch
        logged from that step on, so the records of that step left in metrics.jsonl, and the samples of an
        evaluation there, are logged again (tracking.py)."""
        resumed = self.resumed_from if resume else None
        had_events = (self.output_dir / tracking.LOG_DIR).is_dir()
        self.tracking = tracking.Tracking(self.accelerator, self.tracker_names, self.output_dir, self.run.to_json(),
                                          resumed_from=resumed)
        if resumed is None or self.tracking.log_dir is None:
            return
        # A run that starts reporting on --resume gets its earlier scalars too.
        again = [r for r in rd.read_metrics(self.output_dir) if r.get("step", 0) >= (resumed if had_events else 0)]
        for record in again:
            self.tracking.log(record, only="tensorboard")
        if any(r.get("split") == "valid" for r in again):
            self._evaluate_hook(only="tensorboard")

    def _trainer_state(self) -> dict:
        return {"train": vars(self.state), "free_bits": self.free_bits.state_dict(),
                "log_window": self.window.state_dict(), "train_seconds": self.train_seconds,
                "metrics_bytes": rd.metrics_size(self.output_dir),
                "model": self.run.model, "modality": self.run.modality}

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        root = self.output_dir / rd.CHECKPOINTS
        final = root / f"step_{self.state.step}"
        if (final / "trainer_state.json").is_file():
            return final
        tmp = root / f".tmp_step_{self.state.step}"
        writing = f"writing checkpoint {final}"

        def make_folder():
            self.write_metrics(stop_when_full=True)  # the checkpoint records the length of metrics.jsonl
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        def save_state():
            acc.save_state(str(tmp))
            self.faults.disk_full_if("enospc-save", self.state.step, tmp / f"random_states_{acc.process_index}.pkl")

        def finish():
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump({**self._trainer_state(), "manifest": rd.MANIFEST}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            rd.write_manifest(tmp)  # last: the checksums of every file above
            self.faults.kill_if("kill-saved", self.state.step)
            if final.exists():  # an incomplete leftover of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)  # the checkpoint exists only once it is complete

        def export():
            self.faults.kill_if("kill-renamed", self.state.step)
            self.faults.disk_full_if("enospc-export", self.state.step, self.output_dir / (rd.WEIGHTS + ".tmp"))
            rd.export_weights(self.output_dir, ema_state)
            self.exported_step = self.state.step
            rd.prune_checkpoints(self.output_dir, self.cfg.keep_checkpoints)

        # Each stage ends in a collective that tells every process whether any failed, so that a full disk
        # on one process stops all of them instead of leaving the others waiting in a collective.
        ema_state = self.ema.state_dict()
        self._write_stage(make_folder if self.is_main else None, writing)
        self._write_stage(save_state, writing)
        self._write_stage(finish if self.is_main else None, writing)
        self._write_stage(export if self.is_main else None, f"exporting the weights of checkpoint {final}")
        return final

    def _write_stage(self, write: Callable[[], None] | None, doing: str) -> None:
        """Run ``write`` (on the processes that have one), then agree on failures across processes.
        A full disk (or quota) stops every process with one line and STORAGE_EXIT_CODE, after the
        temporary files are removed; any other error is raised again where it happened."""
        error = None
        if write is not None:
            try:
                write()
            except Exception as err:  # noqa: BLE001  (re-raised below, once every process knows)
                error = err
        failures = [(self.accelerator.process_index, getattr(error, "errno", None) if rd.is_disk_full(error) else None,
                     str(error), getattr(error, "filename", None))] if error else []
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            failures = [f for f in gather_object([failures[0] if failures else None]) if f is not None]
        if not failures:
            return
        if self.is_main:
            shutil.rmtree(self.output_dir / rd.CHECKPOINTS / f".tmp_step_{self.state.step}", ignore_errors=True)
            (self.output_dir / (rd.WEIGHTS + ".tmp")).unlink(missing_ok=True)
        full = [f for f in failures if f[1] is not None]
        if not full:
            if error is not None:
                raise error
            raise RuntimeError(f"process {failures[0][0]} failed while {doing}: {failures[0][2]}")
        if self.is_main:
            tqdm.write(f"stopped: {self._disk_full_message(full[0], doing)}", file=sys.stderr)  # below the bar
        raise SystemExit(STORAGE_EXIT_CODE)

    def _disk_full_message(self, failure: tuple, doing: str) -> str:
        rank, number, _, filename = failure
        what = os.strerror(number).lower() + (f" on process {rank}" if self.accelerator.num_processes > 1 else "")
        latest = rd.latest_checkpoint(self.output_dir)
        need = f"a checkpoint takes about {rd.folder_size(latest[1]) / 1e6:.1f} MB, " if latest else ""
        free = shutil.disk_usage(self.output_dir).free / 1e6
        if latest is None:
            kept = "no checkpoint is complete yet (the resume starts over)"
        else:
            kept = f"the last good checkpoint {latest[1]} (step {latest[0]}) is intact"
        weights = self.output_dir / rd.WEIGHTS
        if self.exported_step is not None:
            kept += f" and {weights} holds the weights of step {self.exported_step}, intact"
            if latest is not None and latest[0] != self.exported_step:
                kept += " (the resume exports the checkpoint's)"
        elif weights.is_file():
            kept += f" and {weights} is unchanged"
        return (f"{what} ({filename or self.output_dir}) while {doing}; {need}{free:.1f} MB free there; {kept}; "
                f"free some space, then resume with: {self.resume_command}")

    def _resume(self) -> None:
        saved = rd.read_run_config(self.output_dir)
        if saved.modality != self.run.modality or saved.model != self.run.model:
            raise UserError(f"{self.output_dir} was made by a different model ({saved.modality}, preset "
                            f"{saved.preset}); resume with the same settings or choose a new --output-dir")
        found = rd.checkpoints(self.output_dir)
        if not found:
            return  # stopped before its first checkpoint: start over with the saved config
        damaged = []
        for step, path in reversed(found):  # the newest intact checkpoint
            state = self._load_checkpoint(path)
            if isinstance(state, dict):
                break
            damaged.append((path, state))
        else:
            raise UserError(f"cannot resume: every checkpoint in {self.output_dir / rd.CHECKPOINTS} is damaged ("
                            + "; ".join(f"{p.name}: {why}" for p, why in damaged)
                            + "); remove that folder to start the run over, or choose a new --output-dir")
        self.state = TrainState(**state["train"])
        self.free_bits.load_state_dict(state["free_bits"])
        self._seconds_before = float(state.get("train_seconds", 0.0))  # absent before --max-minutes existed
        if "log_window" in state:
            self.window.load_state_dict(state["log_window"])
        self.resumed_from = step
        ema_state = self.ema.state_dict()

        def tidy():
            for bad, why in damaged:  # kept for inspection, out of the way of latest_checkpoint and pruning
                aside = rd.set_aside(bad)
                print(f"warning: checkpoint {bad} is damaged ({why}); moved it aside to {aside.name}; using an older "
                      f"checkpoint", file=sys.stderr)
            print(f"resuming from {path} (step {step})", file=sys.stderr)
            rd.truncate_metrics(self.output_dir, step, state.get("metrics_bytes"))
            # A run killed between the rename and the export left older weights at the top.
            rd.export_weights(self.output_dir, ema_state)
            self.exported_step = step

        self._write_stage(tidy if self.is_main else None, f"resuming from checkpoint {path}")

    def _load_checkpoint(self, path: Path) -> dict | str:
        """Load a checkpoint into the model, optimiser, RNG and EMA and return its trainer state, or say
        what is damaged in it. The main process checks the files against the manifest; every process
        then loads; all take the same decision."""
        from accelerate.utils import gather_object

        def agree(problem: str | None) -> str | None:
            if self.accelerator.num_processes > 1:
                problem = next((p for p in gather_object([problem]) if p is not None), None)
            return problem

        problem = None
        if self.is_main:
            try:  # checkpoints written before manifests existed are loaded unchecked
                marked = "manifest" in json.loads((path / "trainer_state.json").read_text())
                problem = rd.checkpoint_damage(path, expect_manifest=marked)
            except (ValueError, TypeError, UnicodeDecodeError):
                problem = rd.checkpoint_damage(path, True) or "trainer_state.json: not valid JSON"
        problem = agree(problem)
        if problem is not None:
            return problem
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("model") != self.run.model:
            raise UserError(f"checkpoint {path} was written by a different model; choose a new --output-dir")
        try:
            self.accelerator.load_state(str(path))  # weights, optimiser and every process's RNG
            ema_state = load_file(str(path / "ema.safetensors"))
            self.ema.load_state_dict({k: v.to(self.accelerator.device) for k, v in ema_state.items()})
        except Exception as err:  # noqa: BLE001  (a checkpoint older than manifests, damaged)
            problem = f"loading it failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        problem = agree(problem)
        return state if problem is None else problem

    def _handle_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name

    # ------------------------------------------------------------------ evaluation
    def validate(self, final: bool = False, log: bool = True) -> dict:
        """Validate the EMA model. A scheduled validation logs its record, steps the free-bits schedule
        and calls ``on_evaluate``; the ``final`` one at the end of a run (after the last checkpoint)
        leaves the schedule alone, and with ``log=False`` only returns the record."""
        res = evaluate(self.ema.model, self.valid_set, batch_size=self.eval_batch_size, seed=self.cfg.eval_seed,
                       accelerator=self.accelerator, max_examples=self.cfg.eval_examples, desc="valid")
        record = {"step": self.state.step, "split": "valid", "elbo": res.elbo, "kl": res.kl,
                  "kl_per_group": res.kl_per_group, "bits_per_dim": res.bits_per_dim_elbo,
                  "nats_per_dim": -res.elbo * res.num_examples / max(res.num_dims, 1.0),
                  "free_bits_budget": self.free_bits.budget, "num_examples": res.num_examples}
        if getattr(self.ema.model, "num_classes", 0) and getattr(self.valid_set, "labels", None) is not None:
            record["classification_error"] = self.classification_error()
        if not log:
            return record
        self.log(record)
        self.faults.kill_if("kill-eval", self.state.step)
        if not final and self.raw_model.num_groups:  # no latents (a language model): nothing to schedule
            message = self.free_bits.step(res.elbo)
            if message:
                self.log({"step": self.state.step, "event": "free_bits", "budget": self.free_bits.budget,
                          "per_group": self.free_bits.per_group})
                if self.is_main:
                    tqdm.write(message)
        self._evaluate_hook()
        self.accelerator.wait_for_everyone()
        return record

    def _evaluate_hook(self, only: str | None = None) -> None:
        """``on_evaluate`` on the main process; what it returns (samples, see Tracking.log_media) goes to the trackers."""
        if self.on_evaluate is not None and self.is_main:
            # Its own seeded RNG: samples are the same after a resume, and drawing them never moves the
            # training noise (which would make a run depend on whether samples are written).
            device = self.accelerator.device
            with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [],
                                       device_type=device.type if device.type != "cpu" else None):
                torch.manual_seed(self.cfg.eval_seed * 1_000_003 + self.state.step)
                try:
                    media = self.on_evaluate(self.ema.model, self.state.step, self.output_dir)
                except OSError as error:
                    if not rd.is_disk_full(error):
                        raise
                    # Samples are a view of the run, not its state: a full disk skips them, with one line.
                    tqdm.write(f"warning: {os.strerror(error.errno).lower()} ({error.filename}): no samples written "
                               f"at step {self.state.step}", file=sys.stderr)
                    return
            self.tracking.log_media(media, self.state.step, only=only)

    # ------------------------------------------------------------------ training
    def _loader(self):
        """This process's micro-batches of each optimiser step; in a semi-supervised run, (unlabelled,
        labelled) pairs from two streams, each resuming at its own position in ``self.state``."""
        unlabelled = self._stream(self.plan, self.train_set, "epoch", "batch_in_epoch", self.cfg.num_workers)
        if not self.semi:
            yield from unlabelled
            return
        # The labelled set is small and cycles every few steps: no worker processes to restart each time.
        labelled = self._stream(self.labelled_plan, self.labelled_set, "labelled_epoch", "labelled_batch_in_epoch", 0)
        while True:
            yield list(zip(next(unlabelled), next(labelled)))

    def _stream(self, plan: BatchPlan, dataset: Dataset, epoch: str, batch_in_epoch: str, num_workers: int):
        """Endless micro-batches of ``plan`` over ``dataset`` from the position held in ``self.state``
        (attributes ``epoch`` / ``batch_in_epoch``; ``_update`` advances the batch)."""
        while True:
            batches = list(plan.micro_batches(getattr(self.state, epoch), getattr(self.state, batch_in_epoch)))
            # A private generator: creating a loader must not consume the global RNG of the training noise.
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=torch.Generator())
            it = iter(loader)
            for _ in range(len(batches) // plan.accum):
                yield [next(it) for _ in range(plan.accum)]
            setattr(self.state, epoch, getattr(self.state, epoch) + 1)
            setattr(self.state, batch_in_epoch, 0)

    def _update(self, micro_batches: list[dict], noise) -> dict:
        acc, cfg, fault = self.accelerator, self.cfg, self.faults
        attempt = self.state.step + self.state.skipped_total + 1
        if fault("sigterm", attempt):
            os.kill(os.getpid(), signal.SIGTERM)
        lam = self.free_bits.per_group
        A = len(micro_batches)
        # Local sums: bad-update flag, stop flag, loss, elbo, kl per group (G)[, cross-entropy, accuracy],
        # time-limit flag (the last)
        G = self.raw_model.num_groups
        local = torch.zeros(5 + G + (2 if self.semi else 0), dtype=torch.float64, device=acc.device)
        for j, batch in enumerate(micro_batches):
            if self.semi:  # the unwrapped model, outside DDP: gradients are averaged below
                sync = contextlib.nullcontext()
            else:
                batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = contextlib.nullcontext() if j == A - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    if self.semi:
                        loss, terms = self._semi_loss(batch, noise, lam)
                    else:
                        loss, out = training_loss(self.model, batch, noise, lam, cfg.analytic_kl)
                if j == 0 and fault.active:
                    loss = loss * (float("nan") if fault("nan-loss", attempt) else 1e6 if fault("big-grad", attempt) else 1.0)
                local[0] += ~torch.isfinite(loss.detach())  # counted on the device: no sync per micro-batch
                acc.backward(loss / A)
            local[2] += loss.detach().double() / A
            if self.semi:
                # elbo: the unlabelled bound, a bound on log p(x) like the validation figure
                local[3] += terms.bound_unlabelled.detach().double().mean() / A
                if G:
                    local[4:4 + G] += terms.kl.detach().double().mean(0) / A
                local[4 + G] += terms.cross_entropy.detach().double() / A
                local[5 + G] += terms.accuracy.detach().double() / A
                continue
            local[3] += out.bound().detach().double().mean() / A
            if out.kl.shape[1]:
                local[4:4 + G] += out.kl.detach().double().mean(0) / A
        if self.semi:
            self._average_gradients()
        if fault("nan-grad", attempt):
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        norm = grad_norm(list(self.model.parameters()), cfg.grad_clip or None, acc)
        norm = torch.as_tensor(norm, device=acc.device).detach().double()
        # VDVAE's guard: skip an update whose gradient norm is non-finite or above the threshold.
        local[0] += ~torch.isfinite(norm)
        if cfg.skip_threshold is not None:
            local[0] += norm > cfg.skip_threshold
        local[1] = 1.0 if self._stop_signal else 0.0
        # Each process reads its own clock; the sum decides for all.
        out_of_time_slot = local.numel() - 1
        local[out_of_time_slot] = 1.0 if self._out_of_time() or fault.full_since("out-of-time", attempt) else 0.0
        # One collective: every process takes the same decision (skip, stop), even where a fault is seen by
        # one process only, and logs the figures of the whole global batch, not just its own share.
        world = acc.num_processes
        total = acc.reduce(local, reduction="sum") if world > 1 else local
        # The step's one host synchronisation: the decision and every figure in a single transfer (the
        # norm is this process's own, as before).
        figures = torch.cat([total, norm.view(1)]).tolist()
        norm_value = figures[-1]
        ok = figures[0] == 0
        if ok:
            self.optimizer.step()
            self.state.step += 1
            self.ema.update(self.raw_model, self.state.step)
            self.state.skipped_in_row = 0
        else:
            self.state.skipped_total += 1
            self.state.skipped_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.batch_in_epoch += 1
        self.state.examples_seen += cfg.batch_size
        stop = figures[1] > 0
        out_of_time = figures[out_of_time_slot] > 0  # figures = the summed slots, then this process's norm
        if stop and self._stop_signal is None:  # another process was signalled
            self._stop_signal = "SIGTERM"
        result = {"loss": figures[2] / world, "elbo": figures[3] / world,
                  "kl_per_group": [v / world for v in figures[4:4 + G]], "grad_norm": norm_value, "skipped": not ok,
                  "stop": stop, "out_of_time": out_of_time}
        if self.semi:
            self.state.labelled_batch_in_epoch += 1
            result.update(cross_entropy=figures[4 + G] / world, accuracy=figures[5 + G] / world)
        return result

    def _log_train(self, t0: float, steps0: int) -> dict:
        w, step = self.window, self.state.step
        elapsed = max(time.time() - t0, 1e-9)
        kl_per_group = [v / w.count for v in w.kl]
        record = {
            "step": step, "split": "train", "epoch": self.state.epoch,
            "loss": w.loss / w.count, "elbo": w.elbo / w.count, "kl_per_group": kl_per_group,
            "kl": sum(kl_per_group), "grad_norm": w.grad_norm / w.count,
            "free_bits_budget": self.free_bits.budget, "lr": self.cfg.lr,
            "steps_per_s": (step - steps0) / elapsed,
            "examples_per_s": (step - steps0) * self.cfg.batch_size / elapsed,
            "skipped_total": self.state.skipped_total,
        }
        if self.semi:  # the labelled batches' classifier q(y|x)
            record.update(cross_entropy=w.cross_entropy / w.count, accuracy=w.accuracy / w.count)
        self.log(record)
        self.window = LogWindow()
        return record

    @property
    def train_seconds(self) -> float:
        """Wall-clock seconds this run has trained, over all its sessions (validation and checkpoints
        included; start-up and data preparation not)."""
        return self._seconds_before + (time.monotonic() - self._clock if self._clock is not None else 0.0)

    def _out_of_time(self) -> bool:
        return self.cfg.max_minutes is not None and self.train_seconds >= 60.0 * self.cfg.max_minutes

    def fit(self) -> dict:
        """Train to ``total_steps``. Validation, logging and checkpoints follow the step grid
        (``eval_every``, ``log_every``, ``save_every``) and a checkpoint is saved at the last step;
        what an off-grid last step adds (a partial train record, a final validation) comes after
        that checkpoint, so a run resumed from it writes exactly what an uninterrupted run writes.

        With ``max_minutes`` the run also ends, the same way, after the first step that finds the time
        used up on any process (every process stops at that step); a resumed run counts its earlier
        sessions' time too, so resuming one that ran out of time trains no further."""
        cfg = self.cfg
        self._clock = time.monotonic()
        out_of_time = cfg.max_minutes is not None and self._seconds_before >= 60.0 * cfg.max_minutes  # resumed
        if out_of_time:
            self.total_steps = min(self.total_steps, self.state.step)
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        noise = TrainNoise()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main,
                   desc="train", dynamic_ncols=True)
        t0, steps0 = time.time(), self.state.step
        last_record = None
        try:
            batches = self._loader()
            compiling = self.compiled  # torch.compile runs inside the first step: say how long it took
            if compiling and self.is_main:
                tqdm.write("compile: the first step compiles the training step (minutes on a CPU on a cold cache; "
                           "--no-compile runs it eager)", file=sys.stderr)
            while self.state.step < self.total_steps:
                started = time.perf_counter()
                result = self._update(next(batches), noise)
                if compiling:
                    compiling = False
                    if self.is_main:
                        tqdm.write(f"compile: the first step, compilation included, took "
                                   f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
                step = self.state.step
                if result["out_of_time"] and step < self.total_steps:
                    out_of_time, self.total_steps = True, step  # this step is the last: saved below
                    bar.total = step
                if result["skipped"]:
                    self.log({"step": step, "event": "skipped_update", "grad_norm": result["grad_norm"],
                              "loss": result["loss"], "skipped_in_row": self.state.skipped_in_row,
                              "skipped_total": self.state.skipped_total})
                    if self.state.skipped_in_row > cfg.max_skips:
                        raise UserError(
                            f"stopped: {self.state.skipped_in_row} updates in a row had a non-finite loss or a "
                            f"gradient norm above the threshold (--max-skips {cfg.max_skips}); the last good "
                            f"checkpoint is intact: resume it with a lower --lr or a --grad-clip")
                    if out_of_time and step == self.total_steps:
                        self.save_checkpoint()  # the time ran out on a skipped update
                else:
                    self.window.add(result)
                    bar.update(1)
                    if step % cfg.log_every == 0:
                        record = self._log_train(t0, steps0)
                        bar.set_postfix(loss=f"{record['loss']:.2f}", elbo=f"{record['elbo']:.2f}",
                                        kl=f"{record['kl']:.2f}", refresh=False)
                        t0, steps0 = time.time(), step
                    if step % cfg.eval_every == 0:
                        last_record = self.validate()
                    if step % cfg.save_every == 0 or step == self.total_steps:
                        self.save_checkpoint()
                if result["stop"] and step < self.total_steps:
                    self._preempt(bar)
            # The end of the run, after its last checkpoint (see the docstring).
            if self.window.count:
                self._log_train(t0, steps0)
            step = self.state.step
            if out_of_time and self.is_main:
                tqdm.write(f"--max-minutes {cfg.max_minutes:g}: the time was used up at step {step} "
                           f"({self.train_seconds / 60:.1f} minutes of training)", file=sys.stderr)
            if last_record is None or last_record["step"] != step:
                # Logged only off the grid: on it, the record is already in the log (maybe from before a resume).
                last_record = self.validate(final=True, log=step % cfg.eval_every != 0)
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.tracking.finish()
        dump_state(self)
        return {"step": self.state.step, "valid": last_record, "skipped_total": self.state.skipped_total}

    def _preempt(self, bar) -> None:
        """SIGTERM or SIGINT on any process: every process saves the checkpoint and exits with 128 + the
        signal's number, and the main process says how to resume."""
        path = self.save_checkpoint()
        dump_state(self)
        if self.is_main:
            bar.close()
            print(f"received {self._stop_signal}: saved checkpoint {path} at step {self.state.step}; "
                  f"resume with: {self.resume_command}", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[self._stop_signal].value)  # 143 for SIGTERM, 130 for SIGINT
