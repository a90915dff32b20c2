"""The M2-style conditional ladder (LadderConfig.num_classes > 0) and its semi-supervised bounds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from biva_image.model import ImageVAE
from shared import semi
from shared.bounds import elbo, iw_bound
from shared.distributions import HashedNoise, TrainNoise
from shared.evaluate import evaluate
from tests.core_utils import tiny_image_config

C = 3
CASES = [("biva", "dense"), ("biva", "conv"), ("lvae", "dense"), ("lvae", "conv")]


def bars(n: int, seed: int = 0, classes: int = C):
    """Labelled 1x8x8 images: class 0 a horizontal bar, 1 a vertical bar, 2 both (a cross)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(0, 8, 2)
        if y[i] in (0, 2):
            x[i, 0, r, :] = 255
        if y[i] in (1, 2):
            x[i, 0, :, c] = 255
    return torch.from_numpy(x), torch.from_numpy(y).long()


def conditional(variant="biva", kind="dense", classes=C, seed=0, randomise_top=True) -> ImageVAE:
    torch.manual_seed(seed)
    cfg = tiny_image_config(variant, kind=kind)
    cfg.ladder.num_classes = classes
    model = ImageVAE(cfg).eval()
    if randomise_top:  # every class starts at N(0, I); spread them as training would
        with torch.no_grad():
            model.ladder.p_top_y.add_(0.5 * torch.randn_like(model.ladder.p_top_y))
    return model


def unlabelled_batch(n=5, seed=0):
    x, _ = bars(n, seed)
    return {"index": torch.arange(n) + 10, "x": x}


@pytest.mark.parametrize("variant,kind", CASES)
def test_unlabelled_bound_is_the_q_weighted_sum_over_classes(variant, kind):
    model = conditional(variant, kind)
    batch = unlabelled_batch()
    noise = HashedNoise(3, batch["index"])
    with torch.no_grad():
        bound = semi.unlabelled_bound(model, batch, noise)
        log_qy = model.classify(batch, noise).log_softmax(dim=1)
        per_class = torch.stack([semi.labelled_bound(model, {**batch, "y": torch.full((5,), c)}, noise)
                                 for c in range(C)], dim=1)  # (B, C), by hand: one labelled pass per class
    assert torch.allclose(log_qy.exp().sum(dim=1), torch.ones(5), atol=1e-6)
    hand = (log_qy.exp() * (per_class - log_qy)).sum(dim=1)
    assert torch.allclose(bound, hand, atol=1e-4, rtol=0)
    # Jensen: sum_y q (F - log q) <= log sum_y exp(F), strictly unless q(y|x) is the posterior p(y|x, z).
    assert (bound <= torch.logsumexp(per_class, dim=1) + 1e-5).all()
    assert (torch.logsumexp(per_class, dim=1) - bound).max() > 1e-3
    # the reports' elbo() takes the same route for a batch without "y", the labelled one with it
    assert torch.allclose(elbo(model, batch, seed=3).bound(), bound, atol=1e-5)
    labelled = {**batch, "y": torch.tensor([0, 1, 2, 1, 0])}
    assert torch.allclose(elbo(model, labelled, seed=3).bound(), per_class[torch.arange(5), labelled["y"]], atol=1e-5)


def test_labelled_bound_includes_log_p_y():
    model = conditional()
    batch = {**unlabelled_batch(), "y": torch.tensor([0, 1, 2, 1, 0])}
    noise = HashedNoise(0, batch["index"])
    with torch.no_grad():
        out = model(batch, noise, y=batch["y"])
        bound = semi.labelled_bound(model, batch, noise)
    assert torch.allclose(bound - (out.log_px - out.kl.sum(dim=1)), torch.full((5,), -math.log(C)), atol=1e-5)


@pytest.mark.parametrize("variant,kind", [("biva", "dense"), ("lvae", "conv")])
def test_y_conditions_the_likelihood_and_every_prior_but_not_the_classifier(variant, kind):
    model = conditional(variant, kind)
    batch = unlabelled_batch()
    noise = HashedNoise(0, batch["index"])
    with torch.no_grad():
        a = model(batch, noise, y=torch.zeros(5, dtype=torch.long))
        b = model(batch, noise, y=torch.ones(5, dtype=torch.long))
    assert (a.log_px - b.log_px).abs().min() > 1e-4
    assert ((a.log_p - b.log_p).abs().min(dim=0).values > 1e-5).all()  # every group, the top one too
    for g, info in enumerate(model.group_info):
        changed = (a.log_q[:, g] - b.log_q[:, g]).abs().max() > 1e-5
        assert changed == (info["kind"] != "bu" and info["kind"] != "top"), info  # q(z^BU|x), q(z_L|x) ignore y
    # q(y|x) has no path from y: its gradient touches no y-conditioning weight, the ELBO's none of its own
    model.zero_grad()
    model.classify(batch, noise).logsumexp(dim=1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in grads if not n.startswith("ladder.classifier"))
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("ladder.classifier"))
    model.zero_grad()
    model(batch, noise, y=torch.zeros(5, dtype=torch.long)).bound().sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("ladder.classifier"))
    assert model.ladder.p_top_y.grad.abs().sum() > 0 and model.ladder.td_y_in[0].v.grad.abs().sum() > 0


def test_a_conditional_model_needs_y_and_an_unconditional_one_refuses_it():
    model = conditional()
    batch = unlabelled_batch()
    with pytest.raises(ValueError, match="needs y"):
        model(batch, TrainNoise())
    plain = ImageVAE(tiny_image_config())
    with pytest.raises(ValueError):
        plain(batch, TrainNoise(), y=torch.zeros(5, dtype=torch.long))
    assert plain.num_classes == 0 and model.num_classes == C


def test_gradients_reach_the_classifier_from_the_unlabelled_bound_and_the_cross_entropy():
    model = conditional().train()
    x, y = bars(6, seed=1)
    labelled = {"index": torch.arange(6), "x": x, "y": y}
    unlabelled = unlabelled_batch(6, seed=2)
    head = model.ladder.classifier_out.v

    def classifier_grad(unl, alpha):
        model.zero_grad()
        torch.manual_seed(0)
        semi.semi_supervised_loss(model, labelled, unl, TrainNoise(), 0.0, alpha).loss.backward()
        return 0.0 if head.grad is None else float(head.grad.abs().sum())

    assert classifier_grad(None, 0.0) == 0.0  # labelled ELBO alone: no path to q(y|x)
    assert classifier_grad(None, 1.0) > 0  # the cross-entropy
    assert classifier_grad(unlabelled, 0.0) > 0  # U(x) through its weights q(y|x) and entropy


def test_free_bits_apply_per_group_to_both_parts():
    model = conditional()
    x, y = bars(6, seed=1)
    labelled = {"index": torch.arange(6), "x": x, "y": y}
    unlabelled = unlabelled_batch(4, seed=2)
    G = model.num_groups

    def terms(free_bits):
        torch.manual_seed(5)
        return semi.semi_supervised_loss(model, labelled, unlabelled, TrainNoise(), free_bits, alpha=2.0)

    plain, clamped = terms(0.0), terms(1000.0)
    assert torch.equal(plain.kl, clamped.kl)  # same noise, same numbers; only the loss differs
    kl_l, kl_u = plain.kl[:6].mean(0), plain.kl[6:].mean(0)  # the unlabelled rows: q(y|x)-weighted KL
    assert torch.allclose(clamped.loss - plain.loss, 2 * G * 1000.0 - kl_l.sum() - kl_u.sum(), rtol=1e-5)
    lam = torch.zeros(G)
    lam[0] = 1000.0  # one group clamped, the others plain
    one = terms(lam)
    assert torch.allclose(one.loss - plain.loss, 2 * 1000.0 - kl_l[0] - kl_u[0], rtol=1e-5)
    # the loss is the mean of -F + alpha CE and of -U when free bits do not bind
    expected = -plain.bound_labelled.mean() + 2.0 * plain.cross_entropy - plain.bound_unlabelled.mean()
    assert torch.allclose(plain.loss.detach(), expected, atol=1e-4)


@pytest.mark.parametrize("variant,kind", [("biva", "conv"), ("lvae", "dense")])
def test_importance_weighted_bound_of_a_conditional_model(variant, kind):
    model = conditional(variant, kind)
    batch = unlabelled_batch(4)
    noise = HashedNoise(7, batch["index"])
    with torch.no_grad():
        per_class = torch.stack([semi.labelled_bound(model, {**batch, "y": torch.full((4,), c)}, noise)
                                 for c in range(C)], dim=1)
        l1 = iw_bound(model, batch, 1, seed=7)
        u = semi.unlabelled_bound(model, batch, noise)
        lk = iw_bound(model, batch, 64, seed=7, chunk_size=10)  # 3 samples of each class per chunk
        lk_whole = iw_bound(model, batch, 64, seed=7, chunk_size=1000)
        labelled = {**batch, "y": torch.tensor([2, 0, 1, 2])}
        l1_labelled = iw_bound(model, labelled, 1, seed=7)
    # K = 1: log sum_y exp(ELBO(x, y)) on the same draws, which is >= U(x) (q(y|x) at its best)
    assert torch.allclose(l1, torch.logsumexp(per_class, dim=1), atol=1e-4)
    assert (l1 >= u - 1e-5).all()
    assert torch.allclose(l1_labelled, per_class[torch.arange(4), labelled["y"]], atol=1e-4)
    assert torch.allclose(lk, lk_whole, atol=1e-4)  # chunking does not change the figure
    assert lk.mean() > l1.mean()


def test_bounds_do_not_depend_on_batching():
    model = conditional("biva", "conv")
    x, _ = bars(7, seed=4)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"index": i, "x": x[i]}

    whole = evaluate(model, Data(), batch_size=7, iw_samples=4, per_example=True, progress=False)
    split = evaluate(model, Data(), batch_size=3, iw_samples=4, per_example=True, iw_chunk=5, progress=False)
    assert torch.allclose(whole.per_example["bound"], split.per_example["bound"], atol=1e-5)
    assert torch.allclose(whole.per_example["iw"], split.per_example["iw"], atol=1e-5)
    assert len(whole.kl_per_group) == model.num_groups and whole.kl > 0


def test_prior_samples_are_class_conditional_and_keyed():
    model = conditional("biva", "conv")
    noise = HashedNoise(0, torch.arange(6))
    zeros, ones = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    with torch.no_grad():
        d_zero, d_one = model.decode_prior(6, noise, y=zeros), model.decode_prior(6, noise, y=ones)
        drawn, again = model.decode_prior(6, noise), model.decode_prior(6, noise)
        images = model.sample(6, noise=noise, y=zeros, mode="mean")
    assert not torch.allclose(d_zero, d_one)
    assert torch.equal(drawn, again)  # the uniform class draw is keyed by the noise
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8


def test_parameters_of_the_switch():
    # num_classes = 0: the counts of main before the switch existed (tiny_image_config, seedless shapes)
    for (variant, kind), count in zip(CASES, (56306, 44530, 38578, 32946)):
        plain = ImageVAE(tiny_image_config(variant, kind=kind))
        assert sum(p.numel() for p in plain.parameters()) == count
        assert not any(n.startswith(("ladder.classifier", "ladder.td_y_in", "ladder.p_top_y"))
                       for n, _ in plain.named_parameters())
    model = conditional(randomise_top=False)
    top = model.ladder.p_top_y
    assert top.shape == (C, 2 * 4)  # dense top latent of 4 units: mean and raw scale per class
    prior = semi.F.softplus(top[:, 4:]) + 1e-3
    assert torch.allclose(prior, torch.ones_like(prior)) and top[:, :4].abs().max() == 0  # starts at N(0, I)


def test_alpha_rule():
    assert semi.alpha_rule(100, 59900) == pytest.approx(60.0)
    assert semi.alpha_rule(10, 30, beta=1.0) == pytest.approx(4.0)
    with pytest.raises(Exception, match="labelled"):
        semi.alpha_rule(0, 10)


def test_training_a_tiny_conditional_model_lowers_the_loss():
    torch.manual_seed(0)
    model = conditional(randomise_top=False).train()
    x, y = bars(64, seed=9)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    alpha = semi.alpha_rule(16, 48, beta=0.1)
    losses, ce = [], []
    for step in range(40):
        lab = torch.randint(0, 16, (8,))
        unl = torch.randint(16, 64, (16,))
        terms = semi.semi_supervised_loss(model, {"index": lab, "x": x[lab], "y": y[lab]},
                                          {"index": unl, "x": x[unl]}, TrainNoise(), 0.1, alpha)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        losses.append(terms.loss.item())
        ce.append(terms.cross_entropy.item())
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 5.0
    assert np.mean(ce[-8:]) < np.mean(ce[:8])


def test_a_dense_ladder_shares_its_bottom_up_pass_over_the_classes():
    from shared.ladder import Ladder, LadderConfig

    torch.manual_seed(0)
    cfg = LadderConfig(ndim=0, input_channels=6, input_size=[], output_channels=8, levels=3, channels=[8] * 3,
                       latent_channels=[2] * 3, strides=[1] * 3, kernels=[1] * 3, depth=1, latent_kind="dense",
                       num_classes=C)
    ladder = Ladder(cfg).eval()
    e0 = torch.randn(4, 6)
    noise = HashedNoise(1, torch.arange(4))
    with torch.no_grad():
        each = ladder(e0, noise, y=torch.arange(C).repeat(4), repeats=C)
        for c in range(C):
            alone = ladder(e0, noise, y=torch.full((4,), c))
            assert torch.allclose(each.d0.view(4, C, -1)[:, c], alone.d0, atol=1e-6)
            assert torch.allclose(each.log_p.view(4, C, -1)[:, c], alone.log_p, atol=1e-5)
            assert torch.allclose(each.log_q.view(4, C, -1)[:, c], alone.log_q, atol=1e-5)
        assert ladder.classify(e0).shape == (4, C)
    assert not torch.allclose(each.d0.view(4, C, -1)[:, 0], each.d0.view(4, C, -1)[:, 1])
