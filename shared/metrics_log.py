"""metrics.jsonl, the run's source of truth for every logged figure: appending all of a write or none,
reading, cutting back on resume, the records a full disk holds in memory, and the window of training
figures averaged into each ``train`` record. Torch-free."""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import is_disk_full

METRICS = "metrics.jsonl"


def append_metrics(run_dir: Path, *records: dict[str, Any], fail_after: int | None = None) -> None:
    """Append ``records`` to metrics.jsonl, all or none: if the write fails (a full disk), the file is
    cut back to its old length, so it never ends in half a line. ``fail_after`` (tests) raises ENOSPC
    once that many bytes are written, as a full disk would."""
    path = Path(run_dir) / METRICS
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    with open(path, "ab") as f:
        start = f.tell()
        try:
            if fail_after is not None:
                f.write(text[:fail_after])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            f.write(text)
            f.flush()
        except BaseException:
            f.truncate(start)  # cutting a file back needs no free space
            raise


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return out


def metrics_size(run_dir: Path) -> int:
    path = Path(run_dir) / METRICS
    return path.stat().st_size if path.is_file() else 0


def truncate_metrics(run_dir: Path, step: int, size: int | None = None) -> None:
    """On resume, drop the lines written after the resumed checkpoint.

    ``size`` is the file's length when the checkpoint was saved: cutting there also drops what was
    logged after the save at the same step (a skipped update, the end-of-run evaluation), so a
    resumed run writes exactly the lines of an uninterrupted one. Without it (or if the file is
    shorter than that), lines past ``step`` are dropped.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    data = path.read_bytes()
    if size is not None and len(data) >= size:
        kept = data[:size]
    else:
        records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        kept = "".join(json.dumps(r) + "\n" for r in records).encode()
    if kept == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(kept)
    os.replace(tmp, path)


class MetricsLog:
    """The main process's writer of metrics.jsonl. On a full disk (or quota) the file is left as it was
    and the records stay in memory, with one warning: training goes on, the next write adds them if
    space was freed, and a checkpoint writes them first, so with the disk still full it stops the run
    there (``stop_when_full``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.pending: list[dict] = []

    def write(self, *records: dict, step: int, stop_when_full: bool = False, fail_after: int | None = None) -> None:
        """Append ``records`` and whatever a full disk held back; ``fail_after``: the fault hook of the tests."""
        self.pending.extend(records)
        if not self.pending:
            return
        try:
            append_metrics(self.run_dir, *self.pending, fail_after=fail_after)
        except OSError as error:
            if stop_when_full or not is_disk_full(error):
                raise
            if len(self.pending) == 1:  # the first record held back: warn once per full spell
                from tqdm.auto import tqdm

                tqdm.write(f"warning: {os.strerror(error.errno).lower()} ({error.filename}): metrics are held in "
                           f"memory from step {step} and written once there is space; the next "
                           f"checkpoint stops the run if there is still none", file=sys.stderr)
            return
        self.pending.clear()


class LogWindow:
    """Sums of the training figures since the last ``train`` record; saved in checkpoints, so a run
    resumed between two records writes the same averages as an uninterrupted one. ``extras`` names the
    objective's own figures (a semi-supervised run's classifier cross-entropy and accuracy)."""

    def __init__(self, extras: tuple[str, ...] = ()):
        self.count, self.loss, self.elbo, self.grad_norm = 0, 0.0, 0.0, 0.0
        self.kl: list[float] = []
        self.extras = {name: 0.0 for name in extras}

    def add(self, result: dict) -> None:
        self.count += 1
        self.loss += result["loss"]
        self.elbo += result["elbo"]
        self.grad_norm += result["grad_norm"]
        for name in self.extras:
            self.extras[name] += result[name]
        kl = result["kl_per_group"]
        self.kl = list(kl) if not self.kl else [a + b for a, b in zip(self.kl, kl)]

    def state_dict(self) -> dict:
        return {"count": self.count, "loss": self.loss, "elbo": self.elbo, "grad_norm": self.grad_norm,
                "kl": list(self.kl), **self.extras}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints written before the objectives had their own figures carry cross_entropy and
        # accuracy in every run: only this run's extras are read back.
        self.count, self.loss, self.elbo = state["count"], state["loss"], state["elbo"]
        self.grad_norm, self.kl = state["grad_norm"], list(state["kl"])
        for name in self.extras:
            self.extras[name] = state.get(name, 0.0)
