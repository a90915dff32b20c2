"""All the numerics in one place: Gaussian latents, the likelihood heads, and the noise sources.

Log-densities are computed in fp32 even under mixed precision; every case selection uses
``torch.where`` on clamped inputs, so an inf in an unused branch never reaches a gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)
SIGMA_MIN = 1e-3  # floor of every Gaussian scale: keeps log-densities finite early in training


# --------------------------------------------------------------------------------------------
# Noise. Training draws from torch's RNG (per-rank, checkpointed by Accelerate). Evaluation
# draws from a counter-based hash of (seed, example, sample, group, element), so a figure does not
# depend on batch size, padding, chunking of importance samples, or the number of processes.
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _i64(c: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits (torch has no uint64 arithmetic)."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >> 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MUL1, _MUL2 = _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(h: torch.Tensor, s: int) -> torch.Tensor:
    # Logical right shift: int64 ``>>`` is arithmetic, so mask off the copies of the sign bit.
    return (h >> s) & ((1 << (64 - s)) - 1)


def _mix64(h: torch.Tensor) -> torch.Tensor:
    # SplitMix64's finaliser: a bijection of 64-bit values with full avalanche. Products wrap
    # modulo 2^64 (two's complement), which is what the hash wants. In place after the first
    # step: the tensors are as large as the noise drawn.
    h = h ^ _shr(h, 30)
    h.mul_(_MUL1)
    h ^= _shr(h, 27)
    h.mul_(_MUL2)
    h ^= _shr(h, 31)
    return h


def _absorb(h: torch.Tensor, v) -> torch.Tensor:
    return _mix64(h + _GOLDEN + v)  # a bijection of v for a fixed h: distinct ids, distinct keys


class TrainNoise:
    """Standard normal noise from torch's global RNG (the training path)."""

    def normal(self, shape, key: int, device, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype)

    def uniform(self, shape, key: int, device) -> torch.Tensor:
        return torch.rand(shape, device=device).clamp(1e-6, 1 - 1e-6)

    def per_example(self) -> "TrainNoise":
        return self


class HashedNoise:
    """Noise keyed by (seed, example index, sample index, group key, element index).

    ``example_ids`` and ``sample_ids`` are (B,) integer tensors, one entry per row of every
    requested tensor.
    """

    def __init__(self, seed: int, example_ids: torch.Tensor, sample_ids: torch.Tensor | None = None):
        self.seed = int(seed) & _M32
        self.example_ids = example_ids.long()
        self.sample_ids = torch.zeros_like(self.example_ids) if sample_ids is None else sample_ids.long()

    def _bits(self, shape, key: int, stream: int, device) -> torch.Tensor:
        """32 random bits (as int64 in [0, 2^32)) per element of ``shape``.

        Each row gets a 64-bit key from (seed, key, example, sample, stream); element e of the row is
        mix64(row_key ^ mix64(e)). Two rows share a run of values only if their keys differ by the
        XOR of two scrambled element indices at every position of the run: chance level, 2^-64 per
        pair, not the shifted copies that a key plus a plain counter gives.
        """
        rows = self.example_ids.to(device)
        h = _absorb(torch.full_like(rows, self.seed), int(key) & _M32)
        h = _absorb(h, rows)
        h = _absorb(h, self.sample_ids.to(device))
        h = _absorb(h, stream)
        n = int(math.prod(shape[1:]))
        elem = _mix64(torch.arange(n, device=device, dtype=torch.int64) + _GOLDEN)
        bits = _shr(_mix64(h[:, None] ^ elem[None, :]), 32)  # the high half: SplitMix64's best bits
        return bits.view(shape)

    def per_example(self) -> "HashedNoise":
        """The same noise for every importance sample of an example (e.g. its binarisation)."""
        return HashedNoise(self.seed, self.example_ids)

    @staticmethod
    def _unit(bits: torch.Tensor) -> torch.Tensor:
        # 23 bits: (k + 0.5) / 2^23 is exact in float32, so the value lies strictly in (0, 1) (with 24
        # bits the top value rounded to 1.0).
        return ((bits >> 9).float() + 0.5) / float(1 << 23)

    def uniform(self, shape, key: int, device) -> torch.Tensor:
        return self._unit(self._bits(shape, key, 1, device))

    def normal(self, shape, key: int, device, dtype=torch.float32) -> torch.Tensor:
        u1 = self.uniform(shape, key, device)
        u2 = self._unit(self._bits(shape, key, 2, device))
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)  # Box–Muller
        return z.to(dtype)


# --------------------------------------------------------------------------------------------
# Diagonal Gaussian latents.
# --------------------------------------------------------------------------------------------


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(dim=1)


class Gaussian:
    """Diagonal Gaussian N(mu, sigma^2); ``sigma = softplus(raw) + SIGMA_MIN`` (never the public
    code's ``exp(0.5 * softplus(.))``, which forces sigma >= 1)."""

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        self.mu, self.sigma = mu.float(), sigma.float()

    @classmethod
    def from_params(cls, params: torch.Tensor) -> "Gaussian":
        mu, raw = params.float().chunk(2, dim=1)
        return cls(mu, F.softplus(raw) + SIGMA_MIN)

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        return self.mu + self.sigma * eps.float()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Summed over all but the batch dimension: (B,)."""
        z = z.float()
        lp = -0.5 * ((z - self.mu) / self.sigma) ** 2 - torch.log(self.sigma) - 0.5 * LOG_2PI
        return sum_except_batch(lp)

    def kl(self, other: "Gaussian") -> torch.Tensor:
        """Closed-form KL(self || other), summed: (B,)."""
        ratio = (self.sigma / other.sigma) ** 2
        kl = 0.5 * (ratio + ((self.mu - other.mu) / other.sigma) ** 2 - 1.0 - torch.log(ratio))
        return sum_except_batch(kl)

    def scaled(self, temperature: float) -> "Gaussian":
        return Gaussian(self.mu, self.sigma * temperature)


def standard_normal_like(shape, device) -> Gaussian:
    return Gaussian(torch.zeros(shape, device=device), torch.ones(shape, device=device))


# --------------------------------------------------------------------------------------------
# Likelihoods p(x | z).
# --------------------------------------------------------------------------------------------


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x) for binary x under Bernoulli(sigmoid(logits)), summed per example: (B,)."""
    logits = logits.float()
    return -sum_except_batch(F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none"))


def categorical_log_prob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token log-probabilities summed over the unmasked positions: logits (B, T, V), targets (B, T),
    mask (B, T) → (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=1)


def mixture_param_channels(channels: int, components: int) -> int:
    """Head width of a discretised logistic mixture: per component, one logit, a mean and a log
    scale per channel, and one coupling coefficient per pair (c, c' < c)."""
    return components * (1 + 2 * channels + channels * (channels - 1) // 2)


class DiscretizedLogisticMixture:
    """PixelCNN++'s discretised logistic mixture over uint8 sub-pixels, channels coupled
    autoregressively: the mean of channel c is linear in the values of channels < c.

    ``params`` (B, K*(1 + 2C + C(C-1)/2), H, W); data scaled as x/127.5 - 1, so 0 and 255 are the
    exact edges of [-1, 1] and bins are 2/255 wide.
    """

    LOG_SCALE_MIN = -7.0

    def __init__(self, params: torch.Tensor, channels: int, components: int):
        params = params.float()
        B, _, *spatial = params.shape
        K, C = components, channels
        n_coef = C * (C - 1) // 2
        logits, means, log_scales, coefs = torch.split(params, [K, K * C, K * C, K * n_coef], dim=1)
        self.C, self.K = C, K
        self.logits = logits  # (B, K, *S)
        self.means = means.reshape(B, K, C, *spatial)
        self.log_scales = log_scales.reshape(B, K, C, *spatial).clamp_min(self.LOG_SCALE_MIN)
        self.coefs = torch.tanh(coefs.reshape(B, K, n_coef, *spatial))

    def _coupled_means(self, x: torch.Tensor) -> torch.Tensor:
        """Means (B, K, C, *S) given x (B, C, *S) in [-1, 1]: mean_c + sum_{c'<c} coef * x_c'."""
        if self.C == 1:
            return self.means
        means, idx = [self.means[:, :, 0]], 0
        for c in range(1, self.C):
            m = self.means[:, :, c]
            for cp in range(c):
                m = m + self.coefs[:, :, idx] * x[:, cp].unsqueeze(1)
                idx += 1
            means.append(m)
        return torch.stack(means, dim=2)

    def log_prob(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """log p(x) per example (B,), x given as integers 0..255 of shape (B, C, *S)."""
        xi = x_uint8.long().unsqueeze(1)  # (B, 1, C, *S)
        x = x_uint8.float() / 127.5 - 1.0
        means = self._coupled_means(x)
        centered = x.unsqueeze(1) - means
        inv_s = torch.exp(-self.log_scales)
        plus_in = inv_s * (centered + 1.0 / 255)
        min_in = inv_s * (centered - 1.0 / 255)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the bin at 0 takes the left tail
        log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 - sigmoid(min_in)): the bin at 255, right tail
        # log(sigmoid(a) - sigmoid(b)) = a + log(1 - e^(b-a)) - softplus(a) - softplus(b), stable everywhere
        # the difference itself is representable; the density fallback covers the rest.
        one_minus = -torch.expm1(min_in - plus_in)
        ok = one_minus > 1e-30
        log_delta = plus_in + torch.log(one_minus.clamp_min(1e-30)) - F.softplus(plus_in) - F.softplus(min_in)
        mid_in = inv_s * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * F.softplus(mid_in) + math.log(2.0 / 255)
        interior = torch.where(ok, log_delta, log_pdf_mid)
        log_p = torch.where(xi == 0, log_cdf_plus, torch.where(xi == 255, log_one_minus_cdf_min, interior))
        log_p = log_p.sum(dim=2) + torch.log_softmax(self.logits, dim=1)  # (B, K, *S)
        return sum_except_batch(torch.logsumexp(log_p, dim=1))

    def sample(self, noise=None, key: int = 0, mode: str = "sample") -> torch.Tensor:
        """Draw x (B, C, *S) as uint8. ``mode="mean"`` returns the most likely component's mean."""
        B, K, *spatial = self.logits.shape
        device = self.logits.device
        uniform = (lambda shape, k: noise.uniform(shape, k, device)) if noise is not None else \
            (lambda shape, k: torch.rand(shape, device=device).clamp(1e-5, 1 - 1e-5))
        if mode == "mean":
            comp = self.logits.argmax(dim=1)
        else:
            gumbel = -torch.log(-torch.log(uniform(self.logits.shape, key)))
            comp = (self.logits + gumbel).argmax(dim=1)  # (B, *S)
        onehot = F.one_hot(comp, K).movedim(-1, 1).unsqueeze(2).float()  # (B, K, 1, *S)
        means = (self.means * onehot).sum(1)  # (B, C, *S)
        log_s = (self.log_scales * onehot).sum(1)
        coefs = (self.coefs * onehot).sum(1)
        u = uniform((B, self.C, *spatial), key + 1)
        x, idx = [], 0
        for c in range(self.C):
            m = means[:, c]
            for cp in range(c):
                m = m + coefs[:, idx] * x[cp]
                idx += 1
            if mode != "mean":
                m = m + torch.exp(log_s[:, c]) * (torch.log(u[:, c]) - torch.log1p(-u[:, c]))
            # Later channels are coupled to the quantised value, as in log_prob.
            x.append(torch.round((m.clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0)
        x = torch.stack(x, dim=1)
        return torch.round((x + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
