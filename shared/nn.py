"""Building blocks for feature maps of any spatial rank: (B, C) dense, (B, C, T) 1-D, (B, C, H, W) 2-D.

Everything is weight-normalised (Salimans & Kingma 2016) with explicit ``v`` and ``g`` parameters, so
state dicts are plain tensors (safetensors-friendly) and EMA copies need no parametrisation hooks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def upsampling_taps(factor: int, kernel: int) -> torch.Tensor:
    """The (factor, n, kernel) 0/1 tensor that folds a ``kernel``-wide 'same' convolution of a signal
    upsampled ``factor`` times by nearest neighbour into ``factor`` convolutions (phases) of n taps at
    the signal's own resolution, n = 2 ceil((kernel // 2) / factor) + 1.

    Output position factor * i + a of the upsampled convolution reads tap d (-p..p, p = kernel // 2) at
    upsampled position factor * i + a + d, i.e. at input position i + floor((a + d) / factor): tap d of
    phase a lands on low-resolution tap floor((a + d) / factor) + ceil(p / factor), and every upsampled
    position outside the signal maps to one outside it, so zero padding stays exact."""
    p = kernel // 2
    reach = (p + factor - 1) // factor
    taps = torch.zeros(factor, 2 * reach + 1, kernel)
    for a in range(factor):
        for d in range(-p, p + 1):
            taps[a, (a + d) // factor + reach, d + p] = 1.0
    return taps


class WNConv(nn.Module):
    """Weight-normalised convolution over ``ndim`` spatial dims (ndim 0 = linear layer).

    ``stride`` > 1 downsamples with 'same' padding (odd kernels); ``upsample`` > 1 convolves the input
    upsampled that many times by nearest neighbour (F.interpolate, mode 'nearest'), computed at
    the input's resolution as one convolution with ``upsample ** ndim`` times the output channels and a
    depth-to-space shuffle (sub-pixel convolution): the same function and parameters, but a 5x5 kernel
    after a 2x upsampling costs 9 instead of 25 multiply-adds per output and the upsampled map is never
    built. ``init_scale`` < 1 shrinks the initial output, which keeps deep residual stacks near the
    identity at the start.
    """

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                 init_scale: float = 1.0, upsample: int = 1):
        super().__init__()
        if ndim == 0:
            kernel, stride = 1, 1
        if kernel % 2 == 0:
            raise ValueError(f"kernel sizes must be odd, got {kernel}")
        if upsample > 1 and (ndim == 0 or stride > 1):
            raise ValueError("upsampling needs a 1-D or 2-D convolution of stride 1")
        self.ndim, self.kernel, self.stride, self.upsample = ndim, kernel, stride, upsample
        if upsample > 1:  # not in the state dict: checkpoints hold v, g, b as for any convolution
            self.register_buffer("taps", upsampling_taps(upsample, kernel), persistent=False)
        self.channels_last = False  # 2-D only; set by set_channels_last
        shape = (c_out, c_in) + (kernel,) * ndim
        v = torch.empty(shape)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.v = nn.Parameter(v)
        # g = init_scale * ||v|| reproduces the default init's scale at the start; kept in the
        # broadcast shape (c_out, 1, ...) so the weight is one fused op.
        self.g = nn.Parameter(init_scale * v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))))
        bound = 1.0 / math.sqrt(c_in * kernel**ndim)
        self.b = nn.Parameter(torch.empty(c_out).uniform_(-bound, bound) * init_scale)

    def weight(self) -> torch.Tensor:
        # One fused kernel (what nn.utils.weight_norm uses): deep ladders are launch-bound on a GPU.
        return torch._weight_norm(self.v, self.g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.upsample > 1:
            return self._upsampled(x, w)
        if self.ndim == 0:
            return F.linear(x, w, self.b)
        if self.ndim == 1:
            return F.conv1d(x, w, self.b, stride=self.stride, padding=self.kernel // 2)
        if self.channels_last:  # no-ops once the whole network runs channels_last
            x = x.contiguous(memory_format=torch.channels_last)
            # also the output: a 1-channel input is both layouts, and the convolution then picks NCHW
            return F.conv2d(x, w, self.b, stride=self.stride, padding=self.kernel // 2).contiguous(
                memory_format=torch.channels_last)
        return F.conv2d(x, w, self.b, stride=self.stride, padding=self.kernel // 2)

    def _upsampled(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The sub-pixel form: output channel o, phase a (per spatial dim) is low-resolution channel
        (o, a) of one convolution whose kernel sums the taps of w that phase a reads."""
        s, A = self.upsample, self.taps.to(w.dtype)
        c_out, c_in, n = w.shape[0], w.shape[1], A.shape[1]
        if self.ndim == 1:
            b = self.b.repeat_interleave(s)
            y = F.conv1d(x, torch.einsum("auk,ock->oacu", A, w).reshape(c_out * s, c_in, n), b, padding=n // 2)
            B, _, T = y.shape
            return y.view(B, c_out, s, T).transpose(2, 3).reshape(B, c_out, T * s)
        if self.channels_last:
            # Phase-major channels (a, b, o): in NHWC memory each phase's c_out channels lie together, so
            # the depth-to-space step moves whole runs of c_out floats (pixel_shuffle's channel order,
            # o-major, makes every element a gather; compiled, a scalar loop).
            w = torch.einsum("auk,bvl,ockl->abocuv", A, A, w).reshape(s * s * c_out, c_in, n, n)
            y = F.conv2d(x.contiguous(memory_format=torch.channels_last), w, self.b.repeat(s * s), padding=n // 2)
            B, _, H, W = y.shape
            y = y.permute(0, 2, 3, 1).reshape(B, H, W, s, s, c_out).transpose(2, 3).reshape(B, H * s, W * s, c_out)
            return y.permute(0, 3, 1, 2)
        w = torch.einsum("auk,bvl,ockl->oabcuv", A, A, w).reshape(c_out * s * s, c_in, n, n)
        return F.pixel_shuffle(F.conv2d(x, w, self.b.repeat_interleave(s * s), padding=n // 2), s)


def keep_mask(x: torch.Tensor, dropped: int, integer_lanes: bool | None = None) -> torch.Tensor:
    """A 0/1 mask (uint8) in the layout of x, each element 0 with probability dropped / 65536.

    On a CPU (``integer_lanes`` None: by device) the mask comes from small random integers, several
    from each 64-bit draw of the generator (``random_lanes``), since torch's CPU generator runs on one
    thread: dropout 0.5 keeps an element where its bit is 1, 64 elements per draw; another multiple of
    2^-8 (0.25, ...) compares eight 8-bit lanes per draw with a threshold, any other rate four 16-bit
    lanes. On other devices, whose generators are parallel (and where a full-range int64 draw may not
    exist), it is one uniform per element. A channels_last x gets a channels_last mask either way. The
    mask is uint8, not bool, which inductor's CPU code reads far faster (docs/performance.md)."""
    if integer_lanes is None:
        integer_lanes = x.device.type == "cpu"
    if not integer_lanes:
        return (torch.rand_like(x, dtype=torch.float32) >= dropped / 65536).view(torch.uint8)
    n, bits = x.numel(), lane_bits(dropped)
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        lanes = _random_lanes_op(x, n, bits)  # drawn eagerly; unpacking and comparing fuse into the graph
    else:
        lanes = random_lanes(n, bits, x.device)
    if bits == 1:  # each random byte picks the 8 bytes that spell its bits out, as one int64 of a table
        keep = _BIT_TABLE.to(x.device)[lanes.long()].view(torch.uint8)[:n]
    else:
        keep = (lanes[:n] >= (dropped // 256 if bits == 8 else dropped - 32768)).view(torch.uint8)
    if _dense_permuted(x):  # memory order N, H, W, C
        B, C, H, W = x.shape
        return keep.view(B, H, W, C).permute(0, 3, 1, 2)
    return keep.view(x.shape)


# (256,) int64 whose entry b holds in memory the eight bytes (b >> k) & 1, k = 0..7 (built byte-wise, so
# the same on any endianness): unpacking one random byte into eight 0/1 mask elements is one lookup,
# faster than shifting each byte eight times, eager or compiled.
_BIT_TABLE = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).view(256)


def lane_bits(dropped: int) -> int:
    """Bits of randomness per mask element for a rate of dropped / 65536: 1 for one half, 8 for
    another multiple of 2^-8, else 16."""
    return 1 if dropped == 32768 else 8 if dropped % 256 == 0 else 16


def random_lanes(n: int, bits: int, device) -> torch.Tensor:
    """Uniform random integers for n mask elements of ``bits`` bits each, every bit of each 64-bit draw
    used: n / 8 bytes (uint8) for 1 bit, n uint8 for 8 bits, n int16 for 16 bits (a few more lanes
    where n does not fill the last draw)."""
    lanes = torch.empty(_lane_count(n, bits), dtype=_lane_dtype(bits), device=device)
    lanes.view(torch.int64).random_(-2**63, None)  # the draws, written through a view: lanes is no view
    return lanes


def _lane_dtype(bits: int) -> torch.dtype:
    return torch.int16 if bits == 16 else torch.uint8  # 1-bit lanes travel as whole bytes


def _lane_count(n: int, bits: int) -> int:
    per_draw = 64 // bits
    return (n + per_draw - 1) // per_draw * (4 if bits == 16 else 8)


def _dense_permuted(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("biva::random_lanes", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _random_lanes_op(x: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """random_lanes as one opaque operator on x's device, for torch.compile on a CPU: dynamo cannot
    trace the in-place ``random_`` (a graph break at every dropout), and inductor's own CPU random
    numbers made the binary preset's compiled step slower than eager. The tag keeps the lanes drawn
    once, in the forward pass (the partitioner never recomputes a seeded random operator for the
    backward)."""
    return random_lanes(n, bits, x.device)


@_random_lanes_op.register_fake
def _(x: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    return torch.empty(_lane_count(n, bits), dtype=_lane_dtype(bits), device=x.device)


class Dropout(nn.Module):
    """Inverted dropout with the distribution of ``nn.Dropout``: each element kept with probability
    1 - p and scaled by 1 / (1 - p); the binary preset drops in every block.

    The mask comes from ``keep_mask`` (random bits, 8- or 16-bit integers on a CPU), so p is rounded to
    a multiple of 2^-16 (0.2 -> 0.199997) on every device, and the scale uses the rounded p: the output
    stays unbiased. The mask is drawn in the layout of x, whatever its dtype; under torch.compile on a
    CPU the same draws come from one opaque operator and the same mask from them, inside the graph."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.dropped = round(p * 65536)  # of 65536 equally likely values, those that drop
        if self.dropped >= 65536:
            raise ValueError(f"dropout {p} rounds to 1 at a resolution of 2^-16")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        keep = keep_mask(x, self.dropped)
        return x * (keep.to(x.dtype) * (65536 / (65536 - self.dropped)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GatedResLayer(nn.Module):
    """Gated residual layer (PixelCNN++ style): x + a * sigmoid(b), [a, b] = conv_1x1(drop(elu(conv_k(elu(x))))).

    The gate's convolution is 1x1 and the nonlinearity a plain ELU (PixelCNN++ uses a k x k gate
    and concat-ELU): with the paper's M = 3 layers per block this lands the CIFAR-10 BIVA near its
    reported 18.5M parameters, where PixelCNN++'s layer would give about 45M.
    """

    def __init__(self, ndim: int, channels: int, kernel: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = WNConv(ndim, channels, channels, kernel)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = WNConv(ndim, channels, 2 * channels, 1, init_scale=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.elu(x))
        a, b = self.conv2(self.dropout(F.elu(h))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


def set_channels_last(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the 2-D feature maps of ``module`` in the channels_last (NHWC) memory format, or back in NCHW.

    Only activations change layout: every 2-D convolution takes and returns channels_last maps (and so
    does every module with a ``channels_last`` attribute, e.g. the ladder's dense-latent projections),
    so the whole network stays in one layout; parameters stay contiguous, as checkpoints store them.
    Numbers are the same up to float rounding; oneDNN's convolutions prefer it (docs/performance.md)."""
    for m in module.modules():
        if hasattr(m, "channels_last") and getattr(m, "ndim", 2) == 2:
            m.channels_last = enabled
    return module


class Block(nn.Module):
    """A stage of the ladder: project ``c_in`` → ``c_out`` (optionally strided, or upsampling first: in
    one sub-pixel convolution, see WNConv), then ``depth`` gated residual layers."""

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel: int, depth: int,
                 stride: int = 1, upsample: int = 1, dropout: float = 0.0):
        super().__init__()
        up = upsample if ndim > 0 else 1  # dense maps have nothing to upsample
        self.proj = WNConv(ndim, c_in, c_out, kernel, stride=stride, upsample=up)
        self.layers = nn.Sequential(*[GatedResLayer(ndim, c_out, kernel, dropout) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.proj(x))
