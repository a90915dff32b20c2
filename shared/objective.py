"""What one optimiser step minimises, as the training loop calls it.

An objective turns one micro-batch into a loss and its figures: a 1-D float64 tensor of the bound
(mean over the batch), the KL of each latent group, then the objective's own ``extras``. The loop sums
losses and figures on the device over micro-batches (and processes) and reads them once per step.

- ``ElboObjective``: the negative ELBO under free bits (docs/design.md §5), through the wrapped model
  (DDP averages the gradients).
- ``SemiSupervisedObjective``: each step pairs an unlabelled batch with a batch of the small labelled
  set (docs/design.md §9b). Its loss calls the model several times outside DDP's forward, so it runs
  the unwrapped model and averages the gradients by hand after the last micro-batch.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .batching import BatchPlan, labelled_batch_size, to_device
from .free_bits import free_bits_kl


def training_loss(model, batch: dict, noise, lam: float, analytic_kl: bool = False):
    """The training loss of one micro-batch, (loss, model output): -log p(x|z) averaged over the batch
    plus the free-bits KL with lambda ``lam`` per group (docs/design.md §5). Benchmarks call it too, so
    they time what the engine runs."""
    out = model(batch, noise, analytic_kl=analytic_kl)
    kl_for_loss = out.kl_analytic if (analytic_kl and out.kl_analytic is not None) else out.kl
    return -out.log_px.mean() + (free_bits_kl(kl_for_loss, lam) if out.kl.shape[1] else 0.0), out


@dataclass
class Stream:
    """A stream of micro-batches beside the training set's: its plan, its data, and the TrainState fields
    that hold its position (saved in checkpoints)."""

    plan: BatchPlan
    dataset: Dataset
    epoch_field: str
    batch_field: str
    num_workers: int = 0


class ElboObjective:
    """-ELBO under free bits, one batch of the training set per micro-batch."""

    extras: tuple[str, ...] = ()
    streams: tuple[Stream, ...] = ()

    def __init__(self, accelerator, model, analytic_kl: bool = False):
        self.accelerator, self.model, self.analytic_kl = accelerator, model, analytic_kl

    def sync(self, last: bool):
        """DDP averages gradients at the last micro-batch of a step only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def loss(self, batch: dict, noise, lam: float):
        return training_loss(self.model, to_device(batch, self.accelerator.device), noise, lam, self.analytic_kl)

    def figures(self, out) -> torch.Tensor:
        return torch.cat([out.bound().detach().double().mean().view(1), out.kl.detach().double().mean(0)])

    def after_backward(self) -> None:
        pass


class SemiSupervisedObjective:
    """mean_labelled [F(x, y) + alpha CE] + mean_unlabelled [U(x)] (shared/semi.py); each micro-batch is
    an (unlabelled, labelled) pair, the labelled one from its own seeded stream (stream 1), which cycles
    through the small labelled set every few steps."""

    extras: tuple[str, ...] = ("cross_entropy", "accuracy")

    def __init__(self, accelerator, raw_model, cfg, labelled_set: Dataset, n_unlabelled: int):
        from .semi import alpha_rule

        classes = getattr(raw_model, "num_classes", 0)
        if not classes:
            raise ValueError("a semi-supervised run needs a model with num_classes > 0")
        self.accelerator, self.model, self.analytic_kl = accelerator, raw_model, cfg.analytic_kl
        world, rank = accelerator.num_processes, accelerator.process_index
        size = labelled_batch_size(cfg, len(labelled_set), world)
        plan = BatchPlan(len(labelled_set), size, world, rank, cfg.grad_accum, cfg.seed, stream=1)
        # The labelled set is small and cycles every few steps: no worker processes to restart each time.
        self.streams = (Stream(plan, labelled_set, "labelled_epoch", "labelled_batch_in_epoch", 0),)
        # alpha weighs the classifier's cross-entropy in the labelled loss (docs/design.md §9b).
        self.alpha = alpha_rule(len(labelled_set), n_unlabelled, cfg.classifier_weight)
        if accelerator.is_main_process:
            print(f"semi-supervised: {len(labelled_set)} labelled / {n_unlabelled} unlabelled training "
                  f"examples, {classes} classes, labelled batch {plan.global_batch}, classifier weight "
                  f"alpha = {self.alpha:.4g} (beta {cfg.classifier_weight} x (N_l + N_u) / N_l)", file=sys.stderr)

    def sync(self, last: bool):
        return contextlib.nullcontext()  # the unwrapped model, outside DDP: gradients are averaged below

    def loss(self, pair: tuple[dict, dict], noise, lam: float):
        from .semi import semi_supervised_loss

        unlabelled, labelled = (to_device(batch, self.accelerator.device) for batch in pair)
        terms = semi_supervised_loss(self.model, labelled, unlabelled, noise, lam, self.alpha,
                                     analytic_kl=self.analytic_kl)  # lam: the same lambda for every group
        return terms.loss, terms

    def figures(self, terms) -> torch.Tensor:
        # elbo: the unlabelled bound, a bound on log p(x) like the validation figure
        return torch.cat([terms.bound_unlabelled.detach().double().mean().view(1), terms.kl.detach().double().mean(0),
                          terms.cross_entropy.detach().double().view(1), terms.accuracy.detach().double().view(1)])

    def after_backward(self) -> None:
        """What DDP does after the last micro-batch, done by hand."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.accelerator.num_processes == 1 or not grads:
            return
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
