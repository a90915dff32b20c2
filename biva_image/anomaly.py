"""Anomaly detection with L^{>k} (paper eq. 3, Table 6): score every image by its bits/dim under the
bound that keeps only the posterior of levels > k, and measure how well that separates an
out-of-distribution set from the in-distribution test set.

The score is bits/dim as it is (higher = less likely) with the OOD set as the positive class; it is
not flipped, so the ELBO row (k = 0) may well sit below 0.5, as it does in the paper for CIFAR-10
against SVHN.
"""
from __future__ import annotations

import math

import numpy as np


def auroc(scores_negative, scores_positive) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + P(tie) / 2.

    Rank-based (Mann-Whitney U) with average ranks for ties; no scikit-learn.
    """
    neg = np.asarray(scores_negative, dtype=np.float64).ravel()
    pos = np.asarray(scores_positive, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError("auroc needs at least one score in each class")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("auroc got non-finite scores")
    scores = np.concatenate([neg, pos])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: the ranks it spans are (before, before + count].
    before = np.cumsum(counts) - counts
    average_rank = before + (counts + 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def bits_per_dim_per_example(model, dataset, *, k: int, iw_samples: int, batch_size: int, seed: int,
                             max_examples: int | None = None, device=None, iw_chunk: int | None = None,
                             desc: str = "anomaly") -> np.ndarray:
    """-L^{>k}_K / (D ln 2) for every image, in example order (K = 1: the single-sample L^{>k},
    which at k = 0 is the ELBO on the same noise as ``evaluate``)."""
    return _score(model, dataset, k=k, iw_samples=iw_samples, batch_size=batch_size, seed=seed,
                  max_examples=max_examples, device=device, iw_chunk=iw_chunk, desc=desc)[0]


def _score(model, dataset, *, k: int, iw_samples: int, batch_size: int, seed: int, max_examples: int | None,
           device, iw_chunk: int, desc: str):
    """(bits/dim per image, the EvalResult of the single-sample pass)."""
    from shared.evaluate import evaluate

    res = evaluate(model, dataset, batch_size=batch_size, seed=seed, k=k, max_examples=max_examples,
                   iw_samples=iw_samples if iw_samples > 1 else 0, iw_chunk=iw_chunk, per_example=True,
                   device=device, desc=desc)
    bound = res.per_example["iw" if iw_samples > 1 else "bound"].cpu().numpy()
    dims = res.num_dims / max(res.num_examples, 1)
    return -bound / (dims * math.log(2.0)), res


def anomaly_curve(model, in_set, ood_set, ks: list[int], *, iw_samples: int, batch_size: int, seed: int,
                  max_examples: int | None = None, device=None, iw_chunk: int | None = None) -> list[dict]:
    """One row {"k", "iw_samples", "bpd_in", "bpd_ood", "auroc", "kl_per_group"} per k (bits/dim averaged
    over images; ``kl_per_group``: KL in nats per image on the in-distribution set, of the groups that
    L^{>k} infers, levels > k; the others are drawn from the prior and have no KL)."""
    rows = []
    for k in ks:
        kw = dict(k=k, iw_samples=iw_samples, batch_size=batch_size, seed=seed, max_examples=max_examples,
                  device=device, iw_chunk=iw_chunk)
        bpd_in, res_in = _score(model, in_set, desc=f"L^>{k} in", **kw)
        bpd_ood = bits_per_dim_per_example(model, ood_set, desc=f"L^>{k} ood", **kw)
        rows.append({"k": k, "iw_samples": iw_samples, "bpd_in": float(bpd_in.mean()),
                     "bpd_ood": float(bpd_ood.mean()), "auroc": auroc(bpd_in, bpd_ood),
                     "kl_per_group": res_in.labelled_kl_per_group(model.group_info)})
    return rows
