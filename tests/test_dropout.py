"""Dropout: the fast masks have nn.Dropout's distribution on every device path, use every random lane
independently, and follow the layout of x."""
import pytest
import torch

from shared.nn import Dropout, keep_mask


def test_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    for p in (0.2, 0.5):
        drop = Dropout(p).train()
        y = drop(x)
        kept = y != 0
        # 400k Bernoulli draws: the keep rate's standard error is below 0.001.
        assert abs(kept.float().mean().item() - (1 - p)) < 0.004
        # p is rounded to 2^-16 (0.2 -> 13107 / 65536) and the scale uses the rounded p: unbiased.
        scale = 65536 / (65536 - round(p * 65536))
        assert abs(scale - 1 / (1 - p)) < 1e-5 * scale
        assert torch.equal(y[kept], torch.full_like(y[kept], scale))
        assert abs(y.mean().item() - 1.0) < 0.01  # unbiased, as nn.Dropout
        z = torch.randn(50, 7, requires_grad=True)
        out = drop(z)
        out.sum().backward()  # the gradient is the same mask, scaled
        torch.testing.assert_close(z.grad, (out.detach() != 0).float() * scale)
        assert torch.equal(drop.eval()(x), x)  # identity in evaluation


@pytest.mark.parametrize("p, lanes", [(0.2, 4), (0.25, 8), (0.5, 64)])
def test_dropout_uses_every_lane_of_each_draw_independently(p, lanes):
    """Several mask elements come from one 64-bit draw: four 16-bit lanes for p = 0.2, eight 8-bit lanes
    for p = 0.25 (a multiple of 2^-8), one bit each for p = 0.5. Every lane must keep at 1 - p, and
    neighbouring lanes must not be correlated (a lane taken from a 63-bit draw, or repeated, or a bit
    unpacked twice, would show here)."""
    torch.manual_seed(0)
    y = Dropout(p).train()(torch.ones(200_000 * lanes)).view(-1, lanes) != 0
    rates = y.float().mean(0)
    assert torch.all((rates - (1 - p)).abs() < 0.005), rates
    for a, b in ((y[:, 0], y[:, 1]), (y[:, lanes - 2], y[:, lanes - 1]), (y[:-1, lanes - 1], y[1:, 0])):
        # independent lanes, within a draw and across draws: P(keep, keep) = (1 - p)^2
        assert abs((a & b).float().mean().item() - (1 - p) ** 2) < 0.005
    # the draws are consumed as counted: the next draw from the generator is the one after the mask's
    torch.manual_seed(0)
    Dropout(p).train()(torch.ones(1000 * lanes))
    after = torch.empty(1, dtype=torch.int64).random_(-2**63, None)
    torch.manual_seed(0)
    torch.empty(1000, dtype=torch.int64).random_(-2**63, None)
    assert torch.equal(after, torch.empty(1, dtype=torch.int64).random_(-2**63, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_uniform_mask_of_other_devices_has_the_rate_and_layout_too(dtype):
    """GPUs draw one uniform per element (keep_mask's other path, run here on the CPU)."""
    torch.manual_seed(0)
    x = torch.ones(40, 16, 25, 25, dtype=dtype).contiguous(memory_format=torch.channels_last)
    keep = keep_mask(x, round(0.2 * 65536), integer_lanes=False)
    assert keep.dtype == torch.uint8  # as on a CPU: compiled CPU code reads bool tensors ~16x slower
    assert keep.is_contiguous(memory_format=torch.channels_last) and not keep.is_contiguous()
    assert abs(keep.float().mean().item() - 0.8) < 0.004


@pytest.mark.parametrize("p", [0.2, 0.25, 0.5])
def test_the_cpu_mask_is_zero_one_uint8_in_the_layout_of_x(p):
    torch.manual_seed(0)
    x = torch.ones(6, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    keep = keep_mask(x, round(p * 65536))
    assert keep.dtype == torch.uint8 and keep.shape == x.shape and set(keep.unique().tolist()) <= {0, 1}
    assert keep.is_contiguous(memory_format=torch.channels_last) and not keep.is_contiguous()
    assert keep_mask(torch.ones(3, 5, 7), round(p * 65536)).is_contiguous()  # 3-D, odd sizes: no full draw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_follows_the_layout_of_x_and_not_its_dtype(dtype):
    torch.manual_seed(0)
    x = torch.ones(40, 16, 25, 25, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = Dropout(0.2).train()(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert abs((y != 0).float().mean().item() - 0.8) < 0.004  # the rate is not rounded to bf16
    # the same draws as a contiguous tensor: the mask is laid out as x is, element for element
    torch.manual_seed(0)
    flat = Dropout(0.2).train()(torch.ones(40 * 25 * 25 * 16, dtype=dtype)) != 0
    assert torch.equal((y != 0).permute(0, 2, 3, 1).reshape(-1), flat)
