"""The BIVA ladder, written once for dense, 1-D and 2-D feature maps (docs/design.md §2).

Two switches give the paper's ablations on the same code:

    variant   bu_latents   td_skip
    lvae      False        False
    lvae+     False        True
    biva      True         True

Groups are ordered z_L, then for i = L-1..1 its BU and TD groups (LVAE: one group per level,
labelled "td"). The ladder maps an embedded input e_0 to d_0 and the per-group log q and log p at
the samples; the modality adapter turns d_0 into p(x | z).

``num_classes`` C > 0 switches on the M2-style semi-supervised model (seed's Appendix B, eqs. 11-19):
- q(y|x): its own deterministic bottom-up stack (the BU path's block widths, kernels, strides, depth;
  no latents), flattened into one dense layer of C logits;
- y enters the generative model and the shared TD path in two places only: a learned linear
  projection of the one-hot y is added (broadcast over space) to the input of every TD block F_i,
  i = L-1..0 (so every d_i, hence every prior p(z_i | z_>i, y), every q(z_i^TD | ., y) and
  p(x | z, y) through d_0, see y), and the top prior p(z_L | y) = N(mu_y, sigma_y) is a learned
  table of one Gaussian per class (initialised to N(0, I)). Adding a projection of the one-hot is
  the same as concatenating it as channels, at the cost of one small linear layer per block.
The BU latents q(z_i^BU | x, z_<i^BU) do not see y (eq. 15 conditions the TD path only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .distributions import SIGMA_MIN, Gaussian, standard_normal_like
from .errors import UserError
from .nn import Block, WNConv

VARIANTS = {"biva": (True, True), "lvae+": (False, True), "lvae": (False, False)}
PRIOR_KEY_OFFSET = 4096  # noise keys of groups drawn from the prior in L^{>k} (independent of posterior draws)
CLASS_KEY = 8190  # noise key of the class drawn for unconditioned prior samples of a conditional ladder


@dataclass
class LadderConfig:
    ndim: int = 2  # spatial rank of the feature maps: 0 dense, 1 sequences, 2 images
    input_channels: int = 3  # channels of e_0
    input_size: list[int] = field(default_factory=lambda: [32, 32])  # spatial size of e_0 ([] when dense)
    output_channels: int = 32  # channels of d_0
    levels: int = 3  # L
    channels: list[int] = field(default_factory=lambda: [32, 32, 32])  # block width at levels 1..L
    latent_channels: list[int] = field(default_factory=lambda: [8, 8, 8])  # per group, levels 1..L
    strides: list[int] = field(default_factory=lambda: [2, 1, 2])  # stride of G_i, levels 1..L
    kernels: list[int] = field(default_factory=lambda: [5, 3, 3])  # kernel of G_i and its mirror F_{i-1}
    depth: int = 3  # M: gated residual layers per block
    latent_kind: str = "conv"  # "conv": 3x3 heads over the map; "dense": flatten -> linear heads
    latent_kernel: int = 3
    dropout_inference: float = 0.0  # BU stack and q-merge
    dropout_generative: float = 0.0  # shared top-down blocks
    bu_latents: bool = True
    td_skip: bool = True
    num_classes: int = 0  # C > 0: the M2-style semi-supervised model (q(y|x), y conditions p and the TD path)

    @property
    def variant(self) -> str:
        for name, switches in VARIANTS.items():
            if switches == (self.bu_latents, self.td_skip):
                return name
        return "biva(bu_latents, no td_skip)"

    def sizes(self) -> list[list[int]]:
        """Spatial size at levels 0..L."""
        sizes = [list(self.input_size)]
        for s in self.strides:
            sizes.append([n // s for n in sizes[-1]])
        return sizes

    def validate(self) -> "LadderConfig":
        L = self.levels
        if L < 1:
            raise UserError(f"the ladder needs at least one level, got levels={L}")
        for name in ("channels", "latent_channels", "strides", "kernels"):
            value = getattr(self, name)
            if len(value) != L:
                raise UserError(f"ladder {name} has {len(value)} entries but levels={L}; give one per level")
            if any(int(v) < 1 for v in value):
                raise UserError(f"ladder {name} must be positive integers, got {value}")
        if any(k % 2 == 0 for k in self.kernels) or self.latent_kernel % 2 == 0:
            raise UserError(f"kernel sizes must be odd, got kernels={self.kernels}, latent_kernel={self.latent_kernel}")
        if self.ndim not in (0, 1, 2):
            raise UserError(f"ndim must be 0, 1 or 2, got {self.ndim}")
        if len(self.input_size) != self.ndim:
            raise UserError(f"input_size {self.input_size} has {len(self.input_size)} dims but ndim={self.ndim}")
        if self.ndim == 0 and any(s != 1 for s in self.strides):
            raise UserError("a dense ladder (ndim=0) cannot have strides other than 1")
        total = math.prod(self.strides)
        for n in self.input_size:
            if n % total:
                raise UserError(
                    f"input size {self.input_size} does not fit the strides {self.strides}: every spatial "
                    f"size must be divisible by their product {total}; change the strides or pad the input"
                )
        if self.latent_kind not in ("conv", "dense"):
            raise UserError(f"latent_kind must be 'conv' or 'dense', got {self.latent_kind!r}")
        if self.num_classes < 0 or self.num_classes == 1:
            raise UserError(f"num_classes must be 0 (unsupervised) or at least 2, got {self.num_classes}")
        for p in (self.dropout_inference, self.dropout_generative):
            if not 0.0 <= p < 1.0:
                raise UserError(f"dropout must be in [0, 1), got {p}")
        return self


@dataclass
class LadderOutput:
    d0: torch.Tensor | None  # (B, output_channels, *S_0)
    log_q: torch.Tensor  # (B, G) fp32, log q(z_g | .) at the samples
    log_p: torch.Tensor  # (B, G) fp32, log p(z_g | z_>g) at the samples
    scored: list[bool]  # per group: part of the bound (levels > k)
    kl_analytic: torch.Tensor | None = None  # (B, G): closed form for TD/top groups, sampled for BU
    means: list[torch.Tensor] | None = None  # posterior means per group (mode "posterior_mean")
    scales: list[torch.Tensor] | None = None  # and their posterior standard deviations
    samples: list[torch.Tensor | None] | None = None  # the value of every group (None where not drawn)


class LatentHead(nn.Module):
    """Feature map at one level → parameters of `groups` diagonal Gaussians (each 2*zc channels)."""

    def __init__(self, cfg: LadderConfig, c_in: int, zc: int, size: list[int], groups: int = 1):
        super().__init__()
        self.dense = cfg.latent_kind == "dense"
        self.groups = groups
        if self.dense:
            self.net = WNConv(0, c_in * math.prod(size), 2 * zc * groups, init_scale=0.1)
        else:
            self.net = WNConv(cfg.ndim, c_in, 2 * zc * groups, cfg.latent_kernel, init_scale=0.1)

    def forward(self, h: torch.Tensor) -> list[Gaussian]:
        params = self.net(h.flatten(1) if self.dense else h)
        return [Gaussian.from_params(p) for p in params.chunk(self.groups, dim=1)]


class LatentToFeatures(nn.Module):
    """A latent sample → a feature map at its level (identity for conv latents)."""

    def __init__(self, cfg: LadderConfig, zc: int, size: list[int]):
        super().__init__()
        self.dense = cfg.latent_kind == "dense" and cfg.ndim > 0
        self.size = list(size)
        self.out_channels = zc
        if self.dense:
            self.net = WNConv(0, zc, zc * math.prod(size))
        self.ndim = cfg.ndim
        self.channels_last = False  # set by shared.nn.set_channels_last: the map joins channels_last ones

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.dense:
            return z
        h = self.net(z).view(z.shape[0], self.out_channels, *self.size)
        return h.contiguous(memory_format=torch.channels_last) if self.channels_last else h


class RepeatedNoise:
    """A noise source for a batch whose rows are each repeated n times in a row: every block of n
    rows gets the noise its example gets in the unrepeated batch (common random numbers)."""

    def __init__(self, base, n: int):
        self.base, self.n = base, n

    def _rows(self, shape) -> tuple[int, ...]:
        return (shape[0] // self.n, *shape[1:])

    def normal(self, shape, key: int, device, dtype=torch.float32) -> torch.Tensor:
        return self.base.normal(self._rows(shape), key, device, dtype).repeat_interleave(self.n, dim=0)

    def uniform(self, shape, key: int, device) -> torch.Tensor:
        return self.base.uniform(self._rows(shape), key, device).repeat_interleave(self.n, dim=0)

    def per_example(self) -> "RepeatedNoise":
        return RepeatedNoise(self.base.per_example(), self.n)


class Ladder(nn.Module):
    def __init__(self, cfg: LadderConfig):
        super().__init__()
        self.cfg = cfg.validate()
        L, nd = cfg.levels, cfg.ndim
        sizes = cfg.sizes()
        zc = cfg.latent_channels
        ch = cfg.channels
        bu = cfg.bu_latents
        self.sizes = sizes
        # Bottom-up stack G_1..G_L (index i-1).
        self.bu_blocks = nn.ModuleList()
        self.bu_z_in = nn.ModuleList()  # z_i^BU -> features entering G_{i+1}
        for i in range(1, L + 1):
            c_in = cfg.input_channels if i == 1 else ch[i - 2]
            if i > 1 and bu:
                self.bu_z_in.append(LatentToFeatures(cfg, zc[i - 2], sizes[i - 1]))
                c_in += zc[i - 2]
            self.bu_blocks.append(Block(nd, c_in, ch[i - 1], cfg.kernels[i - 1], cfg.depth,
                                        stride=cfg.strides[i - 1], dropout=cfg.dropout_inference))
        # q(z_i^BU | e_i), i = 1..L-1, and q(z_L | e_L).
        self.q_bu = nn.ModuleList([LatentHead(cfg, ch[i - 1], zc[i - 1], sizes[i]) for i in range(1, L)]) if bu else None
        self.q_top = LatentHead(cfg, ch[L - 1], zc[L - 1], sizes[L])
        # Top-down blocks F_0..F_{L-1}: F_i maps (z_{i+1}, d_{i+1}) at level i+1 to d_i at level i.
        self.td_z_in = nn.ModuleList()
        self.td_blocks = nn.ModuleList()
        for i in range(0, L):
            level = i + 1
            z_width = zc[level - 1] * (2 if (bu and level < L) else 1)
            self.td_z_in.append(LatentToFeatures(cfg, z_width, sizes[level]))
            c_in = z_width + (ch[level - 1] if (cfg.td_skip and level < L) else 0)
            c_out = cfg.output_channels if i == 0 else ch[i - 1]
            self.td_blocks.append(Block(nd, c_in, c_out, cfg.kernels[i], cfg.depth,
                                        upsample=cfg.strides[i], dropout=cfg.dropout_generative))
        # Priors p(z_i^BU, z_i^TD | z_>i) from d_i (shared trunk, two heads) and q(z_i^TD | d_i, e_i).
        n_groups = 2 if bu else 1
        self.p_heads = nn.ModuleList(
            [LatentHead(cfg, ch[i - 1], zc[i - 1], sizes[i], groups=n_groups) for i in range(1, L)])
        # merge(d_i, e_i): a 1x1 projection and one gated layer (inference side: its dropout).
        self.q_merge = nn.ModuleList(
            [Block(nd, 2 * ch[i - 1], ch[i - 1], 1, 1, dropout=cfg.dropout_inference) for i in range(1, L)])
        self.q_td = nn.ModuleList([LatentHead(cfg, ch[i - 1], zc[i - 1], sizes[i]) for i in range(1, L)])
        self.group_info = self._group_info()
        C = cfg.num_classes
        if C:
            # q(y|x): the BU stack's blocks without latents, then one dense softmax layer (eqs. 11-13).
            self.classifier_blocks = nn.ModuleList([
                Block(nd, cfg.input_channels if i == 1 else ch[i - 2], ch[i - 1], cfg.kernels[i - 1], cfg.depth,
                      stride=cfg.strides[i - 1], dropout=cfg.dropout_inference) for i in range(1, L + 1)])
            self.classifier_out = WNConv(0, ch[L - 1] * math.prod(sizes[L]), C)
            # one-hot y -> the input channels of F_i, added to them (= concatenating y to the input).
            self.td_y_in = nn.ModuleList([WNConv(0, C, block.proj.v.shape[1]) for block in self.td_blocks])
            # p(z_L | y): one diagonal Gaussian per class, (C, 2*zc, *S_L) as a latent head's output;
            # the raw scale starts at softplus^-1(1 - SIGMA_MIN), so every class starts at N(0, I).
            top = torch.zeros(C, 2 * zc[L - 1], *self.latent_shape(L)[1:])
            top[:, zc[L - 1]:] = math.log(math.expm1(1.0 - SIGMA_MIN))
            self.p_top_y = nn.Parameter(top)

    def _group_info(self) -> list[dict]:
        info = [{"level": self.cfg.levels, "kind": "top"}]
        for i in range(self.cfg.levels - 1, 0, -1):
            if self.cfg.bu_latents:
                info.append({"level": i, "kind": "bu"})
            info.append({"level": i, "kind": "td"})
        return info

    @property
    def num_groups(self) -> int:
        return len(self.group_info)

    def latent_shape(self, level: int) -> tuple[int, ...]:
        zc = self.cfg.latent_channels[level - 1]
        if self.cfg.latent_kind == "dense":
            return (zc,)
        return (zc, *self.sizes[level])

    def _y_features(self, i: int, y_onehot: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The projection of the one-hot y added to F_i's input h, broadcast over h's spatial dims."""
        return self.td_y_in[i](y_onehot).to(h.dtype).view(*h.shape[:2], *([1] * (h.dim() - 2)))

    def classify(self, e0: torch.Tensor) -> torch.Tensor:
        """Logits of q(y | x) from e_0: (B, C) fp32."""
        h = e0
        for block in self.classifier_blocks:
            h = block(h)
        return self.classifier_out(h.flatten(1)).float()

    def forward(self, e0: torch.Tensor | None, noise, *, mode: str = "posterior", k: int = 0,
                temperature: float = 1.0, batch_size: int | None = None, analytic_kl: bool = False,
                device=None, latents: list[torch.Tensor] | None = None,
                y: torch.Tensor | None = None, repeats: int = 1) -> LadderOutput:
        """Run the ladder.

        mode "posterior": the inference pass; levels <= k are drawn from the conditional prior
            (both groups) and left out of the bound, which gives L^{>k} (k = 0: the ELBO).
        mode "prior": generation from p(z) with the prior scales multiplied by ``temperature``.
        mode "posterior_mean": no sampling, every group at its posterior mean (active units).
        ``latents`` (one (B, ...) tensor per group, in group order) replaces every draw: in mode
            "posterior" it scores given latents under q(. | x) and p (e.g. the aggregate posterior
            of a mutual-information estimate); in mode "prior" it decodes given latents to d_0
            (e.g. interpolation). Only with k = 0.
        ``y`` (int64 (B,) class indices) is required by a conditional ladder (num_classes > 0) and
            refused by an unconditional one.
        ``repeats`` r > 1 (inference modes): the top-down pass runs r times per example, on rows
            b*r .. b*r + r - 1 (y then has B*r entries), after one bottom-up pass. Every repeat draws the
            noise of the example itself (common random numbers): repeat j equals a pass with y[b*r + j].
        """
        cfg = self.cfg
        L, bu = cfg.levels, cfg.bu_latents
        if mode not in ("posterior", "prior", "posterior_mean"):
            raise ValueError(f"unknown ladder mode {mode!r}")
        if not 0 <= k < L:
            raise UserError(f"k must be in 0..{L - 1} for a ladder of {L} levels, got {k}")
        if latents is not None and (k != 0 or len(latents) != self.num_groups):
            raise ValueError("latents needs one tensor per group and k = 0")
        if (y is None) != (cfg.num_classes == 0):
            raise ValueError("a conditional ladder (num_classes > 0) needs y, an unconditional one takes none")
        if repeats > 1 and (mode == "prior" or latents is not None):
            raise ValueError("repeats needs an inference mode and drawn latents")
        use_mean = mode == "posterior_mean"
        infer = mode != "prior"
        gid = {info["kind"] + str(info["level"]): g for g, info in enumerate(self.group_info)}
        G = self.num_groups
        if infer or (batch_size is None and e0 is not None):  # prior mode with e0: its batch, z ~ p(z)
            B, device = e0.shape[0], e0.device
        else:
            B = batch_size
        if y is not None and y.shape[0] != B * repeats:
            raise ValueError(f"y has {y.shape[0]} entries for {B} examples x {repeats} repeats")
        log_q = [None] * G
        log_p = [None] * G
        kl_an = [None] * G
        means = [None] * G
        scales = [None] * G
        samples = [None] * G
        scored = [info["level"] > k for info in self.group_info]

        def draw(dist: Gaussian, key: int) -> torch.Tensor:
            if latents is not None:  # keys of posterior and prior draws are the group ids when k = 0
                z = latents[key].to(dist.mu.dtype)
            else:
                z = dist.mu if use_mean else dist.sample(noise.normal(dist.mu.shape, key, dist.mu.device))
            samples[key % PRIOR_KEY_OFFSET] = z
            return z

        # ---- bottom-up pass: e_1..e_L and z^BU samples ----
        e = [e0] + [None] * L
        q_bu, z_bu = [None] * L, [None] * L
        if infer:
            h = e0
            for i in range(1, L + 1):
                if i > 1 and bu:
                    h = torch.cat([h, self.bu_z_in[i - 2](z_bu[i - 1])], dim=1)
                h = self.bu_blocks[i - 1](h)
                e[i] = h
                if i < L and bu:
                    (q_bu[i],) = self.q_bu[i - 1](h)
                    z_bu[i] = draw(q_bu[i], gid[f"bu{i}"])

        if repeats > 1:  # one BU pass shared by the r top-down passes of each example
            rep = lambda t: None if t is None else t.repeat_interleave(repeats, dim=0)  # noqa: E731
            e = [rep(t) for t in e]
            z_bu = [rep(t) for t in z_bu]
            q_bu = [None if q is None else Gaussian(rep(q.mu), rep(q.sigma)) for q in q_bu]
            samples = [rep(t) for t in samples]
            noise, B = RepeatedNoise(noise, repeats), B * repeats

        # ---- top group ----
        g = 0
        if y is not None:
            y_onehot = nn.functional.one_hot(y.long(), cfg.num_classes).to(self.p_top_y.dtype)  # (B, C)
            top_prior = Gaussian.from_params(self.p_top_y[y.long()])
        if infer:
            (q,) = self.q_top(e[L])
            z = draw(q, g)
            prior = top_prior if y is not None else standard_normal_like(q.mu.shape, q.mu.device)
            log_q[g], log_p[g], means[g] = q.log_prob(z), prior.log_prob(z), q.mu
            scales[g] = q.sigma
            if analytic_kl:
                kl_an[g] = q.kl(prior)
        else:
            prior = top_prior if y is not None else standard_normal_like((B, *self.latent_shape(L)), device)
            z = draw(prior.scaled(temperature), g)
            log_p[g] = prior.log_prob(z)
        z_above, d = z, None

        # ---- top-down pass ----
        for i in range(L - 1, 0, -1):
            h = self.td_z_in[i](z_above)
            if cfg.td_skip and d is not None:
                h = torch.cat([h, d], dim=1)
            if y is not None:
                h = h + self._y_features(i, y_onehot, h)
            d = self.td_blocks[i](h)
            priors = self.p_heads[i - 1](d)
            posterior_here = infer and i > k
            z_parts = []
            if bu:
                g, p = gid[f"bu{i}"], priors[0]
                if posterior_here:
                    z = z_bu[i]
                    log_q[g], log_p[g], means[g] = q_bu[i].log_prob(z), p.log_prob(z), q_bu[i].mu
                    scales[g] = q_bu[i].sigma
                    if analytic_kl:
                        kl_an[g] = log_q[g] - log_p[g]  # single-sample estimate: required for BU groups
                else:
                    key = g if mode == "prior" else g + PRIOR_KEY_OFFSET
                    z = draw(p.scaled(temperature), key)
                    log_p[g] = p.log_prob(z)
                z_parts.append(z)
            g, p = gid[f"td{i}"], priors[-1]
            if posterior_here:
                (q,) = self.q_td[i - 1](self.q_merge[i - 1](torch.cat([d, e[i]], dim=1)))
                z = draw(q, g)
                log_q[g], log_p[g], means[g] = q.log_prob(z), p.log_prob(z), q.mu
                scales[g] = q.sigma
                if analytic_kl:
                    kl_an[g] = q.kl(p)
            else:
                key = g if mode == "prior" else g + PRIOR_KEY_OFFSET
                z = draw(p.scaled(temperature), key)
                log_p[g] = p.log_prob(z)
            z_parts.append(z)
            z_above = torch.cat(z_parts, dim=1) if len(z_parts) > 1 else z_parts[0]

        h = self.td_z_in[0](z_above)
        if cfg.td_skip and d is not None:
            h = torch.cat([h, d], dim=1)
        if y is not None:
            h = h + self._y_features(0, y_onehot, h)
        d0 = self.td_blocks[0](h)

        zeros = torch.zeros(B, device=d0.device)
        stack = lambda xs: torch.stack([x if x is not None else zeros for x in xs], dim=1)  # noqa: E731
        return LadderOutput(
            d0=d0,
            log_q=stack(log_q),
            log_p=stack(log_p),
            scored=scored,
            kl_analytic=stack(kl_an) if analytic_kl and infer else None,
            means=means if use_mean else None,
            scales=scales if use_mean else None,
            samples=samples,
        )
