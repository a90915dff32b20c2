"""The bounds: L^{>0} is the ELBO, L_K rises with K, chunking and batch size change nothing, and the
ELBO lies below an exactly integrable log-likelihood."""
import math

import pytest
import torch
from torch import nn
from core_utils import ArrayDataset, stripes, tiny_image_config

from biva_image.model import ImageVAE
from shared.bounds import bits_per_dim, elbo, iw_bound, repeat_batch
from shared.distributions import Gaussian, HashedNoise, standard_normal_like
from shared.evaluate import evaluate
from shared.model import LatentVariableModel, ModelOutput


def batch_of(x, start=0):
    x = torch.as_tensor(x)
    return {"index": torch.arange(start, start + len(x)), "x": x}


def widen_latent_heads(model, factor=10.0):
    """Scale up the latent heads of a fresh model so q and p disagree: large gaps for L_K to close."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("q_" in name or "p_heads" in name) and name.endswith(".g"):
                p.mul_(factor)
    return model


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {v: widen_latent_heads(ImageVAE(tiny_image_config(v))).eval() for v in ("biva", "lvae+", "lvae")}


@pytest.mark.parametrize("variant", ["biva", "lvae+", "lvae"])
def test_l_greater_than_zero_is_the_elbo(tiny_models, variant):
    model = tiny_models[variant]
    b = batch_of(stripes(6))
    plain = model(b, HashedNoise(3, b["index"])).bound()  # the ELBO: every group from the posterior
    assert torch.equal(elbo(model, b, seed=3, k=0).bound(), plain)
    # k > 0 leaves the lowest levels out of the bound and draws them from the prior instead.
    above = elbo(model, b, seed=3, k=1)
    assert not all(above.scored) and not torch.allclose(above.bound(), plain)


def test_group_counts():
    assert ImageVAE(tiny_image_config("biva", levels=4)).num_groups == 2 * 4 - 1
    assert ImageVAE(tiny_image_config("lvae+", levels=4)).num_groups == 4
    assert ImageVAE(tiny_image_config("lvae", levels=4)).num_groups == 4


def test_iw_bound_rises_with_k(tiny_models):
    model = tiny_models["biva"]
    b = batch_of(stripes(6, seed=2))
    means = {}
    for K in (1, 10, 100):
        means[K] = torch.stack([iw_bound(model, b, K, seed=s, chunk_size=100) for s in range(3)]).mean().item()
    l1 = torch.stack([elbo(model, b, seed=s).bound() for s in range(3)]).mean().item()
    assert abs(means[1] - l1) < 1e-4  # L_1 is the ELBO
    assert means[1] <= means[10] <= means[100]
    assert means[100] - means[1] > 5.0  # a random model has a real gap to close


def test_chunked_iw_bound_equals_unchunked():
    # 4x4 images keep the bound near 10 nats, where float32 resolves 1e-5 (convolutions of other
    # batch sizes may round differently in the last bit).
    torch.manual_seed(0)
    model = widen_latent_heads(ImageVAE(tiny_image_config("lvae+", size=4))).eval()
    b = batch_of(stripes(5, seed=4, size=4))
    whole = iw_bound(model, b, 60, seed=1, chunk_size=60)
    for chunk in (1, 7, 25):
        assert torch.allclose(iw_bound(model, b, 60, seed=1, chunk_size=chunk), whole, atol=1e-5, rtol=0)


def test_evaluation_does_not_depend_on_batch_size(tiny_models):
    model = tiny_models["biva"]
    data = ArrayDataset(stripes(15, seed=5))
    a = evaluate(model, data, batch_size=1, seed=2, iw_samples=5, progress=False)
    b = evaluate(model, data, batch_size=7, seed=2, iw_samples=5, progress=False)
    assert a.num_examples == b.num_examples == 15
    assert abs(a.elbo - b.elbo) < 1e-5 and abs(a.iw - b.iw) < 1e-5
    assert a.kl_per_group == pytest.approx(b.kl_per_group, abs=1e-5)


def test_bits_per_dim():
    assert bits_per_dim(-math.log(2) * 3072, 3072) == pytest.approx(1.0)


class LinearGaussian(LatentVariableModel):
    """z ~ N(0, 1), x | z ~ N(a z + b, s^2): p(x) = N(b, a^2 + s^2) is known exactly. The encoder
    q(z | x) = N(c x + d, e^2) is deliberately imperfect."""

    modality = "test"
    group_info = [{"level": 1, "kind": "top"}]

    def __init__(self):
        super().__init__()
        self.a, self.b, self.s = 1.5, 0.3, 0.7
        self.c, self.d, self.e = 0.5, -0.1, 0.5
        self.dummy = nn.Parameter(torch.zeros(1))

    def exact_log_px(self, x):
        return Gaussian(torch.full_like(x, self.b), torch.full_like(x, math.sqrt(self.a**2 + self.s**2))).log_prob(x)

    def forward(self, batch, noise, *, mode="posterior", k=0, analytic_kl=False):
        x = batch["x"]
        q = Gaussian(self.c * x + self.d, torch.full_like(x, self.e))
        z = q.sample(noise.normal(x.shape, 0, x.device))
        lik = Gaussian(self.a * z + self.b, torch.full_like(x, self.s))
        prior = standard_normal_like(x.shape, x.device)
        return ModelOutput(log_px=lik.log_prob(x), log_q=q.log_prob(z)[:, None], log_p=prior.log_prob(z)[:, None],
                           scored=[True])

    def data_size(self, batch):
        return torch.ones(batch["x"].shape[0])

    def posterior_means(self, batch, noise):
        return [self.c * batch["x"] + self.d]


def test_elbo_and_iw_bound_against_exact_likelihood():
    model = LinearGaussian()
    x = torch.linspace(-3, 3, 13).view(13, 1)
    b = {"index": torch.arange(13), "x": x}
    exact = model.exact_log_px(x)
    # L_1 averaged over 20,000 samples per point: the standard error (0.003 nats) is well below the
    # smallest true gap KL(q || p(z|x)) = 0.031 nats, so the checks below do not hang on luck.
    n = 20_000
    rep = repeat_batch(b, n)
    noise = HashedNoise(0, rep["index"], torch.arange(n).repeat(13))
    l1 = model(rep, noise).bound().view(13, n).mean(1)
    assert (l1 < exact).all()
    l1000 = torch.stack([iw_bound(model, b, 1000, seed=s, chunk_size=250) for s in range(4)]).mean(0)
    assert (exact - l1).min() > 0.01  # a real gap for the importance samples to close
    assert (l1000 - exact).abs().max() < 0.02
    assert (l1000 > l1).all()


def test_iw_chunk_from_memory_gives_the_same_bound():
    from shared.bounds import auto_iw_chunk

    torch.manual_seed(0)
    model = ImageVAE(tiny_image_config("biva")).eval()
    b = batch_of(stripes(5))
    chunk = auto_iw_chunk(model, b, 40)
    assert 1 <= chunk <= 40
    fixed = iw_bound(model, b, 40, seed=2, chunk_size=7)
    torch.testing.assert_close(iw_bound(model, b, 40, seed=2, chunk_size=None), fixed, rtol=0, atol=1e-5)
    data = ArrayDataset(stripes(10))
    auto = evaluate(model, data, batch_size=4, seed=2, iw_samples=12, iw_chunk=None)
    one = evaluate(model, data, batch_size=4, seed=2, iw_samples=12, iw_chunk=1)
    assert auto.iw == pytest.approx(one.iw, abs=1e-5)
