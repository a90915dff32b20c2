"""Every probability is a normalised one; evaluation noise is reproducible."""

import pytest
import torch

from shared.distributions import (DiscretizedLogisticMixture, Gaussian, HashedNoise, bernoulli_log_prob,
                                  categorical_log_prob, mixture_param_channels)


def random_mixture_params(channels, components, n_pixels, seed, log_scale_range=(-7.0, 4.0)):
    g = torch.Generator().manual_seed(seed)
    K, C = components, channels
    logits = torch.randn(n_pixels, K, generator=g) * 3
    means = torch.rand(n_pixels, K * C, generator=g) * 3 - 1.5  # some means beyond the [-1, 1] edges
    lo, hi = log_scale_range
    log_scales = torch.rand(n_pixels, K * C, generator=g) * (hi - lo) + lo
    coefs = torch.randn(n_pixels, K * (C * (C - 1) // 2), generator=g) * 2
    params = torch.cat([logits, means, log_scales, coefs], dim=1)
    assert params.shape[1] == mixture_param_channels(C, K)
    return params[:, :, None, None]  # (P, ch, 1, 1): one pixel per row


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale_range", [(-7.0, -5.0), (-3.0, 1.0), (2.0, 6.0)])
def test_logistic_mixture_one_channel_sums_to_one(seed, scale_range):
    params = random_mixture_params(1, 5, 8, seed, scale_range)
    values = torch.arange(256, dtype=torch.uint8)
    for p in params:
        dist = DiscretizedLogisticMixture(p.expand(256, -1, -1, -1), 1, 5)
        total = torch.logsumexp(dist.log_prob(values.view(256, 1, 1, 1)), 0).exp()
        assert abs(total.item() - 1.0) < 1e-4


@pytest.mark.parametrize("seed", range(3))
def test_logistic_mixture_coupled_channels_sum_to_one(seed):
    # Two coupled channels: the joint over all 256^2 values of a pixel.
    params = random_mixture_params(2, 4, 3, seed)
    grid = torch.cartesian_prod(torch.arange(256), torch.arange(256)).to(torch.uint8)  # (65536, 2)
    for p in params:
        dist = DiscretizedLogisticMixture(p.expand(grid.shape[0], -1, -1, -1), 2, 4)
        total = torch.logsumexp(dist.log_prob(grid.view(-1, 2, 1, 1)), 0).exp()
        assert abs(total.item() - 1.0) < 1e-4


def test_logistic_mixture_rgb_coupling_is_normalised():
    # One component, three coupled channels: summing x_1 and x_2 out of p(x_0, x_1, x_2) must give
    # channel 0's own discretised logistic, for any x_0.
    K, C = 1, 3
    p = random_mixture_params(C, K, 1, seed=7, log_scale_range=(-4.0, 0.0))[0]
    logit, means, log_scales = p[0:1], p[1:4], p[4:7]
    marginal0 = DiscretizedLogisticMixture(torch.cat([logit, means[:1], log_scales[:1]]).expand(256, -1, -1, -1), 1, K)
    p0 = marginal0.log_prob(torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1))
    grid = torch.cartesian_prod(torch.arange(256), torch.arange(256)).to(torch.uint8)
    dist = DiscretizedLogisticMixture(p.expand(grid.shape[0], -1, -1, -1), C, K)
    for x0 in [0, 1, 37, 128, 200, 254, 255]:
        x = torch.cat([torch.full((grid.shape[0], 1), x0, dtype=torch.uint8), grid], dim=1)
        summed = torch.logsumexp(dist.log_prob(x.view(-1, 3, 1, 1)), 0)
        assert abs(summed.exp().item() - p0[x0].exp().item()) < 1e-5


def test_logistic_mixture_gradients_finite_at_extremes():
    params = random_mixture_params(3, 3, 16, seed=1, log_scale_range=(-7.0, 8.0)).requires_grad_(True)
    x = torch.randint(0, 256, (16, 3, 1, 1), dtype=torch.uint8)
    x[:4] = 0
    x[4:8] = 255
    lp = DiscretizedLogisticMixture(params, 3, 3).log_prob(x)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(params.grad).all()


def test_logistic_mixture_samples_match_probabilities():
    p = random_mixture_params(1, 2, 1, seed=3, log_scale_range=(-2.5, -2.0))[0]
    dist = DiscretizedLogisticMixture(p.expand(20000, -1, -1, -1), 1, 2)
    torch.manual_seed(0)
    samples = dist.sample().flatten().long()
    freq = torch.bincount(samples, minlength=256).float() / samples.numel()
    probs = DiscretizedLogisticMixture(p.expand(256, -1, -1, -1), 1, 2).log_prob(
        torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)).exp()
    assert (freq - probs).abs().sum() < 0.08  # total variation of 20k draws


def test_bernoulli_and_categorical_are_normalised():
    logits = torch.randn(6, 1, 1, 1) * 10
    both = torch.stack([bernoulli_log_prob(logits, torch.zeros_like(logits)),
                        bernoulli_log_prob(logits, torch.ones_like(logits))])
    assert torch.allclose(torch.logsumexp(both, 0), torch.zeros(6), atol=1e-5)
    V = 11
    logits = torch.randn(1, 1, V) * 5
    mask = torch.ones(1, 1, dtype=torch.bool)
    lps = torch.stack([categorical_log_prob(logits, torch.tensor([[v]]), mask) for v in range(V)])
    assert abs(torch.logsumexp(lps.flatten(), 0).item()) < 1e-5
    # Masked positions contribute nothing.
    assert categorical_log_prob(logits, torch.tensor([[3]]), torch.zeros(1, 1, dtype=torch.bool)).item() == 0.0


def test_gaussian_log_prob_and_kl():
    q = Gaussian(torch.tensor([[0.3, -1.0]]), torch.tensor([[0.5, 2.0]]))
    p = Gaussian(torch.zeros(1, 2), torch.ones(1, 2))
    ref = torch.distributions.Normal(q.mu, q.sigma)
    z = torch.tensor([[0.1, 0.4]])
    assert torch.allclose(q.log_prob(z), ref.log_prob(z).sum(1))
    ref_kl = torch.distributions.kl_divergence(ref, torch.distributions.Normal(p.mu, p.sigma)).sum(1)
    assert torch.allclose(q.kl(p), ref_kl)


def test_hashed_noise_is_keyed_per_example_not_per_batch():
    ids = torch.arange(10)
    full = HashedNoise(5, ids).normal((10, 3, 4), key=2, device="cpu")
    part = HashedNoise(5, ids[3:6]).normal((3, 3, 4), key=2, device="cpu")
    assert torch.equal(full[3:6], part)
    other_key = HashedNoise(5, ids).normal((10, 3, 4), key=3, device="cpu")
    other_seed = HashedNoise(6, ids).normal((10, 3, 4), key=2, device="cpu")
    assert not torch.equal(full, other_key) and not torch.equal(full, other_seed)
    big = HashedNoise(0, torch.arange(2000)).normal((2000, 50), key=0, device="cpu")
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    assert abs((big[:, :-1] * big[:, 1:]).mean().item()) < 0.01  # neighbouring elements uncorrelated
