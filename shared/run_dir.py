"""The run directory (CONTRACTS.md): config, checkpoints, exported EMA weights, metrics.

Everything a run needs to be rebuilt, evaluated, sampled or resumed lives here, and nothing in it
needs pickle to rebuild the model: ``config.json`` + ``model.safetensors``. Torch is imported only by
the functions that move tensors, so the command line can check a run directory in well under a second.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RunConfig, TrainConfig, read_json, write_json_atomic  # noqa: F401  (re-exported)
from .errors import UserError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LABELLED = "labelled_indices.json"  # semi-supervised runs: which training examples carry their label
MANIFEST = "manifest.json"  # in each checkpoint: size and sha256 of every other file, recorded at save
_STEP_RE = re.compile(r"^step_(\d+)$")

if TYPE_CHECKING:
    import torch

# A hub repository id: owner/name (letters, digits, "-", "_", "."), as huggingface_hub validates it.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


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
    if path.is_dir() or path.exists() or not _HUB_ID_RE.match(str(text)):
        if not path.is_dir():
            raise UserError(f"{flag} {text} is not a directory; pass the --output-dir of a training run, a folder "
                            f"written by scripts/export.py, or a hub repository id owner/name")
        return path
    return _fetch_from_hub(str(text), flag)


def _fetch_from_hub(repo_id: str, flag: str = "--run") -> Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    def fail(why: str) -> UserError:
        return UserError(f"{flag} {repo_id} is no local directory and could not be fetched from the Hugging Face "
                         f"Hub ({why}); check the path or the repository id, or fetch it where the hub is reachable")

    revision, unreachable = None, None
    if not constants.HF_HUB_OFFLINE:
        # snapshot_download resolves the revision with no timeout, so an endpoint that accepts the
        # connection and never answers would hang it: resolve it here, with the hub's metadata timeout
        # (HF_HUB_ETAG_TIMEOUT, 10 s by default).
        try:
            revision = huggingface_hub.HfApi().repo_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
        except RepositoryNotFoundError:
            raise fail("no such repository, or a private or gated one: log in with `hf auth login`") from None
        except Exception as err:  # unreachable: the local cache may still hold it
            unreachable = err
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=revision is None)
    except Exception as err:  # network, cache and validation errors of an external service: one line
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set and the local hub cache does not hold it"
        else:
            why = _first_line(unreachable or err) + ", and the local hub cache does not hold it"
        raise fail(why) from None
    return _checked_snapshot(repo_id, folder)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _checked_snapshot(repo_id: str, folder: str) -> Path:
    path = Path(folder)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise UserError(f"hub repository {repo_id} holds no BIVA model ({CONFIG} and {WEIGHTS}); "
                        f"pass a repository written by scripts/export.py --push-to-hub")
    return path


def output_dir(run_dir: str | Path) -> Path:
    """Where a script writes what belongs beside a run (reports, plots, samples): the run directory
    itself when it is a writable local folder; for a hub snapshot (read-only, shared by the cache) or a
    read-only folder, ./<name> in the current directory, created."""
    run_dir = Path(run_dir)
    name = run_dir.name
    if _in_hub_cache(run_dir):
        name = run_dir.parents[1].name.split("--")[-1]  # <cache>/models--owner--name/snapshots/<sha>
    elif os.access(run_dir, os.W_OK):
        return run_dir
    out = Path.cwd() / name
    if out.resolve() == run_dir.resolve():
        out = Path.cwd() / f"{name}-outputs"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _in_hub_cache(path: Path) -> bool:
    if len(path.parts) < 3 or path.parent.name != "snapshots":
        return False
    from huggingface_hub import constants

    return path.resolve().is_relative_to(Path(constants.HF_HUB_CACHE).resolve())


def run_step(run_dir: str | Path) -> int | None:
    """The training step of the run's exported weights: its latest checkpoint, or for a folder written
    by scripts/export.py (no checkpoints) the step recorded there in config.json."""
    latest = latest_checkpoint(Path(run_dir))
    if latest is not None:
        return latest[0]
    path = Path(run_dir) / CONFIG
    step = read_json(path, "run config").get("extra", {}).get("step") if path.is_file() else None
    return step if isinstance(step, int) else None


def check_resumable(run_dir: str | Path, modality: str | None = None, preset: str | None = None) -> RunConfig:
    """What --resume needs, checked without torch: a config.json of the right modality (and preset, if
    one is asked for) whose latest checkpoint was written by the same model."""
    run_dir = Path(run_dir)
    run = read_run_config(run_dir, modality)
    if preset is not None and preset != run.preset:
        raise UserError(f"--preset {preset} differs from the resumed run's preset {run.preset}; "
                        f"drop --preset or choose a new --output-dir")
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        path = latest[1]
        try:
            state = read_json(path / "trainer_state.json", "checkpoint state")
        except UserError:
            state = None  # damaged: the engine finds it against the manifest and falls back to an older one
        if state is not None and (not isinstance(state, dict) or state.get("model") != run.model):
            raise UserError(f"checkpoint {path} was written by a different model than {run_dir / CONFIG} "
                            f"(another preset or model flags); remove that checkpoint or choose a new --output-dir")
    return run


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


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints, oldest first (a half-written one still has its temporary name)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file of a checkpoint being written, so that a file damaged
    later (truncated, corrupted) is found on --resume instead of being loaded."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_damage(path: Path, expect_manifest: bool) -> str | None:
    """What is wrong with a checkpoint's files (``"FILE: what"``), or None if they match its manifest.
    A checkpoint written before manifests existed (``expect_manifest`` False and none there) is not
    checked."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return f"{MANIFEST}: missing" if expect_manifest else None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST}: unreadable"
    for name, size, _ in entries:  # sizes first: a truncated file is found without reading the others
        if not (path / name).is_file():
            return f"{name}: missing"
        if (path / name).stat().st_size != size:
            return f"{name}: {(path / name).stat().st_size} bytes, {size} when saved"
    for name, _, digest in entries:
        if file_sha256(path / name) != digest:
            return f"{name}: contents differ from the checksum recorded when it was saved"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the ``step_N`` names (kept for inspection, never deleted):
    ``checkpoints``, ``latest_checkpoint`` and pruning no longer see it, and step N can be saved again."""
    path = Path(path)
    aside, n = path.with_name(path.name + ".damaged"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
    os.replace(path, aside)
    return aside


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints. A checkpoint is renamed before it is deleted, so a crash
    in the middle never leaves a half-deleted folder under a ``step_N`` name."""
    found = checkpoints(run_dir)
    root = Path(run_dir) / CHECKPOINTS
    for _, path in found[: max(len(found) - keep, 0)]:
        doomed = root / f".tmp_pruned_{path.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
    for p in root.glob(".tmp_*"):  # leftovers of a write or a deletion that was killed
        shutil.rmtree(p, ignore_errors=True)


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

