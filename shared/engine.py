"""The one training engine (DESIGN.md §8), on Hugging Face Accelerate.

The same loop trains every model of both modalities with ``python``, ``accelerate launch`` or
``torchrun``: Adamax, EMA weights for evaluation and export, gradient accumulation, mixed precision,
free bits on plateau, update skipping on non-finite or huge gradients, periodic validation over the
whole validation set, atomic checkpoints through ``save_state`` and an exact ``--resume``
(mid-epoch data position, RNG, EMA, free-bits state).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import run_dir as rd
from .distributions import TrainNoise
from .errors import UserError
from .evaluate import evaluate
from .free_bits import FreeBitsSchedule, free_bits_kl
from .model import LatentVariableModel

PREEMPT_EXIT_CODE = 143  # 128 + SIGTERM: schedulers read it as "stopped by signal"


class EMA:
    """Exponential moving average of the weights, kept in fp32; used for evaluation and export."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Short warm-up of the decay so early evaluations are not dominated by the initialisation.
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().float(), 1.0 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


class BatchPlan:
    """Which examples make each micro-batch: a seeded permutation per epoch, cut into global batches,
    each split over processes and accumulation steps. Deterministic given (seed, epoch), so a resumed
    run sees the same data order mid-epoch."""

    def __init__(self, n: int, global_batch: int, world: int, rank: int, accum: int, seed: int):
        self.n, self.global_batch, self.world, self.rank, self.accum, self.seed = n, global_batch, world, rank, accum, seed
        self.micro = global_batch // (world * accum)
        self.steps_per_epoch = n // global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def micro_batches(self, epoch: int, start: int):
        """Index lists of this process's micro-batches from global batch ``start`` of ``epoch``."""
        perm = self.permutation(epoch)
        per_rank = self.global_batch // self.world
        for b in range(start, self.steps_per_epoch):
            batch = perm[b * self.global_batch:(b + 1) * self.global_batch]
            mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            for j in range(self.accum):
                yield mine[j * self.micro:(j + 1) * self.micro].tolist()


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of this epoch consumed (skipped updates included)
    skipped_total: int = 0
    skipped_in_row: int = 0
    examples_seen: int = 0


class Trainer:
    def __init__(self, run: rd.RunConfig, build_model: Callable[[], LatentVariableModel],
                 train_set: Dataset, valid_set: Dataset, output_dir: str | Path, resume: bool = False,
                 on_evaluate: Callable | None = None, resume_command: str | None = None):
        from accelerate import Accelerator

        self.run, self.cfg = run, run.train
        self.output_dir = Path(output_dir)
        self.train_set, self.valid_set = train_set, valid_set
        self.on_evaluate = on_evaluate
        self.resume_command = resume_command or " ".join(sys.argv)
        cfg = self.cfg
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            dynamo_backend="inductor" if cfg.compile else None,
            step_scheduler_with_optimizer=False,
        )
        acc = self.accelerator
        world = acc.num_processes
        if cfg.batch_size % (world * cfg.grad_accum):
            raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} process(es) x "
                            f"--grad-accum {cfg.grad_accum}; choose a multiple of {world * cfg.grad_accum}")
        self.plan = BatchPlan(len(train_set), cfg.batch_size, world, acc.process_index, cfg.grad_accum, cfg.seed)
        if self.plan.steps_per_epoch == 0:
            raise UserError(f"the training set has {len(train_set)} examples, fewer than one batch of "
                            f"{cfg.batch_size}; lower --batch-size")
        if len(valid_set) == 0:
            raise UserError("the validation set is empty; give more data or a validation split")
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else (cfg.epochs or 1) * self.plan.steps_per_epoch

        # Same initial weights on every process; then per-process training noise.
        torch.manual_seed(cfg.seed)
        model = build_model()
        self.ema = EMA(model, cfg.ema_decay)
        optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema.model.to(acc.device)
        self.raw_model: LatentVariableModel = acc.unwrap_model(self.model)
        from accelerate.utils import set_seed

        set_seed(cfg.seed + 1, device_specific=True)
        G = self.raw_model.num_groups
        budget = cfg.free_bits * G if cfg.free_bits is not None else cfg.free_bits_budget
        self.free_bits = FreeBitsSchedule(budget, G, cfg.free_bits_patience, cfg.free_bits_factor,
                                          cfg.free_bits_threshold, cfg.free_bits_min)
        self.state = TrainState()
        self._stop_signal: str | None = None
        self.eval_batch_size = cfg.eval_batch_size or max(self.plan.micro, 1)
        self.resumed_from: int | None = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, record: dict) -> None:
        if self.is_main:
            rd.append_metrics(self.output_dir, record)

    def _trainer_state(self) -> dict:
        return {"train": vars(self.state), "free_bits": self.free_bits.state_dict(),
                "model": self.run.model, "modality": self.run.modality}

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        root = self.output_dir / rd.CHECKPOINTS
        final = root / f"step_{self.state.step}"
        if (final / "trainer_state.json").is_file():
            return final
        tmp = root / f".tmp_step_{self.state.step}"
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            ema_state = self.ema.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
            with open(tmp / "trainer_state.json", "w") as f:
                json.dump(self._trainer_state(), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # an incomplete leftover of the same step
                shutil.rmtree(final)
            os.replace(tmp, final)  # the checkpoint exists only once it is complete
            rd.export_weights(self.output_dir, ema_state)
            rd.prune_checkpoints(self.output_dir, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _resume(self) -> None:
        saved = rd.read_run_config(self.output_dir)
        if saved.modality != self.run.modality or saved.model != self.run.model:
            raise UserError(f"{self.output_dir} was made by a different model ({saved.modality}, preset "
                            f"{saved.preset}); resume with the same settings or choose a new --output-dir")
        latest = rd.latest_checkpoint(self.output_dir)
        if latest is None:
            return  # stopped before its first checkpoint: start over with the saved config
        step, path = latest
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("model") != self.run.model:
            raise UserError(f"checkpoint {path} was written by a different model; choose a new --output-dir")
        self.accelerator.load_state(str(path))
        self.ema.load_state_dict({k: v.to(self.accelerator.device) for k, v in load_file(str(path / "ema.safetensors")).items()})
        self.state = TrainState(**state["train"])
        self.free_bits.load_state_dict(state["free_bits"])
        self.resumed_from = step
        if self.is_main:
            rd.truncate_metrics(self.output_dir, step)

    def _handle_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name

    # ------------------------------------------------------------------ evaluation
    def validate(self, record_only: bool = False) -> dict:
        """Validate the EMA model; ``record_only`` skips the log, the schedule and the hook (a resumed
        run that has nothing left to do)."""
        res = evaluate(self.ema.model, self.valid_set, batch_size=self.eval_batch_size, seed=self.cfg.eval_seed,
                       accelerator=self.accelerator, max_examples=self.cfg.eval_examples, desc="valid")
        record = {"step": self.state.step, "split": "valid", "elbo": res.elbo, "kl": res.kl,
                  "kl_per_group": res.kl_per_group, "bits_per_dim": res.bits_per_dim_elbo,
                  "nats_per_dim": -res.elbo * res.num_examples / max(res.num_dims, 1.0),
                  "free_bits_budget": self.free_bits.budget, "num_examples": res.num_examples}
        if record_only:
            return record
        self.log(record)
        message = self.free_bits.step(res.elbo)
        if message:
            self.log({"step": self.state.step, "event": "free_bits", "budget": self.free_bits.budget,
                      "per_group": self.free_bits.per_group})
            if self.is_main:
                tqdm.write(message)
        if self.on_evaluate is not None and self.is_main:
            self.on_evaluate(self.ema.model, self.state.step, self.output_dir)
        self.accelerator.wait_for_everyone()
        return record

    # ------------------------------------------------------------------ training
    def _loader(self):
        plan = self.plan
        while True:
            batches = list(plan.micro_batches(self.state.epoch, self.state.batch_in_epoch))
            # A private generator: creating a loader must not consume the global RNG of the training noise.
            loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=self.cfg.num_workers,
                                generator=torch.Generator())
            it = iter(loader)
            for _ in range(len(batches) // plan.accum):
                yield [next(it) for _ in range(plan.accum)]
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _update(self, micro_batches: list[dict], noise) -> dict:
        acc, cfg = self.accelerator, self.cfg
        lam = self.free_bits.per_group
        A = len(micro_batches)
        totals = {"loss": 0.0, "elbo": 0.0}
        kl_sum = None
        finite = True
        for j, batch in enumerate(micro_batches):
            batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = contextlib.nullcontext() if j == A - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    out = self.model(batch, noise, analytic_kl=cfg.analytic_kl)
                    kl_for_loss = out.kl_analytic if (cfg.analytic_kl and out.kl_analytic is not None) else out.kl
                    loss = -out.log_px.mean() + (free_bits_kl(kl_for_loss, lam) if out.kl.shape[1] else 0.0)
                finite &= bool(torch.isfinite(loss))
                acc.backward(loss / A)
            totals["loss"] += float(loss.detach()) / A
            totals["elbo"] += float(out.bound().detach().mean()) / A
            kl = out.kl.detach().mean(0) / A
            kl_sum = kl if kl_sum is None else kl_sum + kl
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        # Every process must take the same decision: combine the local loss checks.
        flags = torch.tensor([0.0 if finite else 1.0, 1.0 if self._stop_signal else 0.0], device=acc.device)
        flags = acc.reduce(flags, reduction="sum")
        grad_norm = float(grad_norm)
        ok = flags[0].item() == 0 and math.isfinite(grad_norm) and (
            cfg.skip_threshold is None or grad_norm <= cfg.skip_threshold)
        if ok:
            self.optimizer.step()
            self.state.step += 1
            self.ema.update(self.raw_model, self.state.step)
            self.state.skipped_in_row = 0
        else:
            self.state.skipped_total += 1
            self.state.skipped_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.state.batch_in_epoch += 1
        self.state.examples_seen += cfg.batch_size
        if flags[1].item() > 0 and self._stop_signal is None:
            self._stop_signal = "SIGTERM"
        return {**totals, "kl_per_group": (kl_sum.tolist() if kl_sum is not None else []),
                "grad_norm": grad_norm, "skipped": not ok}

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        noise = TrainNoise()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main,
                   desc="train", dynamic_ncols=True)
        window: list[dict] = []
        t0, steps0 = time.time(), self.state.step
        last_record = None
        try:
            batches = self._loader()
            while self.state.step < self.total_steps:
                result = self._update(next(batches), noise)
                if result["skipped"]:
                    self.log({"step": self.state.step, "event": "skipped_update", "grad_norm": result["grad_norm"],
                              "loss": result["loss"], "skipped_in_row": self.state.skipped_in_row})
                    if self.state.skipped_in_row > cfg.max_skips:
                        raise UserError(
                            f"stopped: {self.state.skipped_in_row} updates in a row had a non-finite loss or a "
                            f"gradient norm above the threshold; the last good checkpoint is intact, resume it "
                            f"with a lower --lr or a --grad-clip")
                else:
                    window.append(result)
                    bar.update(1)
                step = self.state.step
                if not result["skipped"] and (step % cfg.log_every == 0 or step == self.total_steps) and window:
                    elapsed = max(time.time() - t0, 1e-9)
                    record = {
                        "step": step, "split": "train", "epoch": self.state.epoch,
                        "loss": sum(r["loss"] for r in window) / len(window),
                        "elbo": sum(r["elbo"] for r in window) / len(window),
                        "kl_per_group": [sum(v) / len(window) for v in zip(*(r["kl_per_group"] for r in window))],
                        "grad_norm": sum(r["grad_norm"] for r in window) / len(window),
                        "free_bits_budget": self.free_bits.budget, "lr": cfg.lr,
                        "steps_per_s": (step - steps0) / elapsed,
                        "examples_per_s": (step - steps0) * cfg.batch_size / elapsed,
                        "skipped_total": self.state.skipped_total,
                    }
                    record["kl"] = sum(record["kl_per_group"])
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.2f}", elbo=f"{record['elbo']:.2f}",
                                    kl=f"{record['kl']:.2f}", refresh=False)
                    window, t0, steps0 = [], time.time(), step
                if not result["skipped"] and (step % cfg.eval_every == 0 or step == self.total_steps):
                    last_record = self.validate()
                if not result["skipped"] and (step % cfg.save_every == 0 or step == self.total_steps):
                    self.save_checkpoint()
                if self._stop_signal:
                    path = self.save_checkpoint()
                    if self.is_main:
                        bar.close()
                        print(f"received {self._stop_signal}: saved checkpoint {path} at step {self.state.step}; "
                              f"resume with: {self.resume_command} --resume", file=sys.stderr)
                    raise SystemExit(PREEMPT_EXIT_CODE)
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if last_record is None:
            last_record = self.validate(record_only=True)
        return {"step": self.state.step, "valid": last_record, "skipped_total": self.state.skipped_total}
