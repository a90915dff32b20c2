"""The non-CPU branch of the dropout mask (shared.nn.keep_mask with integer_lanes=False: one uniform per
element, what a GPU runs), forced on CPU tensors and compiled with torch.compile(fullgraph=True): the
bool-to-uint8 bitcast must lower in inductor, and the mask must be uint8 0/1 at the right rate, in the
layout of x (channels_last included). Eager gives the same kind of mask (not the same draws: inductor
has its own random numbers)."""
import math

import pytest
import torch

from shared.nn import keep_mask

N_ELEMENTS = 4 * 16 * 40 * 40  # 102,400


def _compiled(dropped: int):
    # A fresh compiled function per rate: the rate is a Python constant of the graph.
    return torch.compile(lambda x: keep_mask(x, dropped, integer_lanes=False), fullgraph=True)


def _check(mask: torch.Tensor, x: torch.Tensor, dropped: int) -> None:
    assert mask.dtype == torch.uint8
    assert mask.shape == x.shape
    assert mask.stride() == x.stride()  # the layout of x: channels_last stays channels_last
    values = torch.unique(mask).tolist()
    assert set(values) <= {0, 1}, values
    keep = 1.0 - dropped / 65536
    rate = mask.double().mean().item()
    se = math.sqrt(keep * (1.0 - keep) / mask.numel())
    assert abs(rate - keep) < 5 * se, (rate, keep, se)


@pytest.mark.parametrize("p", [0.5, 0.2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_branch_compiles_fullgraph_with_the_right_rate(p, layout, dtype):
    dropped = round(p * 65536)
    x = torch.randn(4, 16, 40, 40, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
    assert x.numel() == N_ELEMENTS
    torch.manual_seed(0)
    mask = _compiled(dropped)(x)
    _check(mask, x, dropped)
    # A second call draws anew (the compiled graph does not freeze one mask).
    again = _compiled(dropped)(x)
    assert not torch.equal(mask, again)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_device_branch_eager_matches_its_definition(p):
    """Eager: the mask is exactly (uniform >= dropped / 65536) as 0/1 bytes, for the same draws."""
    dropped = round(p * 65536)
    x = torch.randn(4, 16, 40, 40).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    mask = keep_mask(x, dropped, integer_lanes=False)
    torch.manual_seed(1)
    expected = (torch.rand_like(x, dtype=torch.float32) >= dropped / 65536).to(torch.uint8)
    assert torch.equal(mask, expected)
    _check(mask, x, dropped)
