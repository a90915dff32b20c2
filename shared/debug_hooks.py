"""Test hooks of the engine, inert unless their environment variables are set.

The fault and multi-process tests drive the real training scripts as subprocesses, so the faults they
need are injected from the environment:

``BIVA_FAULTS``: comma-separated ``KIND@N`` or ``KIND@N:RANK`` (only on process RANK). N counts update
attempts (1-based, skipped ones included) for the first five, optimiser steps for the kills.

- ``nan-loss@N``: the loss of attempt N is NaN
- ``big-grad@N``: the loss of attempt N is scaled by 1e6 (finite, with a huge gradient norm)
- ``nan-grad@N``: a finite loss whose gradient gets a NaN entry (a non-finite norm)
- ``sigterm@N``: the process sends itself SIGTERM as attempt N starts (a scheduler's preemption)
- ``out-of-time@N``: from attempt N on, the process's clock finds --max-minutes used up
- ``kill-saved@N``: SIGKILL while checkpointing step N, after the state is written to the temporary
  folder and before the rename
- ``kill-renamed@N``: SIGKILL after checkpoint N is renamed into place, before the weights are exported
- ``kill-eval@N``: SIGKILL during the validation of step N, once its record is logged
- ``enospc-save@N``: the disk fills up while checkpoint N is written: a partial file is left in the
  temporary folder and ``OSError(ENOSPC)`` is raised (on every process, or on RANK only)
- ``enospc-export@N``: the same while the weights of checkpoint N are exported, after its rename
- ``enospc-metrics@N``: the disk is full for metrics.jsonl from optimiser step N on (every append
  writes part of its lines, then ``OSError(ENOSPC)``)

``BIVA_PREPARE_DELAY_S``: the text preparation sleeps this many seconds before it encodes the token
store (a slow corpus, longer than a short ``BIVA_DIST_TIMEOUT_S``, for the multi-process test).
``BIVA_PREPARE_KILL=encode``: SIGKILL as the token store's encoding starts (an interrupted preparation).

``BIVA_DUMP_DIR``: when training ends or is preempted, every process writes its trained and EMA
weights (``rank<R>.safetensors``) and its step, data position and free-bits state (``rank<R>.json``),
so a test can check that all processes hold the same state.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

KINDS = ("nan-loss", "big-grad", "nan-grad", "sigterm", "out-of-time", "kill-saved", "kill-renamed", "kill-eval",
         "enospc-save", "enospc-export", "enospc-metrics")


class Faults:
    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("BIVA_FAULTS", "") if spec is None else spec
        self.active: set[tuple[str, int]] = set()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            kind, _, where = item.partition("@")
            n, _, only_rank = where.partition(":")
            if kind not in KINDS or not n.isdigit() or (only_rank and not only_rank.isdigit()):
                raise ValueError(f"BIVA_FAULTS: cannot read {item!r}; expected KIND@N[:RANK] with KIND in {KINDS}")
            if not only_rank or int(only_rank) == rank:
                self.active.add((kind, int(n)))

    def __call__(self, kind: str, n: int) -> bool:
        return (kind, n) in self.active

    def kill_if(self, kind: str, n: int) -> None:
        if (kind, n) in self.active:
            os.kill(os.getpid(), signal.SIGKILL)

    def full_since(self, kind: str, n: int) -> bool:
        """Whether a ``kind@M`` fault with M <= n is set (a disk that stays full from step M on)."""
        return any(k == kind and m <= n for k, m in self.active)

    def disk_full_if(self, kind: str, n: int, path: Path) -> None:
        """As a writer on a full disk: part of ``path`` written, then ENOSPC."""
        if (kind, n) in self.active:
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def prepare_hook(stage: str) -> None:
    """The text preparation's hooks (see the module docstring); ``stage`` is "encode"."""
    delay = float(os.environ.get("BIVA_PREPARE_DELAY_S") or 0)
    if delay > 0:
        time.sleep(delay)
    if os.environ.get("BIVA_PREPARE_KILL") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def dump_state(trainer) -> None:
    """Write this process's state under ``BIVA_DUMP_DIR`` (see the module docstring)."""
    folder = os.environ.get("BIVA_DUMP_DIR")
    if not folder:
        return
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank = trainer.accelerator.process_index
    tensors = {f"model/{k}": v for k, v in trainer.raw_model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in trainer.ema.state_dict().items()})
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(folder / f"rank{rank}.safetensors"))
    (folder / f"rank{rank}.json").write_text(json.dumps({"train": vars(trainer.state), "free_bits": trainer.free_bits.state_dict(),
                                                         "world": trainer.accelerator.num_processes}))
