"""Configs are dataclasses: named presets, JSON in every run directory, unknown keys rejected.

``from_dict`` rebuilds a (nested) dataclass from plain JSON data without pickle; any key the
dataclass does not know is a ``UserError`` naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert JSON data to the annotated type ``tp`` (dataclasses, lists, tuples, optionals)."""
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in args:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value, where)
        if len(args) == 1:
            return _coerce(args[0], value, where)
        return value
    if origin in (list, tuple):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_coerce(item, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
            f"known keys are: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise UserError(f"{where}: {err}") from None


def replace(obj: T, where: str = "config", **changes: Any) -> T:
    """``dataclasses.replace`` that names an unknown field instead of raising TypeError."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}")
    return dataclasses.replace(obj, **changes)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON ({err})") from None


@dataclass
class TrainConfig:
    """Optimisation, schedule and bookkeeping; every field has a CLI flag of the same name in kebab-case."""

    max_steps: int | None = None  # optimiser steps (skipped updates do not count)
    epochs: int | None = None  # used when max_steps is None
    max_minutes: float | None = None  # wall-clock limit of training over all sessions of the run (None: none)
    batch_size: int = 48  # global batch per optimiser step, over processes x grad_accum
    grad_accum: int = 1
    lr: float = 2e-3
    seed: int = 0  # training noise and data order
    split_seed: int = 0  # train/valid/test carving
    eval_every: int = 1000
    save_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    report_to: str = "none"  # trackers besides metrics.jsonl (shared/tracking.py); the CLI defaults to tensorboard
    eval_batch_size: int | None = None  # default: the training micro-batch
    eval_examples: int | None = None  # cap on validation examples per evaluation (None: all)
    eval_seed: int = 0  # validation noise, and the fixed subset of eval_examples
    ema_decay: float = 0.9995
    free_bits: float | None = None  # lambda per group (images); overrides free_bits_budget
    free_bits_budget: float = 0.0  # total budget B in nats, split over the groups (text)
    free_bits_patience: int = 4  # evaluations without improvement before the budget drops
    free_bits_factor: float = 0.5  # B <- max(B * factor, free_bits_min) on a plateau (0: straight to the floor)
    free_bits_threshold: float = 0.05  # gain over the best validation ELBO that counts as an improvement
    free_bits_threshold_mode: str = "abs"  # abs: threshold in nats per data point; rel: a fraction of |best|
    free_bits_min: float = 1.0  # floor of the total budget B in nats (0: down to the plain ELBO)
    analytic_kl: bool = False  # closed-form KL for TD/top groups in the training loss only
    grad_clip: float | None = None  # clip the global gradient norm to this value
    skip_threshold: float | None = None  # skip an update whose gradient norm exceeds this
    max_skips: int = 50  # stop after this many skipped updates in a row
    # Semi-supervised runs only (a labelled set is given to the engine):
    classifier_weight: float = 0.1  # beta of shared.semi.alpha_rule: alpha = beta * (N_l + N_u) / N_l
    labelled_batch_size: int | None = None  # global labelled batch per step; None: min(batch_size, N_l)
    mixed_precision: str = "no"  # no | bf16 | fp16
    # torch.compile the training step (model and optimiser): True, False, or "cpu" (where the step runs on a
    # CPU in fp32 or bf16; the binary preset's default, where that was measured faster)
    compile: bool | str = False
    num_workers: int = 0
    length_buckets: bool = False  # batches of similar lengths (text presets; needs a dataset with .lengths)
    channels_last: bool = True  # 2-D feature maps in NHWC (images; shared.nn.set_channels_last)


@dataclass
class RunConfig:
    """What ``config.json`` holds: enough to rebuild model and data pipeline."""

    modality: str  # "image" | "text"
    preset: str
    model: dict  # the modality's model config (parsed by the modality)
    data: dict  # the modality's data config
    train: TrainConfig = field(default_factory=TrainConfig)
    extra: dict = field(default_factory=dict)  # modality-specific facts (e.g. data statistics)
    # A fine-tuning run (--init-from): {"run": as given, "path": the resolved folder, "step": of its weights or None}
    init_from: dict | None = None

    def to_json(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "config.json") -> "RunConfig":
        return from_dict(cls, data, where)
