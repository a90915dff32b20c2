"""Bounds on log p(x) (docs/design.md §3): the ELBO L_1, the importance-weighted L_K, L^{>k}, bits/dim,
and active units. Evaluation noise is keyed by (seed, example index, sample index), so every figure
is the same whatever the batch size, the chunking of samples, or the number of processes.

For a conditional (semi-supervised) model a batch with "y" is scored as (x, y) (log p(x, y)), one
without "y" with y summed out (shared/semi.py), so every report and validation works unchanged.
"""
from __future__ import annotations

import math

import torch

from .distributions import HashedNoise
from . import semi
from .model import LatentVariableModel, repeat_batch  # noqa: F401 (repeat_batch: also imported from here)


def bits_per_dim(bound_nats: torch.Tensor | float, dims: torch.Tensor | float):
    """-L / (D ln 2), for a bound L in nats over D scored dimensions."""
    return -bound_nats / (dims * math.log(2.0))


@torch.no_grad()
def elbo(model: LatentVariableModel, batch: dict, seed: int = 0, k: int = 0):
    """L_1 (k = 0) or L^{>k} per example, with per-example seeded noise. Returns the ModelOutput.

    Conditional models: with batch["y"] the labelled bound -F(x, y), else the unlabelled -U(x)
    (KL per group weighted by q(y|x))."""
    noise = HashedNoise(seed, batch["index"])
    if model.num_classes:
        if "y" in batch:
            return model(batch, noise, k=k, y=batch["y"])
        return semi.unlabelled_output(model, batch, noise, k=k)[1]
    return model(batch, noise, k=k)


CPU_IW_ROWS = 512  # rows (examples x samples) per forward pass on a CPU: past a few hundred, wider passes gain nothing
GPU_MEMORY_FRACTION = 0.5  # of the free GPU memory one L_K pass may take (the rest: fragmentation, other work)


@torch.no_grad()
def auto_iw_chunk(model: LatentVariableModel, batch: dict, num_samples: int) -> int:
    """Importance samples per forward pass (``iw_bound``'s ``chunk_size``) for L_K of ``batch``.

    On a GPU: as many as fit in GPU_MEMORY_FRACTION of the free memory (free plus what torch's cache
    holds), from the peak memory of one probe pass over the batch, which grows linearly with the rows
    of a pass. Elsewhere: about CPU_IW_ROWS rows per pass. Never more than K (x classes, for a
    conditional model with y summed out)."""
    B = batch["index"].shape[0]
    classes = model.num_classes if model.num_classes and "y" not in batch else 1
    most = num_samples * classes
    device = batch["index"].device
    if device.type != "cuda":
        return max(1, min(most, CPU_IW_ROWS // B * classes))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    elbo(model, batch)  # one sample of every example (and class): the probe
    per_sample = max(torch.cuda.max_memory_allocated(device) - before, 1)  # bytes of one sample of the batch
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(most, int(GPU_MEMORY_FRACTION * free / per_sample) * classes))


@torch.no_grad()
def iw_bound(model: LatentVariableModel, batch: dict, num_samples: int, seed: int = 0, k: int = 0,
             chunk_size: int | None = None) -> torch.Tensor:
    """L_K = logsumexp_k(log p(x, z_k) - log q(z_k | x)) - log K per example: (B,).

    Samples are drawn ``chunk_size`` at a time (None: ``auto_iw_chunk``, from free memory) and folded
    into a running logsumexp, so peak memory depends on chunk_size, not on K. With ``k > 0`` this is
    L^{>k}_K.

    Conditional models: with batch["y"], L_K of log p(x, y); without, log sum_y of the per-class
    estimates, log sum_y exp(L_K(x, y)), itself a lower bound on log p(x) (E exp(L_K(x, y)) = p(x, y)).
    Each class's pass uses the same samples (common random numbers); chunk_size counts rows, so a
    chunk holds chunk_size // C samples of every class.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    if chunk_size is None:
        chunk_size = auto_iw_chunk(model, batch, num_samples)
    B = batch["index"].shape[0]
    each_class = model.num_classes and "y" not in batch
    C = model.num_classes if each_class else 1
    step = max(chunk_size // C, 1)
    running = None
    for start in range(0, num_samples, step):
        n = min(step, num_samples - start)
        rep = repeat_batch(batch, n)
        sample_ids = torch.arange(start, start + n, device=batch["index"].device).repeat(B)
        noise = HashedNoise(seed, rep["index"], sample_ids)
        if each_class:
            out = model.forward_each_class(rep, noise, k=k, with_logits=False)[1]
        else:
            out = model(rep, noise, k=k, **({"y": rep["y"]} if model.num_classes else {}))
        log_w = torch.logsumexp(out.bound().double().view(B, n, C), dim=1)  # fp64 running sum: no drift with K
        running = log_w if running is None else torch.logaddexp(running, log_w)
    return (torch.logsumexp(running, dim=1) - math.log(num_samples)).float()


class ActiveUnits:
    """A dimension is active when the variance over the data of its posterior mean exceeds 0.01."""

    THRESHOLD = 0.01

    def __init__(self):
        self.count = 0
        self.sums: list[torch.Tensor] | None = None
        self.squares: list[torch.Tensor] | None = None

    def update(self, means: list[torch.Tensor]) -> None:
        flat = [m.detach().double().flatten(1) for m in means]
        if self.sums is None:
            self.sums = [f.sum(0) for f in flat]
            self.squares = [(f**2).sum(0) for f in flat]
        else:
            for i, f in enumerate(flat):
                self.sums[i] += f.sum(0)
                self.squares[i] += (f**2).sum(0)
        self.count += flat[0].shape[0] if flat else 0

    def merge_tensors(self) -> list[torch.Tensor]:
        """Sums and squares as one flat tensor per group (for a cross-process reduction)."""
        return [torch.cat([s, q]) for s, q in zip(self.sums or [], self.squares or [])]

    def result(self) -> dict:
        per_group = []
        for s, q in zip(self.sums or [], self.squares or []):
            mean = s / self.count
            var = q / self.count - mean**2
            per_group.append(int((var > self.THRESHOLD).sum()))
        units = [int(s.numel()) for s in self.sums or []]
        return {"total": sum(per_group), "per_group": per_group, "units": sum(units), "units_per_group": units}
