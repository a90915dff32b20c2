"""Which examples make each micro-batch: seeded per-epoch orders (optionally length buckets), split over
processes and accumulation steps, the same on every process and after a resume."""
from __future__ import annotations

import numpy as np
import torch

from .errors import UserError


class BatchPlan:
    """Which examples make each micro-batch: a seeded permutation per epoch, cut into global batches,
    each split over processes and accumulation steps. Deterministic given (seed, epoch), so a resumed
    run sees the same data order mid-epoch. ``stream`` tells apart plans that share a seed (the labelled
    stream of a semi-supervised run is stream 1).

    With ``lengths`` (one per example; text: tokens per sentence) the batches are length buckets: the
    epoch's permutation is sorted by length within pools of ``POOL_BATCHES`` global batches, cut into
    batches, and the batches are shuffled, so a batch holds sentences of nearly one length (an LSTM
    runs to its batch's longest sentence) while every example still comes once per epoch in a random
    batch order. Every process computes the same order from (seed, epoch)."""

    POOL_BATCHES = 64  # global batches sorted together: wide enough that a batch spans ~one length

    def __init__(self, n: int, global_batch: int, world: int, rank: int, accum: int, seed: int, stream: int = 0,
                 lengths=None):
        self.n, self.global_batch, self.world, self.rank, self.accum, self.seed = n, global_batch, world, rank, accum, seed
        self.stream = stream
        self.micro = global_batch // (world * accum)
        self.steps_per_epoch = n // global_batch
        # Kept as given (a memory-mapped array stays on disk: BookCorpus has ~70M sentences); read per pool.
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and self.lengths.shape != (n,):
            raise ValueError(f"lengths has shape {self.lengths.shape}, expected ({n},)")
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of examples; its first steps_per_epoch x global_batch make the batches."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.stream * 0x9E3779B9)
            perm = torch.randperm(self.n, generator=g)
            if self.lengths is not None:
                perm = self._bucketed(perm, g)
            self._perm = (epoch, perm)
        return self._perm[1]

    def _bucketed(self, perm: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # The remainder that makes no full batch is dropped at random, as without buckets.
        B, steps = self.global_batch, self.steps_per_epoch
        kept = perm[:steps * B]
        pool = self.POOL_BATCHES * B
        # A stable sort keeps equal lengths in their random order.
        kept = torch.cat([p[torch.sort(torch.from_numpy(self.lengths[p.numpy()].astype(np.int64)), stable=True).indices]
                          for p in kept.split(pool)])
        order = torch.randperm(steps, generator=g)
        return torch.cat([kept.view(steps, B)[order].reshape(-1), perm[steps * B:]])

    def micro_batches(self, epoch: int, start: int):
        """Index lists of this process's micro-batches from global batch ``start`` of ``epoch``."""
        perm = self.permutation(epoch)
        per_rank = self.global_batch // self.world
        for b in range(start, self.steps_per_epoch):
            batch = perm[b * self.global_batch:(b + 1) * self.global_batch]
            mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
            for j in range(self.accum):
                yield mine[j * self.micro:(j + 1) * self.micro].tolist()


def labelled_batch_size(cfg, n_labelled: int, world: int) -> int:
    """The global labelled batch of a semi-supervised run: --labelled-batch-size, by default
    min(--batch-size, labelled examples); it must split over processes x --grad-accum like --batch-size.
    Scripts call this before they write anything, so a bad value changes no file."""
    size = cfg.labelled_batch_size or min(cfg.batch_size, n_labelled)
    if size > n_labelled:
        raise UserError(f"--labelled-batch-size {size} is larger than the {n_labelled} labelled examples; lower it")
    if size % (world * cfg.grad_accum):
        raise UserError(f"the labelled batch of {size} does not split over {world} process(es) x --grad-accum "
                        f"{cfg.grad_accum}; set --labelled-batch-size to a multiple of {world * cfg.grad_accum}")
    return size


def to_device(batch: dict, device) -> dict:
    """A collated batch's tensors on ``device`` (non-blocking where the memory allows); other entries as they are."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
