"""Evaluation over a whole dataset (or a seeded subset of it), sharded over processes without
duplicates or drops.

Each process takes the examples ``rank, rank + world, ...`` of the chosen ones; sums are reduced
across processes and noise is keyed per example, so the figures equal the single-process ones on the
same weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .batching import to_device
from .bounds import ActiveUnits, auto_iw_chunk, bits_per_dim, elbo, iw_bound
from .distributions import HashedNoise


@dataclass
class EvalResult:
    num_examples: int
    num_dims: float  # sub-pixels or tokens, summed over the examples
    elbo: float  # mean L_1 (or L^{>k}) in nats per example
    kl: float  # mean total KL in nats per example
    kl_per_group: list[float]  # the groups inferred from the data: those of ``groups``
    iw: float | None = None  # mean L_K in nats per example
    iw_samples: int = 0
    active_units: dict | None = None
    per_example: dict = field(default_factory=dict)  # name -> (N,) tensor in example order
    groups: list[int] = field(default_factory=list)  # model.group_info indices of kl_per_group (levels > k)
    subset: dict | None = None  # subset_info of the examples scored; None: the whole dataset

    def labelled_kl_per_group(self, group_info: list[dict]) -> list[dict]:
        """``[{"level", "kind", "kl"}]`` for the reported groups (docs/reference.md ``kl_per_group``)."""
        return [{"level": group_info[g]["level"], "kind": group_info[g]["kind"], "kl": kl}
                for g, kl in zip(self.groups, self.kl_per_group)]

    @property
    def bits_per_dim_elbo(self) -> float:
        return float(bits_per_dim(self.elbo * self.num_examples, self.num_dims))

    @property
    def bits_per_dim_iw(self) -> float | None:
        return None if self.iw is None else float(bits_per_dim(self.iw * self.num_examples, self.num_dims))


def subset_indices(n: int, size: int | None, seed: int, labels=None) -> np.ndarray:
    """Sorted indices of ``size`` of ``n`` examples, drawn at random from ``seed`` (all of them when
    ``size`` is None or >= n). Never the first N: data often come sorted by class.

    With ``labels`` (one per example) the draw is stratified: each class gets its proportional share,
    rounded by largest remainder (ties broken at random), so per-class counts are within 1 of
    ``size * class_count / n``.
    """
    if size is None or size >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0x5EB5E7])  # its own stream: not the carving's permutations
    if labels is None:
        return np.sort(rng.permutation(n)[:size])
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} examples")
    classes, members_of = np.unique(labels, return_inverse=True)
    counts = np.bincount(members_of, minlength=len(classes))
    quota = size * counts / n
    take = np.floor(quota).astype(np.int64)
    order = rng.permutation(len(classes))  # random tie-break, then largest remainder first
    order = order[np.argsort(-(quota - take)[order], kind="stable")]
    take[order[: size - int(take.sum())]] += 1
    chosen = [rng.permutation(np.flatnonzero(members_of == c))[:t] for c, t in enumerate(take)]
    return np.sort(np.concatenate(chosen))


def subset_info(n: int, size: int | None, seed: int, labels=None) -> dict | None:
    """What a report says about ``subset_indices(n, size, seed, labels)``: None for all examples."""
    if size is None or size >= n:
        return None
    return {"size": int(size), "of": int(n), "seed": int(seed), "stratified": labels is not None}


def _gather_per_example(accelerator, index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All processes' (index, value) pairs, padded to equal length for the collective, sorted by index."""
    if accelerator is None or accelerator.num_processes == 1:
        order = index.argsort()
        return index[order], values[order]
    n = torch.tensor([index.numel()], device=index.device)
    longest = int(accelerator.gather(n).max())
    pad = longest - index.numel()
    index = torch.cat([index, torch.full((pad,), -1, device=index.device, dtype=index.dtype)])
    values = torch.cat([values, torch.zeros(pad, device=values.device, dtype=values.dtype)])
    index, values = accelerator.gather(index), accelerator.gather(values)
    keep = index >= 0
    index, values = index[keep], values[keep]
    order = index.argsort()
    return index[order], values[order]


@torch.no_grad()
def evaluate(model, dataset: Dataset, *, batch_size: int, seed: int = 0, accelerator=None,
             iw_samples: int = 0, iw_chunk: int | None = None, k: int = 0, max_examples: int | None = None,
             active_units: bool = False, per_example: bool = False, desc: str = "eval",
             num_workers: int = 0, device=None, progress: bool = True) -> EvalResult:
    """L_1 (or L^{>k}), optionally L_K and active units, over ``dataset`` (dropout off).

    ``max_examples`` scores a subset drawn by ``subset_indices`` from ``seed`` (the seed of the
    noise too), stratified by ``dataset.labels`` when the dataset has them; every process draws the
    same subset and takes its share. ``iw_chunk``: importance samples per forward pass; None chooses
    it from free memory on the first batch (``auto_iw_chunk``; later batches are no larger).
    """
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    device = device or (accelerator.device if accelerator else next(model.parameters()).device)
    was_training = model.training
    model.eval()
    labels = getattr(dataset, "labels", None)
    chosen = subset_indices(len(dataset), max_examples, seed, labels)
    subset = Subset(dataset, chosen[rank::world].tolist())
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator())  # leaves the global RNG of training untouched
    G = model.num_groups
    sums = torch.zeros(4 + G, dtype=torch.float64, device=device)  # count, dims, elbo, iw, kl_g...
    au = ActiveUnits() if active_units and G > 0 else None
    idx_all, elbo_all, iw_all = [], [], []
    import contextlib

    autocast = accelerator.autocast if accelerator else contextlib.nullcontext
    show = progress and rank == 0 and len(loader) > 1
    for batch in tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True):
        batch = to_device(batch, device)
        with autocast():
            out = elbo(model, batch, seed=seed, k=k)
            lb = out.bound().double()
            sums[0] += lb.numel()
            sums[1] += model.data_size(batch).double().sum()
            sums[2] += lb.sum()
            if G:
                sums[4:] += out.kl.double().sum(0)
            if iw_samples:
                if iw_chunk is None:
                    iw_chunk = auto_iw_chunk(model, batch, iw_samples)
                lk = iw_bound(model, batch, iw_samples, seed=seed, k=k, chunk_size=iw_chunk).double()
                sums[3] += lk.sum()
                iw_all.append(lk)
            if au is not None:
                au.update(model.posterior_means(batch, HashedNoise(seed, batch["index"])))
        if per_example:
            idx_all.append(batch["index"])
            elbo_all.append(lb)
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
        if au is not None and au.sums is not None:
            merged = [accelerator.reduce(t, reduction="sum") for t in au.merge_tensors()]
            au.sums = [m[: m.numel() // 2] for m in merged]
            au.squares = [m[m.numel() // 2:] for m in merged]
            au.count = int(sums[0].item())
    count = max(int(sums[0].item()), 1)
    # Groups of levels <= k are drawn from the prior in L^{>k}: their "KL" would be -log p(z).
    groups = [g for g, info in enumerate(model.group_info) if info["level"] > k]
    kl_sums = sums[4:][groups] if G else sums[4:]
    result = EvalResult(
        num_examples=int(sums[0].item()),
        num_dims=float(sums[1].item()),
        elbo=float(sums[2].item() / count),
        kl=float(kl_sums.sum().item() / count) if G else 0.0,
        kl_per_group=[float(v / count) for v in kl_sums.tolist()],
        groups=groups,
        subset=subset_info(len(dataset), max_examples, seed, labels),
        iw=float(sums[3].item() / count) if iw_samples else None,
        iw_samples=iw_samples,
        active_units=au.result() if au is not None else None,
    )
    if per_example:
        index = torch.cat(idx_all) if idx_all else torch.zeros(0, dtype=torch.long, device=device)
        values = torch.cat(elbo_all) if elbo_all else torch.zeros(0, dtype=torch.float64, device=device)
        _, result.per_example["bound"] = _gather_per_example(accelerator, index, values)
        if iw_samples:
            _, result.per_example["iw"] = _gather_per_example(accelerator, index, torch.cat(iw_all))
        result.per_example["index"] = _gather_per_example(accelerator, index, index.double())[0]
    model.train(was_training)
    return result


@torch.no_grad()
def classification_error(model, dataset: Dataset, accelerator, *, batch_size: int, max_examples: int | None,
                         seed: int) -> float:
    """Error of argmax q(y|x) of a conditional model on the examples ``evaluate`` scores with the same
    ``max_examples`` and ``seed`` (a seeded subset, or all), sharded over processes like ``evaluate``."""
    acc, labels = accelerator, dataset.labels
    chosen = subset_indices(len(dataset), max_examples, seed, labels)
    mine = chosen[acc.process_index::acc.num_processes].tolist()
    counts = torch.zeros(2, dtype=torch.float64, device=acc.device)  # wrong, scored
    model = model.eval()
    for start in range(0, len(mine), batch_size):
        part = mine[start:start + batch_size]
        batch = to_device(torch.utils.data.default_collate([dataset[i] for i in part]), acc.device)
        with acc.autocast():
            logits = model.classify(batch, HashedNoise(seed, batch["index"]))
        truth = labels[torch.as_tensor(part)].to(acc.device)
        counts[0] += (logits.argmax(-1) != truth).sum()
        counts[1] += len(part)
    if acc.num_processes > 1:
        counts = acc.reduce(counts, reduction="sum")
    return float(counts[0] / counts[1])
