"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through Accelerate's trackers.

``metrics.jsonl`` stays the source of truth: every record written there goes to the trackers with the
same numbers at the same step (``scalars`` names them), the evaluation hook's samples go along as
images or text, and the run config as hyper-parameters. Torch-free at import, so the command line
resolves ``--report-to`` before anything heavy is loaded.

TensorBoard writes to ``RUN/tensorboard/biva-<modality>/``. On ``--resume`` it continues there: the new
event file hides what the interrupted run logged from the resumed checkpoint's step on (TensorBoard's
purge step) and the records of that step still in ``metrics.jsonl`` are logged again, so TensorBoard
shows what ``metrics.jsonl`` holds. W&B and MLflow start a new run (same name) per launch.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow")  # each is also the name of its pip extra
REPORT_TO = (*TRACKERS, "all", "none")
LOG_DIR = "tensorboard"  # Accelerate's logging_dir inside the run directory
MEDIA_TRACKERS = ("tensorboard", "wandb")  # the ones whose Accelerate tracker takes images and text
HPARAM_METRICS = ("valid/elbo", "valid/kl", "valid/bits_per_dim")  # columns of TensorBoard's HParams table


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def default_report_to() -> str:
    return "tensorboard" if installed("tensorboard") else "none"


def resolve(report_to: str, source: str | None = None) -> list[str]:
    """The trackers ``report_to`` names (``all``: every installed one); a missing package is a UserError
    naming its extra. ``source`` says where the value came from, for the message."""
    source = source or f"--report-to {report_to}"
    if report_to == "none":
        return []
    if report_to == "all":
        names = [name for name in TRACKERS if installed(name)]
        if not names:
            raise UserError(f"{source}: none of {', '.join(TRACKERS)} is installed; "
                            f"pip install -e \".[tensorboard]\" (or wandb, mlflow) or pass --report-to none")
        return names
    if report_to not in TRACKERS:
        raise UserError(f"{source}: unknown tracker {report_to!r}; choose from {', '.join(REPORT_TO)}")
    if not installed(report_to):
        raise UserError(f"{source} needs the {report_to} package, which is not installed: "
                        f"pip install -e \".[{report_to}]\" (or pass --report-to none)")
    return [report_to]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record under tracker tags: ``<split or event>/<key>``; per-group
    lists become ``<prefix>/<name>/group_<i>`` (``kl_per_group`` -> ``train/kl/group_3``), in the
    order of the record's list. Strings, booleans and None are not scalars and are left out."""
    prefix = record.get("split") or record.get("event") or "metrics"
    out: dict[str, float] = {}

    def add(tag: str, key: str, value: Any) -> None:
        if _number(value):
            out[tag] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{tag}/{k}", k, v)
        elif isinstance(value, (list, tuple)):
            base = tag[:-len("_per_group")] if key.endswith("_per_group") else tag
            kind = "group_" if key.endswith("per_group") else ""
            for i, v in enumerate(value):
                add(f"{base}/{kind}{i}", "", v)

    for key, value in record.items():
        if key not in ("step", "split", "event"):
            add(f"{prefix}/{key}", key, value)
    return out


def hparams(config: dict, sep: str = ".") -> dict[str, Any]:
    """The run config flattened to scalar hyper-parameters (``train.lr``, ``model.ladder.levels``):
    lists become their JSON text, None is left out."""
    out: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}{sep}{k}" if key else str(k), v)
        elif isinstance(value, (list, tuple)):
            out[key] = json.dumps(value)
        elif value is not None:
            out[key] = value

    add("", config)
    return out


class Tracking:
    """The trackers of one training launch; only the main process holds any. A tracker that fails is
    reported in one line and dropped for the rest of the launch: training goes on, and metrics.jsonl
    (written before the trackers are called) is complete."""

    def __init__(self, accelerator, names: list[str], run_dir: Path, run_config: dict,
                 resumed_from: int | None = None):
        self.trackers: list = []
        if not names or not accelerator.is_main_process:
            return
        run_dir = Path(run_dir)
        init_kwargs: dict[str, dict] = {
            "wandb": {"name": run_dir.name, "dir": str(run_dir)},
            "mlflow": {"run_name": run_dir.name},
        }
        if resumed_from is not None:
            # A new event file whose first event hides everything the earlier launch logged from this step on.
            init_kwargs["tensorboard"] = {"purge_step": resumed_from}
        try:
            accelerator.init_trackers(f"biva-{run_config['modality']}", init_kwargs=init_kwargs)
        except Exception as err:  # e.g. wandb without a login: the run goes on without trackers
            _warn(f"could not start the trackers {', '.join(names)} ({type(err).__name__}: {err}); "
                  f"training goes on with metrics.jsonl only")
            return
        self.trackers = list(accelerator.trackers)
        config = hparams(run_config)
        for tracker in list(self.trackers):
            self._call(tracker, _store_config, tracker, config)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def log_dir(self) -> Path | None:
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                return Path(tracker.logging_dir)
        return None

    def _call(self, tracker, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:
            self.trackers.remove(tracker)
            _warn(f"the {tracker.name} tracker failed ({type(err).__name__}: {err}); it is off for the rest of "
                  f"this run, metrics.jsonl is complete")

    def log(self, record: dict, only: str | None = None) -> None:
        """One metrics.jsonl record, at its step."""
        values = scalars(record)
        for tracker in list(self.trackers):
            if values and only in (None, tracker.name):
                self._call(tracker, tracker.log, values, step=record["step"])

    def log_media(self, media: dict | None, step: int, only: str | None = None) -> None:
        """What the evaluation hook returned: ``{tag: uint8 array (N, C, H, W)}`` for images,
        ``{tag: list of lines}`` for text."""
        for tag, value in (media or {}).items():
            for tracker in list(self.trackers):
                if tracker.name not in MEDIA_TRACKERS or only not in (None, tracker.name):
                    continue
                if isinstance(value, (list, tuple)):
                    # Indented: a Markdown code block keeps one sample per line in TensorBoard's text view.
                    indent = "    " if tracker.name == "tensorboard" else ""
                    self._call(tracker, tracker.log, {tag: "\n".join(indent + line for line in value)}, step=step)
                elif tracker.name == "tensorboard":
                    self._call(tracker, tracker.log_images, {tag: value}, step=step, dataformats="NCHW")
                else:  # W&B: one (H, W) or (H, W, C) image each
                    images = value[:, 0] if value.shape[1] == 1 else value.transpose(0, 2, 3, 1)
                    self._call(tracker, tracker.log_images, {tag: list(images)}, step=step)

    def finish(self) -> None:
        # Not accelerator.end_training(): that also destroys the process group, which the caller may still use.
        for tracker in list(self.trackers):
            self._call(tracker, tracker.finish)
        self.trackers = []


def _store_config(tracker, config: dict) -> None:
    if tracker.name != "tensorboard":
        tracker.store_init_configuration(config)
        return
    # Into the run's own event file (Accelerate's store_init_configuration writes a separate timestamped
    # run), so that TensorBoard's HParams table shows the validation figures next to the config.
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    experiment, session_start, _ = hparams_summaries(config, {tag: math.nan for tag in HPARAM_METRICS})
    writer = tracker.writer._get_file_writer()
    writer.add_summary(experiment)
    writer.add_summary(session_start)
    writer.flush()


def _warn(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)  # on a line of its own, above the progress bar
