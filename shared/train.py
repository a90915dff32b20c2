"""What every training script does once its flags are parsed: pick or reopen the run directory,
rebuild the saved config on --resume, and hand data and model to the engine."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .checkpoints import check_resumable, latest_checkpoint, run_step
from .cli import default_output_dir, training_overrides
from .config import RunConfig, replace
from .errors import UserError
from .run_dir import WEIGHTS, check_output_dir, read_run_config, resolve_run

if TYPE_CHECKING:
    import torch


@dataclass
class InitSource:
    """The run a fine-tuning run starts from (--init-from)."""

    path: Path  # the resolved folder: config.json and model.safetensors
    config: RunConfig
    record: dict  # what the new run's config.json keeps as init_from


def init_source(args: argparse.Namespace, modality: str) -> InitSource | None:
    """The --init-from source of a new run, resolved and checked (torch-free, before anything is loaded):
    a run of ``modality`` with exported weights; --preset defaults to the source's. None without the flag,
    and on --resume, which continues from its own checkpoint (``open_run`` checks that a repeated flag
    names the run's own source)."""
    text = getattr(args, "init_from", None)
    if getattr(args, "init_reset", None) and text is None:
        raise UserError("--init-reset re-initialises parts of an --init-from run; pass --init-from RUN too")
    if text is None or args.resume:
        return None
    path = resolve_run(text, "--init-from")
    config = read_run_config(path, modality)
    if not (path / WEIGHTS).is_file():
        raise UserError(f"--init-from {text} has no exported weights ({WEIGHTS}); train it until its first "
                        f"checkpoint, or pass another run")
    if getattr(args, "preset", None) is None:
        args.preset = config.preset
    record = {"run": str(text), "path": str(path.resolve()), "step": run_step(path)}
    if getattr(args, "init_reset", None):
        record["reset"] = sorted(set(args.init_reset))
    return InitSource(path, config, record)


def check_init_reset(run: RunConfig, build: Callable) -> None:
    """A new run's --init-reset names parts of the model ``build()`` makes (built on the meta device: no
    memory, no time); one line otherwise."""
    parts = (run.init_from or {}).get("reset")
    if parts:
        import torch

        with torch.device("meta"):
            reset_state(build(), parts)


def init_summary(record: dict) -> str:
    """The line a fine-tuning run prints about where its weights come from."""
    reset = record.get("reset")
    fresh = f"; fresh random weights for {', '.join(reset)}" if reset else ""
    return f"fine-tuning: initial weights from {record['run']} (step {record['step']}){fresh}"


def differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two (nested) config dicts differ."""
    names = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            names += differing_fields(x, y, f"{prefix}{key}.")
        elif x != y:
            names.append(f"{prefix}{key}")
    return names


def check_same_model(source: InitSource, model: dict) -> None:
    """Fine-tuning needs the source's model config exactly: one line naming the fields that differ."""
    differ = differing_fields(source.config.model, model)
    if differ:
        raise UserError(f"--init-from {source.record['run']} has another model config ({source.config.preset} preset): "
                        f"{', '.join(differ)} differ; pass the source's --preset and model flags")


def start_weights(run: RunConfig, out: Path, resume: bool) -> Path | None:
    """The folder whose model.safetensors the model starts from: the init_from source of a fine-tuning run,
    new or resumed before its first checkpoint; never when a checkpoint exists (it holds the weights)."""
    if run.init_from is None or (resume and latest_checkpoint(out) is not None):
        return None
    return Path(run.init_from["path"])


def open_run(args: argparse.Namespace, modality: str, fresh: Callable[[], RunConfig],
             model_flags: dict | None = None, source: InitSource | None = None) -> tuple[RunConfig, Path]:
    """The run config and directory for a training script.

    A new run gets ``fresh()``, checked against and recording the --init-from ``source`` if any;
    ``--resume`` reloads ``config.json`` and applies only the training flags given on the command line
    (e.g. a larger --max-steps). ``model_flags`` are the model and data flags the user set explicitly:
    on resume they must agree with the saved run.
    """
    preset = getattr(args, "preset", None) or "default"
    out = Path(args.output_dir) if args.output_dir else default_output_dir(preset)
    if args.resume or _is_main_process():
        # Only the main process checks a new run's directory: it may already have written this very
        # run's config.json when another process gets here (every process checked while parsing).
        check_output_dir(out, args.resume)
    if not args.resume:
        run = fresh()
        if source is not None:
            check_same_model(source, run.model)
            run.init_from = source.record
        return run, out
    run = check_resumable(out, modality, getattr(args, "preset", None))
    given, saved = getattr(args, "init_from", None), run.init_from or {}
    saved_source = saved.get("run")
    same = given == saved_source or (given is not None and Path(given).is_dir()
                                     and str(Path(given).resolve()) == saved.get("path"))
    if given is not None and not same:
        raise UserError(f"--init-from {given} differs from the resumed run's {saved_source or 'none'}; drop "
                        f"--init-from (a resumed run continues from its checkpoint) or choose a new --output-dir")
    reset = getattr(args, "init_reset", None)
    if reset and sorted(set(reset)) != saved.get("reset", []):
        raise UserError(f"--init-reset {' '.join(reset)} differs from the resumed run's "
                        f"{' '.join(saved.get('reset', [])) or 'none'}; drop the flag or choose a new --output-dir")
    for flag, value in (model_flags or {}).items():
        saved = run.extra.get("flags", {}).get(flag)
        if value is not None and saved is not None and value != saved:
            raise UserError(f"--{flag.replace('_', '-')} {value} differs from the resumed run's {saved}; "
                            f"drop the flag or choose a new --output-dir")
    run.train = replace(run.train, "training flags", **training_overrides(args))
    return run, out


def _is_main_process() -> bool:
    from .launch import process_state

    return process_state().is_main_process


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
