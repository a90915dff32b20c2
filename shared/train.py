"""What every training script does once its flags are parsed: pick or reopen the run directory,
rebuild the saved config on --resume, and hand data and model to the engine."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from .cli import default_output_dir, training_overrides
from .config import RunConfig, replace
from .errors import UserError
from .run_dir import check_output_dir, check_resumable


def open_run(args: argparse.Namespace, modality: str, fresh: Callable[[], RunConfig],
             model_flags: dict | None = None) -> tuple[RunConfig, Path]:
    """The run config and directory for a training script.

    A new run gets ``fresh()``; ``--resume`` reloads ``config.json`` and applies only the training
    flags given on the command line (e.g. a larger --max-steps). ``model_flags`` are the model and
    data flags the user set explicitly: on resume they must agree with the saved run.
    """
    preset = getattr(args, "preset", None) or "default"
    out = Path(args.output_dir) if args.output_dir else default_output_dir(preset)
    if args.resume or _is_main_process():
        # Only the main process checks a new run's directory: it may already have written this very
        # run's config.json when another process gets here (every process checked while parsing).
        check_output_dir(out, args.resume)
    if not args.resume:
        return fresh(), out
    run = check_resumable(out, modality, getattr(args, "preset", None))
    for flag, value in (model_flags or {}).items():
        saved = run.extra.get("flags", {}).get(flag)
        if value is not None and saved is not None and value != saved:
            raise UserError(f"--{flag.replace('_', '-')} {value} differs from the resumed run's {saved}; "
                            f"drop the flag or choose a new --output-dir")
    run.train = replace(run.train, "training flags", **training_overrides(args))
    return run, out


def _is_main_process() -> bool:
    from .engine import process_state

    return process_state().is_main_process
