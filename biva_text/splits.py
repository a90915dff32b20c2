"""The seeded split rule: which sentences of a training corpus are held out for validation and test.

A sentence is identified by its index, its position among the corpus's usable lines, so the rule
is reproducible and independent of the tokenizer. Corpora of known length (files, the bundled
corpora) hold out the sentences with the smallest seeded 64-bit hashes (a seeded permutation,
exact sizes, each split capped at ``HELDOUT_CAP`` of the corpus); a hub stream, whose length is
not known in advance, holds out a sentence when its hash falls below ``size / expected length``.
"""
from __future__ import annotations

import numpy as np

from shared.errors import UserError

SPLITS = ("train", "valid", "test")
SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}  # split of a sentence, as uint8
HELDOUT_CAP = 0.1  # carve at most a tenth of a small corpus for each held-out split


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_hash(seed: int, index: np.ndarray) -> np.ndarray:
    """A seeded 64-bit hash of sentence indices: the same on every machine and numpy version."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) * golden + golden)
        return _mix64(np.asarray(index, dtype=np.uint64) * golden ^ key)


def smallest_hashes(seed: int, n: int, k: int) -> np.ndarray:
    """Indices in ``range(n)`` of the ``k`` smallest hashes, in hash order: the first ``k`` entries
    of a seeded permutation, found in chunks so ``n`` can be tens of millions."""
    best_idx = np.zeros(0, dtype=np.int64)
    best_hash = np.zeros(0, dtype=np.uint64)
    if k == 0:
        return best_idx
    for start in range(0, n, 1 << 22):
        idx = np.arange(start, min(n, start + (1 << 22)), dtype=np.int64)
        idx = np.concatenate([best_idx, idx])
        hashes = np.concatenate([best_hash, split_hash(seed, idx[len(best_idx):])])
        if len(idx) > k:
            keep = np.argpartition(hashes, k - 1)[:k]
            idx, hashes = idx[keep], hashes[keep]
        best_idx, best_hash = idx, hashes
    order = np.argsort(best_hash, kind="stable")
    return best_idx[order]


class CarvedSplits:
    """Held-out splits of a corpus of ``n`` sentences: ``sizes`` {"test", "valid"} targets (0: the split
    comes from its own files), each capped at ``HELDOUT_CAP`` of the corpus; test takes the smallest
    hashes, validation the next ones."""

    def __init__(self, seed: int, n: int, sizes: dict[str, int]):
        sizes = {name: min(size, max(1, int(n * HELDOUT_CAP))) if size else 0 for name, size in sizes.items()}
        if n - sizes["test"] - sizes["valid"] < 1:
            raise UserError(f"the training text has only {n} usable sentences, too few to carve held-out splits; "
                            "add sentences or pass --valid-files and --test-files")
        order = smallest_hashes(seed, n, sizes["test"] + sizes["valid"])
        self.index = {"test": np.sort(order[:sizes["test"]]), "valid": np.sort(order[sizes["test"]:])}
        self.rule = {"rule": "seeded permutation of sentence indices (smallest splitmix64 hashes)",
                     "seed": seed, "carved": sizes}

    @property
    def held_out(self) -> int:
        return sum(len(v) for v in self.index.values())

    def codes(self, start: int, count: int) -> np.ndarray:
        """Split codes (uint8) of sentences ``start .. start + count - 1``."""
        codes = np.full(count, SPLIT_CODE["train"], dtype=np.uint8)
        for name, index in self.index.items():
            lo, hi = np.searchsorted(index, [start, start + count])
            codes[index[lo:hi] - start] = SPLIT_CODE[name]
        return codes


def stream_codes(seed: int, fractions: dict[str, float], start: int, count: int) -> np.ndarray:
    """Split codes (uint8) of stream sentences ``start .. start + count - 1``: test when the hash, as a
    uniform number in [0, 1), is below ``fractions["test"]``, validation in the next ``fractions["valid"]``."""
    u = (split_hash(seed, np.arange(start, start + count)) >> np.uint64(11)).astype(np.float64) / 2.0**53
    codes = np.full(count, SPLIT_CODE["train"], dtype=np.uint8)
    codes[u < fractions["test"]] = SPLIT_CODE["test"]
    codes[(u >= fractions["test"]) & (u < fractions["test"] + fractions["valid"])] = SPLIT_CODE["valid"]
    return codes
