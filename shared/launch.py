"""Where and how a run executes: the processes a launcher started, the device, and the runtime
settings chosen before the first step (bf16 on a CPU, glibc's heap, compiling), plus the command
that resumes a run. Nothing here trains; ``shared/engine.py`` calls it."""
from __future__ import annotations

import os
import shlex
import sys
import warnings

import torch

from .errors import UserError


def use_cpu() -> bool:
    """Accelerate runs several processes on the CPU (gloo) only when it is told to use the CPU: tell it
    so when a launcher (torchrun, accelerate launch) started several processes on a machine without GPU."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched_processes() > 1 and not gpu


def native_cpu_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported); without
    them bf16 convolutions fall back to slow generic code (docs/performance.md)."""
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

    By default glibc maps every large block afresh and unmaps it when freed, so a CPU step page-faults on
    the memory of nearly every activation again, every step; raising the mmap and trim thresholds keeps
    it, as torch's CUDA allocator does on a GPU (figures: docs/performance.md). BIVA_GLIBC_MALLOC=1 keeps
    glibc's defaults. Returns whether the settings were applied (False: not glibc, or opted out)."""
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
    (the binary preset's default) where the step runs on a CPU in fp32 or bf16, the cases measured faster
    than eager (docs/performance.md); elsewhere (GPUs, fp16) it stays eager until measured."""
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
