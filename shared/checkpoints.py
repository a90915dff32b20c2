"""Checkpoints: the folders under ``RUN/checkpoints/``, their manifests, and how the engine writes and
resumes them with the storage-fault protocol.

A checkpoint is written to ``.tmp_step_N`` and renamed to ``step_N`` only once complete, with a
manifest of every file's size and SHA-256 written last; ``--resume`` takes the newest checkpoint whose
files match their manifest and moves damaged ones aside (never deleting them). Every stage of a write
ends in a collective, so a full disk on one process stops all of them with one line and
STORAGE_EXIT_CODE, the last good checkpoint and the exported weights untouched. The listing functions
are torch-free, so the command line can check a run directory in well under a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .config import RunConfig, read_json
from .errors import DISK_FULL_EXIT_CODE, UserError, is_disk_full
from .metrics_log import metrics_size, truncate_metrics
from .run_dir import CHECKPOINTS, CONFIG, WEIGHTS, export_weights, read_run_config

if TYPE_CHECKING:
    from .engine import Trainer

MANIFEST = "manifest.json"  # in each checkpoint: size and sha256 of every other file, recorded at save
STATE = "trainer_state.json"  # in each checkpoint: step, data position, schedules, log window
STORAGE_EXIT_CODE = DISK_FULL_EXIT_CODE  # a checkpoint or the weights could not be written (disk full)
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints, oldest first (a half-written one still has its temporary name)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


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
            state = read_json(path / STATE, "checkpoint state")
        except UserError:
            state = None  # damaged: the engine finds it against the manifest and falls back to an older one
        if state is not None and (not isinstance(state, dict) or state.get("model") != run.model):
            raise UserError(f"checkpoint {path} was written by a different model than {run_dir / CONFIG} "
                            f"(another preset or model flags); remove that checkpoint or choose a new --output-dir")
    return run


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


class Checkpoints:
    """The trainer's checkpoint writes and its resume, with the storage-fault protocol (module docstring)."""

    def __init__(self, trainer: "Trainer"):
        self.t = trainer
        self.exported_step: int | None = None  # whose EMA weights model.safetensors holds, once known

    def save(self) -> Path:
        from safetensors.torch import save_file

        t = self.t
        acc, step = t.accelerator, t.state.step
        root = t.output_dir / CHECKPOINTS
        final = root / f"step_{step}"
        if (final / STATE).is_file():
            return final
        tmp = root / f".tmp_step_{step}"
        writing = f"writing checkpoint {final}"

        def make_folder():
            t.write_metrics(stop_when_full=True)  # the checkpoint records the length of metrics.jsonl
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        def save_state():
            acc.save_state(str(tmp))
            t.faults.disk_full_if("enospc-save", step, tmp / f"random_states_{acc.process_index}.pkl")

        def finish():
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
            with open(tmp / STATE, "w") as f:
                json.dump({**self.trainer_state(), "manifest": MANIFEST}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            write_manifest(tmp)  # last: the checksums of every file above
            t.faults.kill_if("kill-saved", step)
            if final.exists():  # an incomplete leftover of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)  # the checkpoint exists only once it is complete

        def export():
            t.faults.kill_if("kill-renamed", step)
            t.faults.disk_full_if("enospc-export", step, t.output_dir / (WEIGHTS + ".tmp"))
            export_weights(t.output_dir, ema_state)
            self.exported_step = step
            prune_checkpoints(t.output_dir, t.cfg.keep_checkpoints)

        ema_state = t.ema.state_dict()
        main = t.is_main
        self.write_stage(make_folder if main else None, writing)
        self.write_stage(save_state, writing)
        self.write_stage(finish if main else None, writing)
        self.write_stage(export if main else None, f"exporting the weights of checkpoint {final}")
        return final

    def trainer_state(self) -> dict:
        t = self.t
        return {"train": vars(t.state), "free_bits": t.free_bits.state_dict(),
                "log_window": t.window.state_dict(), "train_seconds": t.train_seconds,
                "metrics_bytes": metrics_size(t.output_dir),
                "model": t.run.model, "modality": t.run.modality}

    def write_stage(self, write: Callable[[], None] | None, doing: str) -> None:
        """Run ``write`` (on the processes that have one), then agree on failures across processes.
        A full disk (or quota) stops every process with one line and STORAGE_EXIT_CODE, after the
        temporary files are removed; any other error is raised again where it happened."""
        t = self.t
        acc = t.accelerator
        error = None
        if write is not None:
            try:
                write()
            except Exception as err:  # noqa: BLE001  (re-raised below, once every process knows)
                error = err
        failures = [(acc.process_index, getattr(error, "errno", None) if is_disk_full(error) else None,
                     str(error), getattr(error, "filename", None))] if error else []
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            failures = [f for f in gather_object([failures[0] if failures else None]) if f is not None]
        if not failures:
            return
        if t.is_main:
            shutil.rmtree(t.output_dir / CHECKPOINTS / f".tmp_step_{t.state.step}", ignore_errors=True)
            (t.output_dir / (WEIGHTS + ".tmp")).unlink(missing_ok=True)
        full = [f for f in failures if f[1] is not None]
        if not full:
            if error is not None:
                raise error
            raise RuntimeError(f"process {failures[0][0]} failed while {doing}: {failures[0][2]}")
        if t.is_main:
            from tqdm.auto import tqdm

            tqdm.write(f"stopped: {self._disk_full_message(full[0], doing)}", file=sys.stderr)  # below the bar
        raise SystemExit(STORAGE_EXIT_CODE)

    def _disk_full_message(self, failure: tuple, doing: str) -> str:
        t = self.t
        rank, number, _, filename = failure
        what = os.strerror(number).lower() + (f" on process {rank}" if t.accelerator.num_processes > 1 else "")
        latest = latest_checkpoint(t.output_dir)
        need = f"a checkpoint takes about {folder_size(latest[1]) / 1e6:.1f} MB, " if latest else ""
        free = shutil.disk_usage(t.output_dir).free / 1e6
        if latest is None:
            kept = "no checkpoint is complete yet (the resume starts over)"
        else:
            kept = f"the last good checkpoint {latest[1]} (step {latest[0]}) is intact"
        weights = t.output_dir / WEIGHTS
        if self.exported_step is not None:
            kept += f" and {weights} holds the weights of step {self.exported_step}, intact"
            if latest is not None and latest[0] != self.exported_step:
                kept += " (the resume exports the checkpoint's)"
        elif weights.is_file():
            kept += f" and {weights} is unchanged"
        return (f"{what} ({filename or t.output_dir}) while {doing}; {need}{free:.1f} MB free there; {kept}; "
                f"free some space, then resume with: {t.resume_command}")

    def resume(self) -> None:
        """Load the newest intact checkpoint into the trainer (``Trainer.restore`` takes its trainer state);
        with no checkpoint yet the run starts over with its saved config."""
        t = self.t
        saved = read_run_config(t.output_dir)
        if saved.modality != t.run.modality or saved.model != t.run.model:
            raise UserError(f"{t.output_dir} was made by a different model ({saved.modality}, preset "
                            f"{saved.preset}); resume with the same settings or choose a new --output-dir")
        found = checkpoints(t.output_dir)
        if not found:
            return
        damaged = []
        for step, path in reversed(found):  # the newest intact checkpoint
            state = self._load(path)
            if isinstance(state, dict):
                break
            damaged.append((path, state))
        else:
            raise UserError(f"cannot resume: every checkpoint in {t.output_dir / CHECKPOINTS} is damaged ("
                            + "; ".join(f"{p.name}: {why}" for p, why in damaged)
                            + "); remove that folder to start the run over, or choose a new --output-dir")
        t.restore(state, step)
        ema_state = t.ema.state_dict()

        def tidy():
            for bad, why in damaged:  # kept for inspection, out of the way of latest_checkpoint and pruning
                aside = set_aside(bad)
                print(f"warning: checkpoint {bad} is damaged ({why}); moved it aside to {aside.name}; using an older "
                      f"checkpoint", file=sys.stderr)
            print(f"resuming from {path} (step {step})", file=sys.stderr)
            truncate_metrics(t.output_dir, step, state.get("metrics_bytes"))
            # A run killed between the rename and the export left older weights at the top.
            export_weights(t.output_dir, ema_state)
            self.exported_step = step

        self.write_stage(tidy if t.is_main else None, f"resuming from checkpoint {path}")

    def _load(self, path: Path) -> dict | str:
        """Load a checkpoint into the model, optimiser, RNG and EMA and return its trainer state, or say
        what is damaged in it. The main process checks the files against the manifest; every process
        then loads; all take the same decision."""
        from accelerate.utils import gather_object
        from safetensors.torch import load_file

        t = self.t

        def agree(problem: str | None) -> str | None:
            if t.accelerator.num_processes > 1:
                problem = next((p for p in gather_object([problem]) if p is not None), None)
            return problem

        problem = None
        if t.is_main:
            try:  # checkpoints written before manifests existed are loaded unchecked
                marked = "manifest" in json.loads((path / STATE).read_text())
                problem = checkpoint_damage(path, expect_manifest=marked)
            except (ValueError, TypeError, UnicodeDecodeError):
                problem = checkpoint_damage(path, True) or f"{STATE}: not valid JSON"
        problem = agree(problem)
        if problem is not None:
            return problem
        state = json.loads((path / STATE).read_text())
        if state.get("model") != t.run.model:
            raise UserError(f"checkpoint {path} was written by a different model; choose a new --output-dir")
        try:
            t.accelerator.load_state(str(path))  # weights, optimiser and every process's RNG
            ema_state = load_file(str(path / "ema.safetensors"))
            t.ema.load_state_dict({k: v.to(t.accelerator.device) for k, v in ema_state.items()})
        except Exception as err:  # noqa: BLE001  (a checkpoint older than manifests, damaged)
            problem = f"loading it failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        problem = agree(problem)
        return state if problem is None else problem
