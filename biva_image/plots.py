"""PNG plots of the image reports (matplotlib, Agg, torch-free): KL per latent group (the paper's
Figure 5), the same overlaid for several runs, the anomaly curves of L^{>k} (Table 6) and the
confusion matrix of a semi-supervised model's classifier q(y|x)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_KIND_ORDER = {"bu": 0, "td": 1, "top": 2}


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def group_label(group: dict) -> str:
    if group["kind"] == "top":
        return f"z{group['level']}"
    return f"z{group['level']} {group['kind'].upper()}"


def plot_kl_per_group(kl_per_group: list[dict], path: str | Path, title: str = "") -> Path:
    """Bars of KL (nats per image) per group, bottom of the hierarchy on the left."""
    # Reports list z_L first; the plot reads bottom-up: z_1 BU, z_1 TD, z_2 BU, ..., z_L.
    groups = sorted(kl_per_group, key=lambda g: (g["level"], _KIND_ORDER.get(g["kind"], 0)))
    colours = {"bu": "tab:orange", "td": "tab:blue", "top": "tab:green"}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * len(groups) + 1.5), 3.2))
    ax.bar(range(len(groups)), [max(g["kl"], 0.0) for g in groups],
           color=[colours.get(g["kind"], "tab:gray") for g in groups])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([group_label(g) for g in groups], rotation=90, fontsize=7)
    ax.set_ylabel("KL (nats per image)")
    ax.set_title(title or "KL per latent group")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for k, c in colours.items() if any(g["kind"] == k for g in groups)]
    labels = [k for k in colours if any(g["kind"] == k for g in groups)]
    ax.legend(handles, labels, fontsize=7)
    return _save(fig, path)


def kl_per_level(kl_per_group: list[dict]) -> dict[int, float]:
    """KL summed over the groups of each level (BIVA's BU + TD), level -> nats."""
    out: dict[int, float] = {}
    for g in kl_per_group:
        out[g["level"]] = out.get(g["level"], 0.0) + g["kl"]
    return dict(sorted(out.items()))


def plot_kl_comparison(runs: list[tuple[str, list[dict]]], path: str | Path) -> Path:
    """KL per level of several runs in one plot (log scale), like the paper's Figure 5."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, kl_per_group in runs:
        per_level = kl_per_level(kl_per_group)
        ax.plot(list(per_level), [max(v, 1e-3) for v in per_level.values()], marker="o", markersize=3, label=name)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("level i (1 = bottom; BIVA: BU + TD groups of the level)")
    ax.set_ylabel("KL (nats per image)")
    ax.set_title("KL per level")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_anomaly(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Left: mean bits/dim of the in-distribution and OOD sets under L^{>k}; right: AUROC vs k."""
    ks = [r["k"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.2))
    left.plot(ks, [r["bpd_in"] for r in rows], marker="o", label="in-distribution")
    left.plot(ks, [r["bpd_ood"] for r in rows], marker="s", label="out-of-distribution")
    left.set_xlabel("k (levels <= k from the prior)")
    left.set_ylabel("bits/dim of L^{>k}")
    left.legend(fontsize=7)
    right.plot(ks, [r["auroc"] for r in rows], marker="o", color="tab:red")
    right.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
    right.set_ylim(0.0, 1.0)
    right.set_xlabel("k")
    right.set_ylabel("AUROC (OOD positive, score = bits/dim)")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "anomaly detection with L^{>k}")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix: list[list[int]], path: str | Path, title: str = "") -> Path:
    """The C x C confusion matrix of q(y|x) (rows: true class, columns: predicted), counts written in
    every cell; the colour is the share of the row, so rare classes read as clearly as common ones."""
    counts = np.asarray(matrix, dtype=np.int64)
    C = counts.shape[0]
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(3.5, 0.45 * C + 1.5)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7 if C <= 12 else 5,
                color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(C))
    ax.set_yticks(range(C))
    ax.set_xlabel("predicted class (argmax q(y|x))")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)
