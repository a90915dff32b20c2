"""Memory layout and the CPU heap: channels_last (NHWC) keeps the numbers, the sub-pixel upsampling
convolution equals the convolution of the upsampled map, and a CPU run keeps freed memory for the next step."""
import sys

import pytest
import torch
from core_utils import ArrayDataset, build, image_batch, stripes, tiny_image_config, tiny_run

from biva_image.model import ImageVAE
from shared.engine import Trainer
from shared.run_dir import write_run_config


def test_channels_last_runs_every_convolution_in_nhwc_and_keeps_the_numbers():
    """set_channels_last (the image model's default) puts every 2-D feature map, the dense latents'
    maps included, in channels_last; the bound and its gradients equal the NCHW model's up to float
    rounding (stated tolerance: 1e-5 relative), and parameters stay contiguous for checkpoints."""
    from shared.distributions import TrainNoise
    from shared.nn import WNConv, set_channels_last

    for kind in ("dense", "conv"):
        torch.manual_seed(0)
        cfg = tiny_image_config("biva", kind=kind, levels=3, depth=2)
        nhwc = ImageVAE(cfg)
        nchw = set_channels_last(ImageVAE(cfg), False)
        nchw.load_state_dict(nhwc.state_dict())
        b = image_batch("bernoulli", n=6)
        layouts = []

        def record(module, inputs):  # what reaches each 2-D convolution, before it converts anything
            x = inputs[0]
            if module.ndim == 2 and x.shape[1] > 1:  # a 1-channel map is both layouts at once
                layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

        grads = []
        for model, expect in ((nhwc, True), (nchw, False)):
            layouts.clear()
            hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, WNConv)]
            torch.manual_seed(3)  # the same latent noise for both
            out = model(b, TrainNoise())
            for h in hooks:
                h.remove()
            # nothing converts between layers: every map arrives in the model's layout
            assert len(layouts) > 5 and all(v == expect for v in layouts), (kind, expect, layouts)
            loss = -out.bound().mean()
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
        for g1, g2 in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
        assert all(p.is_contiguous() for p in nhwc.parameters())


@pytest.mark.parametrize("ndim, kernel, factor, channels_last", [
    (2, 5, 2, True), (2, 5, 2, False), (2, 3, 2, True), (2, 1, 2, False), (2, 7, 3, True), (1, 5, 2, False),
    (1, 3, 4, False)])
def test_upsampling_convolution_is_the_convolution_of_the_upsampled_map(ndim, kernel, factor, channels_last):
    """WNConv(upsample=s) computes at the input's resolution (one convolution with s^ndim times the
    channels, then depth-to-space); it must equal F.interpolate(nearest) followed by the same 'same'
    convolution, in value and in every gradient (float64, 1e-10), at the borders too (odd sizes)."""
    import torch.nn.functional as F

    from shared.nn import WNConv, set_channels_last

    torch.manual_seed(0)
    conv = set_channels_last(WNConv(ndim, 6, 5, kernel, upsample=factor).double(), channels_last)
    assert set(conv.state_dict()) == {"v", "g", "b"}  # checkpoints as any convolution's
    x = torch.randn(3, 6, *([7, 5][:ndim]), dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = conv(x)
    conv_nd = F.conv1d if ndim == 1 else F.conv2d
    ref = conv_nd(F.interpolate(x, scale_factor=factor, mode="nearest"), conv.weight(), conv.b, padding=kernel // 2)
    assert y.shape == ref.shape == (3, 5, *[factor * n for n in [7, 5][:ndim]])
    assert ndim == 1 or y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, conv.v, conv.g, conv.b], g)
    refs = torch.autograd.grad(ref, [x, conv.v, conv.g, conv.b], g)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


HEAP_PROBE = """
import ctypes, sys
import torch
from shared.launch import keep_freed_cpu_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_cpu_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(40 << 20, dtype=torch.uint8)  # 40 MiB: above glibc's largest dynamic mmap threshold
mapped = libc.mallinfo2().hblkhd - before
print(applied, mapped >= 40 << 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_a_cpu_run_serves_large_activations_from_the_heap_unless_opted_out():
    """keep_freed_cpu_memory (called by the Trainer on a CPU) raises glibc's mmap threshold, so a 40 MiB
    activation comes from the heap and its memory is reused by the next step instead of being mapped
    and page-faulted afresh; BIVA_GLIBC_MALLOC=1 keeps glibc's defaults (the block is mmapped)."""
    import ctypes
    import os
    import subprocess
    from pathlib import Path

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    root = str(Path(__file__).resolve().parents[1])
    outcome = {}
    for opt_out in ("0", "1"):
        env = {**os.environ, "BIVA_GLIBC_MALLOC": opt_out, "PYTHONPATH": root}
        p = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        outcome[opt_out] = p.stdout.split()
    assert outcome["0"] == ["True", "False"]  # applied: the block is not a fresh mapping
    assert outcome["1"] == ["False", "True"]  # glibc's defaults: it is


def test_the_trainer_keeps_freed_memory_on_a_cpu(tmp_path, fresh_accelerator_state, monkeypatch):
    from shared import engine

    calls = []
    monkeypatch.setattr(engine, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    cfg = tiny_image_config("biva")
    run = tiny_run(cfg, max_steps=1, eval_every=1, save_every=1)
    out = tmp_path / "run"
    out.mkdir()
    write_run_config(out, run)
    Trainer(run, build(cfg), ArrayDataset(stripes(16)), ArrayDataset(stripes(8, seed=1)), out)
    assert calls == [1]
