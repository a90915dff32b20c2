"""Evaluation you can trust: the K importance samples of an example share no noise, subsets are
seeded and stratified draws (never the first N), L^{>k} reports only the groups it infers, and a
report says which weights, subset and noise seed produced it."""
import numpy as np
import pytest
import torch

from shared.distributions import HashedNoise

K = 1000
CIFAR_GROUP = (K, 38, 16, 16)  # 9,728 elements: the lowest latent group of the cifar10 preset


def repeated_windows(codes: np.ndarray, width: int, bits: int) -> int:
    """How many windows of ``width`` consecutive codes (each ``bits`` wide), over all rows and
    positions, repeat an earlier window. Windows are packed into one uint64 (the top bits of the
    first code fall off past 64), sorted, and neighbours compared."""
    codes = codes.astype(np.uint64)
    n = codes.shape[1]
    packed = np.zeros((codes.shape[0], n - width + 1), dtype=np.uint64)
    for j in range(width):
        packed = (packed << np.uint64(bits)) | codes[:, j:n - width + 1 + j]
    packed = np.sort(packed.ravel())
    return int((packed[1:] == packed[:-1]).sum())


def _old_bits(seed: int, example_ids, sample_ids, shape, key: int, stream: int) -> torch.Tensor:
    """The previous scheme, kept here only to show that the detector finds its shared runs: the
    element index was added to a 32-bit row hash before mixing, so rows whose hashes differ by
    less than the group size got the same noise shifted by a few elements."""
    M = 0xFFFFFFFF

    def mix(h):
        h = h ^ (h >> 16)
        h = (h * 0x5BD1E995) & M
        h = h ^ (h >> 13)
        h = (h * 0x27D4EB2F) & M
        return h ^ (h >> 16)

    def combine(h, v):
        return mix((h + v + 0x165667B1) & M)

    h = combine(torch.full_like(example_ids, seed), key)
    for v in (example_ids, sample_ids, stream):
        h = combine(h, v)
    elem = torch.arange(int(np.prod(shape[1:])), dtype=torch.int64)
    return combine(h[:, None], elem[None, :]).view(shape)


def _one_example_k_samples(seed: int = 0) -> HashedNoise:
    return HashedNoise(seed, example_ids=torch.zeros(K, dtype=torch.long), sample_ids=torch.arange(K))


def test_importance_samples_share_no_run_of_noise():
    noise = _one_example_k_samples()
    for stream in (1, 2):  # uniform (and Box-Muller's first input), Box-Muller's second input
        raw = noise._bits(CIFAR_GROUP, key=3, stream=stream, device="cpu").reshape(K, -1).numpy()
        assert raw.min() >= 0 and raw.max() < 2**32
        assert repeated_windows(raw, width=2, bits=32) == 0
    # What the model sees: 23-bit uniforms, so runs of three (single values repeat by chance).
    u = noise.uniform(CIFAR_GROUP, key=3, device="cpu").reshape(K, -1)
    assert 0 < u.min() and u.max() < 1
    codes = (u.double() * 2**23 - 0.5).round().long().numpy()
    assert repeated_windows(codes, width=3, bits=23) == 0


def test_the_detector_finds_the_shifted_copies_of_the_old_scheme():
    ids, samples = torch.zeros(K, dtype=torch.long), torch.arange(K)
    old = _old_bits(0, ids, samples, CIFAR_GROUP, key=3, stream=1).reshape(K, -1).numpy()
    assert repeated_windows(old, width=2, bits=32) > 1000  # thousands of shared pairs, not chance
    # and a deliberate shift of the new noise is found too
    new = _one_example_k_samples()._bits(CIFAR_GROUP[:1] + (9728,), key=3, stream=1, device="cpu").numpy()
    shifted = new.copy()
    shifted[1, 5:] = new[0, :-5]
    assert repeated_windows(new, width=2, bits=32) == 0
    assert repeated_windows(shifted, width=2, bits=32) == 9728 - 5 - 1
