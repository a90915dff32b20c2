"""The run directory (docs/reference.md): its config, the exported EMA weights, the labelled subset of a
semi-supervised run; checkpoints live in shared/checkpoints.py, metrics.jsonl in shared/metrics_log.py.

Everything a run needs to be rebuilt, evaluated, sampled or resumed lives here, and nothing in it
needs pickle to rebuild the model: ``config.json`` + ``model.safetensors``. Torch is imported only by
the functions that move tensors, so the command line can check a run directory in well under a second.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .config import RunConfig, read_json, write_json_atomic
from .errors import UserError
from .hub import HUB_ID_RE, fetch_model, in_hub_cache

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"  # one folder per checkpoint: shared/checkpoints.py
LABELLED = "labelled_indices.json"  # semi-supervised runs: which training examples carry their label

if TYPE_CHECKING:
    import torch

def check_output_dir(path: str | Path, resume: bool) -> Path:
    """Refuse a run directory that cannot be used, before anything is written."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            if parent == path:
                raise UserError(f"--output-dir {path} is a file, not a directory; choose another --output-dir")
            raise UserError(f"--output-dir {path} lies below {parent}, which is a file, not a directory; choose another --output-dir")
    has_run = (path / CONFIG).exists() or (path / CHECKPOINTS).exists()
    if resume:
        if not path.is_dir():
            raise UserError(f"cannot resume: {path} does not exist; drop --resume to start a new run there")
        if not has_run:
            raise UserError(f"cannot resume: {path} holds no run (no {CONFIG}); drop --resume to start a new run")
    elif has_run:
        raise UserError(f"{path} already holds a run; pass --resume to continue it or choose a new --output-dir")
    return path


def read_run_config(run_dir: str | Path, modality: str | None = None) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the --output-dir of a training run")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG}); pass the --output-dir of a training run")
    data = read_json(run_dir / CONFIG, "run config")
    run = RunConfig.from_json(data, str(run_dir / CONFIG))
    if modality is not None and run.modality != modality:
        def a(word: str) -> str:
            return f"{'an' if word[:1] in tuple('aeiou') else 'a'} {word}"

        raise UserError(f"{run_dir} is {a(run.modality)} run, not {a(modality)} run; "
                        f"use the {run.modality} scripts (e.g. scripts/report_{run.modality}.py)")
    return run


def resolve_run(text: str | Path, flag: str = "--run") -> Path:
    """The folder a script's ``--run`` (or ``flag``) names: a local run directory or exported model folder
    as is, else a Hugging Face Hub repository id ``owner/name`` fetched (or taken from the local cache) with
    ``huggingface_hub.snapshot_download``. Anything that fails is one UserError naming the fix."""
    path = Path(text)
    if path.is_dir() or path.exists() or not HUB_ID_RE.match(str(text)):
        if not path.is_dir():
            raise UserError(f"{flag} {text} is not a directory; pass the --output-dir of a training run, a folder "
                            f"written by scripts/export.py, or a hub repository id owner/name")
        return path
    return fetch_model(str(text), flag, required=(CONFIG, WEIGHTS))


def output_dir(run_dir: str | Path) -> Path:
    """Where a script writes what belongs beside a run (reports, plots, samples): the run directory
    itself when it is a writable local folder; for a hub snapshot (read-only, shared by the cache) or a
    read-only folder, ./<name> in the current directory, created."""
    run_dir = Path(run_dir)
    name = run_dir.name
    if in_hub_cache(run_dir):
        name = run_dir.parents[1].name.split("--")[-1]  # <cache>/models--owner--name/snapshots/<sha>
    elif os.access(run_dir, os.W_OK):
        return run_dir
    out = Path.cwd() / name
    if out.resolve() == run_dir.resolve():
        out = Path.cwd() / f"{name}-outputs"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_run_config(run_dir: Path, run: RunConfig) -> None:
    write_json_atomic(run_dir / CONFIG, run.to_json())


def write_labelled_indices(run_dir: Path, labels_per_class: int, seed: int, indices) -> None:
    """``labelled_indices.json`` = {"labels_per_class", "seed", "indices"}: indices into the training split."""
    write_json_atomic(run_dir / LABELLED, {"labels_per_class": int(labels_per_class), "seed": int(seed),
                                           "indices": [int(i) for i in indices]})


def read_labelled_indices(run_dir: str | Path, n_train: int) -> dict:
    """The labelled subset a semi-supervised run trained with, checked against a training split of ``n_train``."""
    path = Path(run_dir) / LABELLED
    data = read_json(path, "the labelled subset")
    indices = data.get("indices") if isinstance(data, dict) else None
    if not isinstance(indices, list) or not all(isinstance(i, int) and 0 <= i < n_train for i in indices):
        raise UserError(f"{path} does not hold indices into a training split of {n_train} examples; "
                        f"use the data the run was trained on")
    return data


def export_weights(run_dir: Path, state: dict[str, "torch.Tensor"]) -> None:
    from safetensors.torch import save_file

    tmp = run_dir / (WEIGHTS + ".tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: the previous export stays the only one
        raise
    os.replace(tmp, run_dir / WEIGHTS)


def load_weights(run_dir: str | Path, model: "torch.nn.Module") -> "torch.nn.Module":
    from safetensors.torch import load_file

    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        raise UserError(f"{run_dir} has no exported weights ({WEIGHTS}); train until the first checkpoint is saved")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match the model of {Path(run_dir) / CONFIG} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return model
