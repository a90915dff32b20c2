"""Evaluation you can trust: the K importance samples of an example share no noise, subsets are
seeded and stratified draws (never the first N), L^{>k} reports only the groups it infers, and a
report says which weights, subset and noise seed produced it."""
import numpy as np
import pytest
import torch

from shared.distributions import HashedNoise
from shared.evaluate import evaluate, subset_indices, subset_info

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
    # The raw 32-bit words of stream 2 (Box-Muller's second input): no pair repeats anywhere.
    raw = noise._bits(CIFAR_GROUP, key=3, stream=2, device="cpu").reshape(K, -1).numpy()
    assert raw.min() >= 0 and raw.max() < 2**32
    assert repeated_windows(raw, width=2, bits=32) == 0
    # Stream 1 as the model sees it (uniforms, Box-Muller's first input): 23-bit values, so runs of
    # three (single values and pairs repeat by chance at 23 bits).
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


# ---------------------------------------------------------------------------------------- subsets

CLASS_SIZES = [50, 120, 80, 7, 200, 43]  # uneven classes, stored sorted by class as folders often are


def _sorted_labels() -> np.ndarray:
    return np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES)


def test_subset_is_a_seeded_random_draw_never_the_first_n():
    n, size = 500, 60
    a, b, c = (subset_indices(n, size, seed) for seed in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == size and len(np.unique(a)) == size and np.all(np.diff(a) > 0)
    assert a.max() >= size  # not the first N
    assert np.array_equal(subset_indices(n, None, 3), np.arange(n))  # no cap: everything, in order
    assert np.array_equal(subset_indices(n, n + 5, 3), np.arange(n))
    assert subset_info(n, None, 3) is None and subset_info(n, n, 3) is None
    assert subset_info(n, size, 3) == {"size": size, "of": n, "seed": 3, "stratified": False}


@pytest.mark.parametrize("size", [1, 6, 37, 250])
def test_subset_is_stratified_by_class(size):
    labels = _sorted_labels()
    n = len(labels)
    chosen = subset_indices(n, size, 0, labels=labels)
    assert len(chosen) == size and len(np.unique(chosen)) == size
    counts = np.bincount(labels[chosen], minlength=len(CLASS_SIZES))
    proportional = size * np.array(CLASS_SIZES) / n
    assert np.all(np.abs(counts - proportional) < 1), (counts, proportional)
    assert np.all(counts[proportional >= 1] > 0)  # every class due a place, though the data are sorted by class
    if size == 250:
        assert np.all(counts > 0)
    # same seed, same draw; another seed, another draw (the labels as a tensor work the same)
    assert np.array_equal(chosen, subset_indices(n, size, 0, labels=torch.as_tensor(labels)))
    if size > 1:
        assert not np.array_equal(chosen, subset_indices(n, size, 1, labels=labels))
    assert subset_info(n, size, 0, labels)["stratified"] is True


class _FakeAccelerator:
    """One rank of a ``world``-process evaluation whose collectives see only this rank (the test
    adds the ranks up itself): enough to show which examples each rank scores."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


@pytest.fixture(scope="module")
def tiny_model():
    from core_utils import tiny_image_config

    from biva_image.model import ImageVAE

    torch.manual_seed(0)
    return ImageVAE(tiny_image_config("biva", levels=3)).eval()


def _labelled_stripes():
    from core_utils import stripes

    from biva_image.data import ImageDataset

    labels = _sorted_labels()[::10]  # 50 images, classes of 5, 12, 8, 1, 20, 4 in class order
    return ImageDataset(stripes(len(labels), seed=7), labels)


def test_evaluate_scores_the_stratified_subset_and_every_rank_draws_the_same_one(tiny_model):
    data = _labelled_stripes()
    size = 17
    whole = evaluate(tiny_model, data, batch_size=8, seed=5, max_examples=size, per_example=True, progress=False)
    expected = subset_indices(len(data), size, 5, labels=data.labels)
    assert whole.num_examples == size
    assert whole.per_example["index"].long().tolist() == expected.tolist()
    assert whole.subset == {"size": size, "of": len(data), "seed": 5, "stratified": True}
    # Two ranks: disjoint shares of the same subset, and together the single-process figure.
    parts = [evaluate(tiny_model, data, batch_size=3, seed=5, max_examples=size, per_example=True, progress=False,
                      accelerator=_FakeAccelerator(rank, 2)) for rank in (0, 1)]
    indices = [p.per_example["index"].long().tolist() for p in parts]
    assert sorted(indices[0] + indices[1]) == expected.tolist() and not set(indices[0]) & set(indices[1])
    elbo = sum(p.elbo * p.num_examples for p in parts) / size
    assert elbo == pytest.approx(whole.elbo, abs=1e-5)
    # Without a cap: every example, and the report says so.
    assert evaluate(tiny_model, data, batch_size=16, seed=5, progress=False).subset is None


def test_image_splits_carry_their_labels_into_the_dataset(tmp_path):
    from PIL import Image

    from biva_image.data import ImageDataConfig, ImageDataset
    from biva_image.runs import load_split

    def folder(root, splits):
        for split, n in splits:
            for cls, value in (("cat", 10), ("dog", 200)):
                (root / split / cls).mkdir(parents=True)
                for i in range(n):
                    Image.fromarray(np.full((4, 4), value + i, np.uint8)).save(root / split / cls / f"{i}.png")
        return ImageDataConfig(dataset="folder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))

    test = load_split(folder(tmp_path / "pets", [("train", 10), ("test", 3)]), "test")
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted class names: cat -> 0, dog -> 1
    data = ImageDataset(test.images, test.labels)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and set(data[0]) == {"index", "x"}
    # An OOD folder without the split asked for: all its images, labels travelling with them.
    everything = load_split(folder(tmp_path / "other", [("train", 10)]), "test", fallback_all=True)
    assert len(everything.labels) == len(everything.images) == 20
    assert sorted(everything.labels.tolist()) == [0] * 10 + [1] * 10


# ------------------------------------------------------------------------- KL per group of L^{>k}


def test_kl_per_group_of_l_greater_than_k_lists_only_the_inferred_groups(tiny_model):
    from shared.bounds import elbo

    data = _labelled_stripes()
    info = tiny_model.group_info  # z3, bu2, td2, bu1, td1
    batch = {"index": torch.arange(len(data)), "x": data.images}
    for k in (0, 1, 2):
        res = evaluate(tiny_model, data, batch_size=16, seed=1, k=k, progress=False)
        rows = res.labelled_kl_per_group(info)
        assert [(r["level"], r["kind"]) for r in rows] == [(g["level"], g["kind"]) for g in info if g["level"] > k]
        assert res.kl == pytest.approx(sum(r["kl"] for r in rows), rel=1e-6)
        # the bound's own KL: log q - log p of the scored groups only, never -log p of a prior draw
        out = elbo(tiny_model, batch, seed=1, k=k)
        scored_kl = out.kl[:, torch.tensor(out.scored)].double()
        assert res.kl_per_group == pytest.approx(scored_kl.mean(0).tolist(), rel=1e-5, abs=1e-5)
        assert res.elbo == pytest.approx((out.log_px.double() - scored_kl.sum(1)).mean().item(), rel=1e-5)
    assert len(evaluate(tiny_model, data, batch_size=16, seed=1, progress=False).kl_per_group) == 5


def test_validation_scores_the_same_seeded_subset_every_time(tmp_path, capsys):
    from core_utils import ArrayDataset, build, stripes, tiny_image_config, tiny_run
    from safetensors.torch import load_file

    from shared.engine import Trainer
    from shared.metrics_log import read_metrics
    from shared.run_dir import write_run_config

    cfg = tiny_image_config("biva")
    run = tiny_run(cfg, max_steps=4, eval_every=2, save_every=2, log_every=2, eval_examples=13, eval_seed=3)
    out = tmp_path / "run"
    out.mkdir()
    write_run_config(out, run)
    valid = _labelled_stripes()
    trainer = Trainer(run, build(cfg), ArrayDataset(stripes(64, seed=0)), valid, out)
    trainer.fit()
    err = capsys.readouterr().err
    assert err.count("validation: a fixed subset of 13 of 50 examples drawn with eval_seed 3, stratified by class") == 1
    records = [r for r in read_metrics(out) if r.get("split") == "valid"]
    assert [(r["step"], r["num_examples"]) for r in records] == [(2, 13), (4, 13)]
    model = build(cfg)().eval()
    for r in records:  # each figure is that of the EMA weights on the one subset drawn from eval_seed
        model.load_state_dict(load_file(str(out / "checkpoints" / f"step_{r['step']}" / "ema.safetensors")))
        res = evaluate(model, valid, batch_size=5, seed=3, max_examples=13, progress=False)
        assert res.subset == {"size": 13, "of": 50, "seed": 3, "stratified": True}
        assert res.elbo == pytest.approx(r["elbo"], abs=1e-4)
        assert res.kl_per_group == pytest.approx(r["kl_per_group"], abs=1e-4)
