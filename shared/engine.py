"""The one training engine (docs/design.md §8), on Hugging Face Accelerate: the training loop, top to bottom.

The same loop trains every model of both modalities with ``python``, ``accelerate launch`` or
``torchrun``: Adamax, EMA weights for evaluation and export, gradient accumulation, mixed precision,
free bits on plateau, update skipping on non-finite or huge gradients, periodic validation, atomic
checkpoints and an exact ``--resume``. What it builds on, one concern a module: ``launch`` (processes,
device, runtime settings), ``objective`` (what a step minimises: plain or semi-supervised),
``batching`` (which examples make each batch), ``optim`` (gradient norm, compiled optimiser step),
``ema``, ``checkpoints`` (writes and resume with the storage-fault protocol), ``metrics_log``
(metrics.jsonl and the logging window), ``tracking`` (TensorBoard, W&B, MLflow).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import run_dir as rd
from . import tracking
from .batching import BatchPlan
from .checkpoints import Checkpoints
from .config import RunConfig
from .debug_hooks import Faults, dump_state
from .distributions import TrainNoise
from .ema import EMA
from .errors import UserError, is_disk_full
from .evaluate import classification_error, evaluate, subset_info
from .free_bits import FreeBitsSchedule
from .launch import (compile_wanted, cpu_bf16_warning, default_resume_command, keep_freed_cpu_memory,
                     launched_processes, process_state, use_cpu)
from .metrics_log import LogWindow, MetricsLog, read_metrics
from .model import LatentVariableModel
from .objective import ElboObjective, SemiSupervisedObjective, Stream
from .optim import compile_optimizer_step, grad_norm

PREEMPT_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "stopped by signal" (130 after SIGINT)


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of this epoch consumed (skipped updates included)
    skipped_total: int = 0
    skipped_in_row: int = 0
    examples_seen: int = 0
    # Semi-supervised runs: the labelled stream's position (it cycles through many epochs per unlabelled one).
    labelled_epoch: int = 0
    labelled_batch_in_epoch: int = 0


class Trainer:
    def __init__(self, run: RunConfig, build_model: Callable[[], LatentVariableModel],
                 train_set: Dataset, valid_set: Dataset, output_dir: str | Path, resume: bool = False,
                 on_evaluate: Callable | None = None, resume_command: str | None = None,
                 labelled_set: Dataset | None = None, init_weights: str | Path | None = None):
        """``labelled_set`` (items with ``"y"``) makes the run semi-supervised (docs/design.md §9b):
        ``train_set`` is then the unlabelled stream, and each optimiser step draws one batch of each.
        ``init_weights``: a folder whose model.safetensors are the initial weights (fine-tuning, --init-from;
        shared.train.start_weights); a checkpoint found by ``resume`` replaces them."""
        from accelerate import Accelerator, PartialState
        from accelerate.utils import ProjectConfiguration, set_seed

        from .train import reset_state

        self.run, self.cfg = run, run.train
        self.output_dir = Path(output_dir)
        self.train_set, self.valid_set, self.labelled_set = train_set, valid_set, labelled_set
        self.on_evaluate = on_evaluate
        self.resume_command = resume_command or default_resume_command()
        cfg = self.cfg
        process_state()
        self.tracker_names = tracking.resolve(cfg.report_to, f"report_to {cfg.report_to}")
        # the device accelerate will pick (one process-wide state, shared with the Accelerator below)
        self.compiled = compile_wanted(cfg.compile, PartialState(cpu=use_cpu()).device.type, cfg.mixed_precision)
        self.accelerator = acc = Accelerator(
            cpu=use_cpu(),
            mixed_precision=cfg.mixed_precision,
            dynamo_backend="inductor" if self.compiled else None,
            step_scheduler_with_optimizer=False,
            log_with=self.tracker_names or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / tracking.LOG_DIR)),
        )
        warning = cpu_bf16_warning(acc.device.type, cfg.mixed_precision)
        if warning and acc.is_main_process:
            print(warning, file=sys.stderr)
        if acc.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
        else:
            keep_freed_cpu_memory()
        world = acc.num_processes
        if world < launched_processes():
            raise RuntimeError(f"{launched_processes()} processes were started but only {world} joined: create the "
                               f"process state with shared.launch.process_state(), not PartialState()")
        self.faults = Faults(acc.process_index)
        self.metrics = MetricsLog(self.output_dir)  # written by the main process
        if cfg.batch_size % (world * cfg.grad_accum):
            raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} process(es) x "
                            f"--grad-accum {cfg.grad_accum}; choose a multiple of {world * cfg.grad_accum}")
        lengths = None
        if cfg.length_buckets:
            lengths = getattr(train_set, "lengths", None)
            if lengths is None:
                raise ValueError("length_buckets needs a training set with per-example lengths (.lengths)")
        self.plan = BatchPlan(len(train_set), cfg.batch_size, world, acc.process_index, cfg.grad_accum, cfg.seed,
                              lengths=lengths)
        if self.plan.steps_per_epoch == 0:
            raise UserError(f"the training set has {len(train_set)} examples, fewer than one batch of "
                            f"{cfg.batch_size}; lower --batch-size")
        if len(valid_set) == 0:
            raise UserError("the validation set is empty; give more data or a validation split")
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else (cfg.epochs or 1) * self.plan.steps_per_epoch

        # Same initial weights on every process; then per-process training noise.
        torch.manual_seed(cfg.seed)
        model = build_model()
        if init_weights is not None:  # before the EMA copy: both start from the source's weights
            reset = (run.init_from or {}).get("reset") or []
            fresh = reset_state(model, reset)  # this model's own random initial values of those parts
            rd.load_weights(init_weights, model)
            model.load_state_dict(fresh, strict=False)
        self.ema = EMA(model, cfg.ema_decay)
        optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
        if self.compiled:
            compile_optimizer_step(optimizer)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema.model.to(acc.device)
        self.raw_model: LatentVariableModel = acc.unwrap_model(self.model)
        if labelled_set is not None:
            self.objective = SemiSupervisedObjective(acc, self.raw_model, cfg, labelled_set, len(train_set))
        else:
            self.objective = ElboObjective(acc, self.model, cfg.analytic_kl)
        self.streams = (Stream(self.plan, train_set, "epoch", "batch_in_epoch", cfg.num_workers),
                        *self.objective.streams)
        set_seed(cfg.seed + 1, device_specific=True)
        G = self.raw_model.num_groups
        budget = cfg.free_bits * G if cfg.free_bits is not None else cfg.free_bits_budget
        self.free_bits = FreeBitsSchedule(budget, G, cfg.free_bits_patience, cfg.free_bits_factor,
                                          cfg.free_bits_threshold, cfg.free_bits_min, cfg.free_bits_threshold_mode)
        self.state = TrainState()
        self.window = LogWindow(self.objective.extras)
        self._stop_signal: str | None = None
        self.eval_batch_size = cfg.eval_batch_size or max(self.plan.micro, 1)
        subset = subset_info(len(valid_set), cfg.eval_examples, cfg.eval_seed, getattr(valid_set, "labels", None))
        if subset is not None and self.is_main:  # the same examples at every validation (evaluate draws them)
            print(f"validation: a fixed subset of {subset['size']} of {subset['of']} examples drawn with eval_seed "
                  f"{subset['seed']}" + (", stratified by class" if subset["stratified"] else ""), file=sys.stderr)
        self.resumed_from: int | None = None
        # --max-minutes: training time of earlier sessions of this run (from the checkpoint) + this one's
        self._seconds_before, self._clock = 0.0, None
        self.checkpoints = Checkpoints(self)
        if resume:
            self.checkpoints.resume()
        self._start_tracking(resume)

    def restore(self, state: dict, step: int) -> None:
        """Take the trainer state of the checkpoint of ``step`` (Checkpoints.resume)."""
        self.state = TrainState(**state["train"])
        self.free_bits.load_state_dict(state["free_bits"])
        self._seconds_before = float(state.get("train_seconds", 0.0))  # absent before --max-minutes existed
        if "log_window" in state:
            self.window.load_state_dict(state["log_window"])
        self.resumed_from = step

    # ------------------------------------------------------------------ bookkeeping
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, record: dict) -> None:
        if self.is_main:
            self.write_metrics(record)
            self.tracking.log(record)  # after the source of truth is written (or held, on a full disk)

    def write_metrics(self, *records: dict, stop_when_full: bool = False) -> None:
        full = self.faults.full_since("enospc-metrics", self.state.step)
        self.metrics.write(*records, step=self.state.step, stop_when_full=stop_when_full,
                           fail_after=10 if full else None)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save()

    def _start_tracking(self, resume: bool) -> None:
        """Trackers, once the resumed checkpoint is known. TensorBoard hides what the interrupted launch
        logged from that step on, so the records of that step left in metrics.jsonl, and the samples of an
        evaluation there, are logged again (tracking.py)."""
        resumed = self.resumed_from if resume else None
        had_events = (self.output_dir / tracking.LOG_DIR).is_dir()
        self.tracking = tracking.Tracking(self.accelerator, self.tracker_names, self.output_dir, self.run.to_json(),
                                          resumed_from=resumed)
        if resumed is None or self.tracking.log_dir is None:
            return
        # A run that starts reporting on --resume gets its earlier scalars too.
        again = [r for r in read_metrics(self.output_dir) if r.get("step", 0) >= (resumed if had_events else 0)]
        for record in again:
            self.tracking.log(record, only="tensorboard")
        if any(r.get("split") == "valid" for r in again):
            self._evaluate_hook(only="tensorboard")

    def _handle_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name

    @property
    def train_seconds(self) -> float:
        """Wall-clock seconds this run has trained, over all its sessions (validation and checkpoints
        included; start-up and data preparation not)."""
        return self._seconds_before + (time.monotonic() - self._clock if self._clock is not None else 0.0)

    def _out_of_time(self) -> bool:
        return self.cfg.max_minutes is not None and self.train_seconds >= 60.0 * self.cfg.max_minutes

    # ------------------------------------------------------------------ evaluation
    def validate(self, final: bool = False, log: bool = True) -> dict:
        """Validate the EMA model. A scheduled validation logs its record, steps the free-bits schedule
        and calls ``on_evaluate``; the ``final`` one at the end of a run (after the last checkpoint)
        leaves the schedule alone, and with ``log=False`` only returns the record."""
        cfg = self.cfg
        res = evaluate(self.ema.model, self.valid_set, batch_size=self.eval_batch_size, seed=cfg.eval_seed,
                       accelerator=self.accelerator, max_examples=cfg.eval_examples, desc="valid")
        record = {"step": self.state.step, "split": "valid", "elbo": res.elbo, "kl": res.kl,
                  "kl_per_group": res.kl_per_group, "bits_per_dim": res.bits_per_dim_elbo,
                  "nats_per_dim": -res.elbo * res.num_examples / max(res.num_dims, 1.0),
                  "free_bits_budget": self.free_bits.budget, "num_examples": res.num_examples}
        if getattr(self.ema.model, "num_classes", 0) and getattr(self.valid_set, "labels", None) is not None:
            record["classification_error"] = classification_error(
                self.ema.model, self.valid_set, self.accelerator, batch_size=self.eval_batch_size,
                max_examples=cfg.eval_examples, seed=cfg.eval_seed)
        if not log:
            return record
        self.log(record)
        self.faults.kill_if("kill-eval", self.state.step)
        if not final and self.raw_model.num_groups:  # no latents (a language model): nothing to schedule
            message = self.free_bits.step(res.elbo)
            if message:
                self.log({"step": self.state.step, "event": "free_bits", "budget": self.free_bits.budget,
                          "per_group": self.free_bits.per_group})
                if self.is_main:
                    tqdm.write(message)
        self._evaluate_hook()
        self.accelerator.wait_for_everyone()
        return record

    def _evaluate_hook(self, only: str | None = None) -> None:
        """``on_evaluate`` on the main process; what it returns (samples, see Tracking.log_media) goes to the trackers."""
        if self.on_evaluate is not None and self.is_main:
            # Its own seeded RNG: samples are the same after a resume, and drawing them never moves the
            # training noise (which would make a run depend on whether samples are written).
            device = self.accelerator.device
            with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [],
                                       device_type=device.type if device.type != "cpu" else None):
                torch.manual_seed(self.cfg.eval_seed * 1_000_003 + self.state.step)
                try:
                    media = self.on_evaluate(self.ema.model, self.state.step, self.output_dir)
                except OSError as error:
                    if not is_disk_full(error):
                        raise
                    # Samples are a view of the run, not its state: a full disk skips them, with one line.
                    tqdm.write(f"warning: {os.strerror(error.errno).lower()} ({error.filename}): no samples written "
                               f"at step {self.state.step}", file=sys.stderr)
                    return
            self.tracking.log_media(media, self.state.step, only=only)

    # ------------------------------------------------------------------ training
    def _loader(self):
        """This process's micro-batches of each optimiser step; with more than one stream (a semi-supervised
        run) tuples of one micro-batch per stream, each stream resuming at its own position in ``self.state``."""
        streams = [self._stream(s) for s in self.streams]
        if len(streams) == 1:
            yield from streams[0]
            return
        while True:
            yield list(zip(*(next(s) for s in streams)))

    def _stream(self, stream: Stream):
        """Endless micro-batches of ``stream`` from the position held in ``self.state`` (``_update``
        advances the batch)."""
        plan, epoch, batch_in_epoch = stream.plan, stream.epoch_field, stream.batch_field
        while True:
            batches = list(plan.micro_batches(getattr(self.state, epoch), getattr(self.state, batch_in_epoch)))
            # A private generator: creating a loader must not consume the global RNG of the training noise.
            loader = DataLoader(stream.dataset, batch_sampler=batches, num_workers=stream.num_workers,
                                generator=torch.Generator())
            it = iter(loader)
            for _ in range(len(batches) // plan.accum):
                yield [next(it) for _ in range(plan.accum)]
            setattr(self.state, epoch, getattr(self.state, epoch) + 1)
            setattr(self.state, batch_in_epoch, 0)

    def _update(self, micro_batches: list, noise) -> dict:
        acc, cfg, fault, objective = self.accelerator, self.cfg, self.faults, self.objective
        attempt = self.state.step + self.state.skipped_total + 1
        if fault("sigterm", attempt):
            os.kill(os.getpid(), signal.SIGTERM)
        lam = self.free_bits.per_group
        A = len(micro_batches)
        # Local sums: bad-update flag, stop flag, loss, then the objective's figures (bound, KL per group G,
        # extras), then the time-limit flag.
        G, extras = self.raw_model.num_groups, objective.extras
        local = torch.zeros(5 + G + len(extras), dtype=torch.float64, device=acc.device)
        for j, batch in enumerate(micro_batches):
            with objective.sync(last=j == A - 1):
                with acc.autocast():
                    loss, out = objective.loss(batch, noise, lam)
                if j == 0 and fault.active:
                    loss = loss * (float("nan") if fault("nan-loss", attempt) else 1e6 if fault("big-grad", attempt) else 1.0)
                local[0] += ~torch.isfinite(loss.detach())  # counted on the device: no sync per micro-batch
                acc.backward(loss / A)
            local[2] += loss.detach().double() / A
            local[3:-1] += objective.figures(out) / A
        objective.after_backward()
        if fault("nan-grad", attempt):
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        norm = grad_norm(list(self.model.parameters()), cfg.grad_clip or None, acc)
        norm = torch.as_tensor(norm, device=acc.device).detach().double()
        # VDVAE's guard: skip an update whose gradient norm is non-finite or above the threshold.
        local[0] += ~torch.isfinite(norm)
        if cfg.skip_threshold is not None:
            local[0] += norm > cfg.skip_threshold
        local[1] = 1.0 if self._stop_signal else 0.0
        # Each process reads its own clock; the sum decides for all.
        local[-1] = 1.0 if self._out_of_time() or fault.full_since("out-of-time", attempt) else 0.0
        # One collective: every process takes the same decision (skip, stop), even where a fault is seen by
        # one process only, and logs the figures of the whole global batch, not just its own share.
        world = acc.num_processes
        total = acc.reduce(local, reduction="sum") if world > 1 else local
        # The step's one host synchronisation: the decision and every figure in a single transfer (the
        # norm is this process's own).
        figures = torch.cat([total, norm.view(1)]).tolist()
        norm_value = figures[-1]
        ok = figures[0] == 0
        if ok:
            self.optimizer.step()
            self.state.step += 1
            self.ema.update(self.raw_model, self.state.step)
            self.state.skipped_in_row = 0
        else:
            self.state.skipped_total += 1
            self.state.skipped_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        for stream in self.streams:
            setattr(self.state, stream.batch_field, getattr(self.state, stream.batch_field) + 1)
        self.state.examples_seen += cfg.batch_size
        stop, out_of_time = figures[1] > 0, figures[-2] > 0  # figures = the summed slots, then this process's norm
        if stop and self._stop_signal is None:  # another process was signalled
            self._stop_signal = "SIGTERM"
        result = {"loss": figures[2] / world, "elbo": figures[3] / world,
                  "kl_per_group": [v / world for v in figures[4:4 + G]], "grad_norm": norm_value, "skipped": not ok,
                  "stop": stop, "out_of_time": out_of_time}
        result.update({name: figures[4 + G + i] / world for i, name in enumerate(extras)})
        return result

    def _log_train(self, t0: float, steps0: int) -> dict:
        w, step = self.window, self.state.step
        elapsed = max(time.time() - t0, 1e-9)
        kl_per_group = [v / w.count for v in w.kl]
        record = {
            "step": step, "split": "train", "epoch": self.state.epoch,
            "loss": w.loss / w.count, "elbo": w.elbo / w.count, "kl_per_group": kl_per_group,
            "kl": sum(kl_per_group), "grad_norm": w.grad_norm / w.count,
            "free_bits_budget": self.free_bits.budget, "lr": self.cfg.lr,
            "steps_per_s": (step - steps0) / elapsed,
            "examples_per_s": (step - steps0) * self.cfg.batch_size / elapsed,
            "skipped_total": self.state.skipped_total,
        }
        record.update({name: total / w.count for name, total in w.extras.items()})
        self.log(record)
        self.window = LogWindow(self.objective.extras)
        return record

    def fit(self) -> dict:
        """Train to ``total_steps``. Validation, logging and checkpoints follow the step grid
        (``eval_every``, ``log_every``, ``save_every``) and a checkpoint is saved at the last step;
        what an off-grid last step adds (a partial train record, a final validation) comes after
        that checkpoint, so a run resumed from it writes exactly what an uninterrupted run writes.

        With ``max_minutes`` the run also ends, the same way, after the first step that finds the time
        used up on any process (every process stops at that step); a resumed run counts its earlier
        sessions' time too, so resuming one that ran out of time trains no further."""
        cfg = self.cfg
        self._clock = time.monotonic()
        out_of_time = cfg.max_minutes is not None and self._seconds_before >= 60.0 * cfg.max_minutes  # resumed
        if out_of_time:
            self.total_steps = min(self.total_steps, self.state.step)
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        noise = TrainNoise()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main,
                   desc="train", dynamic_ncols=True)
        t0, steps0 = time.time(), self.state.step
        last_record = None
        try:
            batches = self._loader()
            compiling = self.compiled  # torch.compile runs inside the first step: say how long it took
            if compiling and self.is_main:
                tqdm.write("compile: the first step compiles the training step (minutes on a CPU on a cold cache; "
                           "--no-compile runs it eager)", file=sys.stderr)
            while self.state.step < self.total_steps:
                started = time.perf_counter()
                result = self._update(next(batches), noise)
                if compiling:
                    compiling = False
                    if self.is_main:
                        tqdm.write(f"compile: the first step, compilation included, took "
                                   f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
                step = self.state.step
                if result["out_of_time"] and step < self.total_steps:
                    out_of_time, self.total_steps = True, step  # this step is the last: saved below
                    bar.total = step
                if result["skipped"]:
                    self.log({"step": step, "event": "skipped_update", "grad_norm": result["grad_norm"],
                              "loss": result["loss"], "skipped_in_row": self.state.skipped_in_row,
                              "skipped_total": self.state.skipped_total})
                    if self.state.skipped_in_row > cfg.max_skips:
                        raise UserError(
                            f"stopped: {self.state.skipped_in_row} updates in a row had a non-finite loss or a "
                            f"gradient norm above the threshold (--max-skips {cfg.max_skips}); the last good "
                            f"checkpoint is intact: resume it with a lower --lr or a --grad-clip")
                    if out_of_time and step == self.total_steps:
                        self.save_checkpoint()  # the time ran out on a skipped update
                else:
                    self.window.add(result)
                    bar.update(1)
                    if step % cfg.log_every == 0:
                        record = self._log_train(t0, steps0)
                        bar.set_postfix(loss=f"{record['loss']:.2f}", elbo=f"{record['elbo']:.2f}",
                                        kl=f"{record['kl']:.2f}", refresh=False)
                        t0, steps0 = time.time(), step
                    if step % cfg.eval_every == 0:
                        last_record = self.validate()
                    if step % cfg.save_every == 0 or step == self.total_steps:
                        self.save_checkpoint()
                if result["stop"] and step < self.total_steps:
                    self._preempt(bar)
            # The end of the run, after its last checkpoint (see the docstring).
            if self.window.count:
                self._log_train(t0, steps0)
            step = self.state.step
            if out_of_time and self.is_main:
                tqdm.write(f"--max-minutes {cfg.max_minutes:g}: the time was used up at step {step} "
                           f"({self.train_seconds / 60:.1f} minutes of training)", file=sys.stderr)
            if last_record is None or last_record["step"] != step:
                # Logged only off the grid: on it, the record is already in the log (maybe from before a resume).
                last_record = self.validate(final=True, log=step % cfg.eval_every != 0)
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.tracking.finish()
        dump_state(self)
        return {"step": self.state.step, "valid": last_record, "skipped_total": self.state.skipped_total}

    def _preempt(self, bar) -> None:
        """SIGTERM or SIGINT on any process: every process saves the checkpoint and exits with 128 + the
        signal's number, and the main process says how to resume."""
        path = self.save_checkpoint()
        dump_state(self)
        if self.is_main:
            bar.close()
            print(f"received {self._stop_signal}: saved checkpoint {path} at step {self.state.step}; "
                  f"resume with: {self.resume_command}", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[self._stop_signal].value)  # 143 for SIGTERM, 130 for SIGINT
