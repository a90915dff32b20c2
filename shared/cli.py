"""The command line shared by every script (docs/reference.md). Torch-free: flags are validated before
anything heavy is imported, so a wrong flag fails in well under a second."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import TrainConfig
from .errors import UserError
from .free_bits import THRESHOLD_MODES, FreeBitsSchedule
from .tracking import REPORT_TO


class ArgumentParser(argparse.ArgumentParser):
    """argparse with docs/reference.md's error format: one line on stderr, exit status 2.

    Checks registered in ``checks`` (e.g. by ``add_training_flags``) run right after parsing, still
    before anything heavy is imported.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks: list = []

    def error(self, message: str):  # noqa: D102
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):  # noqa: D102
        parsed = super().parse_args(args, namespace)
        for check in self.checks:
            try:
                check(parsed)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
        return parsed


def _number(kind, low=None, high=None, low_open=False, name="a number"):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if kind is float and value != value:  # NaN
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value
    return parse


positive_int = _number(int, 1, name="a positive integer")
nonneg_int = _number(int, 0, name="an integer >= 0")
positive_float = _number(float, 0.0, float("inf"), low_open=True, name="a positive number")
nonneg_float = _number(float, 0.0, float("inf"), name="a number >= 0")
fraction = _number(float, 0.0, 1.0, name="a number in [0, 1]")
open_fraction = _number(float, 0.0, 1.0, low_open=True, name="a number in (0, 1]")
any_int = _number(int, name="an integer")


def word_or(word: str, parse, what: str, value=None):
    """A parser that takes ``word`` (returned as ``value``) or whatever ``parse`` accepts (``what``)."""
    def parser(text: str):
        if text == word:
            return value
        try:
            return parse(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected {what} or {word!r}, got {text!r}") from None

    return parser


auto_or_positive_int = word_or("auto", positive_int, "a positive integer")  # 'auto' -> None: the program chooses


def add_training_flags(p: argparse.ArgumentParser, presets: list[str], modality: str | None = None) -> None:
    """The engine's flags, identical in every training script. Unset flags keep the preset's value.
    With ``modality``, --resume of another modality's run fails while parsing."""
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=presets, help="named configuration; the flags below override its fields")
    g.add_argument("--output-dir", type=Path, help="run directory (default: runs/<preset>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    g.add_argument("--init-from", metavar="RUN",
                   help="fine-tuning: start a new run from the exported (EMA) weights of RUN (a run directory, a folder "
                        "written by scripts/export.py or a hub id owner/name) with the same model config; optimiser, "
                        "step and free-bits schedule start fresh (e.g. --free-bits 0); recorded in config.json "
                        "(default: none, random initial weights)")
    g.add_argument("--init-reset", nargs="+", metavar="PART",
                   help="with --init-from: parts of the model (module names, e.g. decoder) that start from fresh "
                        "random weights instead of the source's, as in Li et al. (2019)'s recipe of a pretrained "
                        "encoder with a new decoder; recorded in config.json (default: none, every weight from RUN)")
    g.add_argument("--report-to", choices=REPORT_TO,
                   help="experiment trackers besides metrics.jsonl: tensorboard (event files in "
                        "RUN/tensorboard/), wandb, mlflow, all (every one installed) or none (default: tensorboard "
                        "when it is installed, else none; saved in config.json, kept on --resume)")
    t = p.add_argument_group("training (defaults come from the preset)")
    t.add_argument("--max-steps", type=positive_int, help="optimiser steps to train for (skipped updates do not count)")
    t.add_argument("--epochs", type=positive_int, help="epochs to train for, when --max-steps is not given")
    t.add_argument("--max-minutes", type=positive_float,
                   help="also stop, as at the last step (checkpoint, final validation, export), once the run has "
                        "trained this many minutes of wall-clock time, validation and checkpoints included and "
                        "earlier sessions of a resumed run counted (default: no limit)")
    t.add_argument("--batch-size", type=positive_int, help="global batch per optimiser step (over processes x --grad-accum)")
    t.add_argument("--grad-accum", type=positive_int, help="gradient accumulation steps")
    t.add_argument("--lr", type=positive_float, help="Adamax learning rate")
    t.add_argument("--seed", type=nonneg_int, help="seed of the training noise and data order")
    t.add_argument("--split-seed", type=nonneg_int, help="seed of the train/validation/test carving (default 0)")
    t.add_argument("--eval-every", type=positive_int, help="validate every N optimiser steps")
    t.add_argument("--eval-examples", type=positive_int,
                   help="validate on this many examples: one fixed random subset drawn from the config's eval_seed, "
                        "stratified by class where the data have labels (default: all)")
    t.add_argument("--eval-batch-size", type=positive_int, help="batch size of evaluation")
    t.add_argument("--save-every", type=positive_int, help="checkpoint every N optimiser steps")
    t.add_argument("--keep-checkpoints", type=positive_int, help="keep the last N checkpoints")
    t.add_argument("--log-every", type=positive_int, help="write training metrics every N steps")
    t.add_argument("--ema-decay", type=fraction, help="decay of the EMA weights used for evaluation and export")
    f = p.add_argument_group("free bits (docs/design.md §5)")
    f.add_argument("--free-bits", type=nonneg_float, help="lambda per latent group, in nats (images)")
    f.add_argument("--free-bits-budget", type=nonneg_float, help="total budget B in nats, split over the groups (text), "
                                                                   "lowered on plateaus of the validation ELBO")
    f.add_argument("--free-bits-patience", type=positive_int,
                   help="evaluations in a row without an improvement (see --free-bits-threshold) before B drops")
    f.add_argument("--free-bits-factor", type=fraction,
                   help="on a plateau B <- max(B * factor, --free-bits-min) (0: straight to the floor)")
    f.add_argument("--free-bits-threshold", type=nonneg_float,
                   help="a validation ELBO is an improvement only when it beats the best so far by more than this; "
                        "the best moves only on an improvement, so a slow steady gain is no plateau "
                        "(ReduceLROnPlateau's rule)")
    f.add_argument("--free-bits-threshold-mode", choices=THRESHOLD_MODES,
                   help="abs: --free-bits-threshold in nats per example; rel: a fraction of |best ELBO| "
                        "(default abs)")
    f.add_argument("--free-bits-min", type=nonneg_float,
                   help="floor of the total budget B in nats: B stops there (per group: floor / groups); 0 goes "
                        f"down to the plain ELBO, reached once lambda per group would fall below "
                        f"{FreeBitsSchedule.ZERO_BELOW:g} nats")
    f.add_argument("--analytic-kl", action="store_true", default=None,
                   help="closed-form KL for top-down groups in the training loss (reported bounds never change)")
    s = p.add_argument_group("speed and safety")
    s.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                   help="autocast precision of training and validation; log-densities, KL and bounds stay fp32 "
                        "(default no; bf16 also on a CPU: much faster where oneDNN has bf16 kernels, AVX512 and best "
                        "AVX512-BF16/AMX, several times slower on AVX2 alone, where a warning says so)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (inductor) the model and the optimiser's step; the first step's time, "
                        "compilation included, is printed (default: the preset's; the binary preset compiles where "
                        "it trains on a CPU in fp32 or bf16, measured 1.03-1.10x and 1.20x faster than eager on 2 "
                        "cores after 2-3 minutes of compiling on a cold cache; other presets, GPUs and fp16 stay "
                        "eager until measured; --no-compile runs eager)")
    s.add_argument("--grad-clip", type=positive_float, help="clip the global gradient norm to this value")
    s.add_argument("--skip-threshold", type=positive_float, help="skip updates whose gradient norm exceeds this")
    s.add_argument("--max-skips", type=positive_int, help="stop after this many skipped updates in a row")
    s.add_argument("--num-workers", type=nonneg_int, help="data loader worker processes")
    if modality == "text":
        s.add_argument("--no-length-buckets", dest="length_buckets", action="store_false", default=None,
                       help="draw batches from a plain random permutation instead of length buckets (default: "
                            "buckets, so the LSTM runs over little padding; every sentence once per epoch either way)")
    if modality == "image":
        s.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None,
                       help="keep feature maps in NCHW instead of channels_last (NHWC), which measured about 1.1x "
                            "faster on a CPU; numbers equal up to float rounding (default: channels_last)")
    if isinstance(p, ArgumentParser):
        p.checks.append(lambda args: check_run_flags(args, modality))
        p.checks.append(check_report_to)


def check_run_flags(args: argparse.Namespace, modality: str | None = None) -> None:
    """The run directory must fit --resume, checked before data or torch are loaded. Under torchrun
    every process checks here, before the processes meet, so none can see a config.json that the
    main process wrote for this very run."""
    from .checkpoints import check_resumable
    from .run_dir import check_output_dir

    if args.resume and args.output_dir is None:
        raise UserError("--resume needs --output-dir, the run directory to continue")
    if args.output_dir is not None:
        check_output_dir(args.output_dir, args.resume)
        if args.resume:
            check_resumable(args.output_dir, modality, getattr(args, "preset", None))


def check_report_to(args: argparse.Namespace) -> None:
    """The trackers' packages must be installed. A new run without --report-to records the resolved
    default; a resumed one keeps the tracker saved in its config.json."""
    from .run_dir import read_run_config
    from .tracking import default_report_to, resolve

    if args.report_to is None and args.resume:
        saved = read_run_config(args.output_dir).train.report_to
        resolve(saved, f"the run's report_to {saved} (config.json)")
        return
    if args.report_to is None:
        args.report_to = default_report_to()
    resolve(args.report_to)


TRAIN_FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def training_overrides(args: argparse.Namespace) -> dict:
    """TrainConfig fields the user set explicitly on the command line."""
    return {name: getattr(args, name) for name in TRAIN_FIELDS
            if getattr(args, name, None) is not None}


def default_output_dir(preset: str) -> Path:
    import time

    return Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def pick_device(name: str | None = "auto") -> str:
    """A --device value as a torch device name: "auto" (or None) is cuda when a GPU is visible, else cpu;
    cuda asked for where none is visible is one error line. Imports torch."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is visible; use --device cpu")
    return name
