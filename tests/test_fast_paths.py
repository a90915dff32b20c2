"""The speed paths keep the numbers: the fast dropout has nn.Dropout's distribution, bf16 autocast on
the CPU keeps log-densities in fp32 and the ELBO within 1% of fp32's, a bf16 run trains through the
engine, and L_K with its chunk size chosen from memory equals the fixed-chunk bound."""
import sys

import pytest
import torch
from core_utils import ArrayDataset, build, stripes, tiny_image_config, tiny_run

from biva_image.model import ImageVAE
from shared.bounds import auto_iw_chunk, elbo, iw_bound
from shared.engine import Trainer
from shared.evaluate import evaluate
from shared.nn import Dropout, keep_mask
from shared.run_dir import read_metrics, write_run_config


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


def image_batch(likelihood, n=8):
    x = torch.as_tensor(stripes(n)) if likelihood == "bernoulli" else \
        torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return {"index": torch.arange(n), "x": x}


@pytest.mark.parametrize("variant,likelihood", [("biva", "bernoulli"), ("lvae", "logistic-mixture")])
def test_bf16_autocast_keeps_log_densities_fp32(variant, likelihood):
    torch.manual_seed(0)
    model = ImageVAE(tiny_image_config(variant, likelihood=likelihood)).eval()
    b = image_batch(likelihood)
    full = elbo(model, b, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = elbo(model, b, seed=1)
    for name in ("log_px", "log_q", "log_p"):
        assert getattr(half, name).dtype == torch.float32, name
    assert not torch.equal(half.bound(), full.bound())  # autocast did run the convolutions in bf16
    # Stated tolerance: 1% of the bound per example (measured: under 1e-4 on these tiny models).
    torch.testing.assert_close(half.bound(), full.bound(), rtol=1e-2, atol=0.0)


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state whose precision cannot change: set bf16 for one test only."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_on_a_cpu_without_bf16_kernels_warns_and_nowhere_else(monkeypatch):
    from shared import engine

    monkeypatch.setattr(engine, "native_cpu_bf16", lambda: False)
    line = engine.cpu_bf16_warning("cpu", "bf16")
    assert line.startswith("warning: --mixed-precision bf16") and "\n" not in line
    assert engine.cpu_bf16_warning("cpu", "no") is None
    assert engine.cpu_bf16_warning("cuda", "bf16") is None
    monkeypatch.setattr(engine, "native_cpu_bf16", lambda: True)
    assert engine.cpu_bf16_warning("cpu", "bf16") is None


def test_bf16_run_trains_and_validates_on_the_cpu(tmp_path, fresh_accelerator_state, capsys):
    from shared.engine import native_cpu_bf16

    cfg = tiny_image_config("biva")
    run = tiny_run(cfg, max_steps=40, eval_every=20, save_every=40, free_bits=0.1, mixed_precision="bf16")
    out = tmp_path / "run"
    out.mkdir()
    write_run_config(out, run)
    trainer = Trainer(run, build(cfg), ArrayDataset(stripes(128)), ArrayDataset(stripes(32, seed=1)), out)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert ("without bf16 kernels" in capsys.readouterr().err) == (not native_cpu_bf16())
    trainer.fit()
    records = read_metrics(out)
    train_records = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    assert len(valid) == 2 and all(torch.isfinite(torch.tensor(r["elbo"])) for r in valid)
    assert train_records[-1]["elbo"] > train_records[0]["elbo"]  # it learns in bf16 too
    assert not any(r.get("event") == "skipped_update" for r in records)


def test_iw_chunk_from_memory_gives_the_same_bound():
    torch.manual_seed(0)
    model = ImageVAE(tiny_image_config("biva")).eval()
    b = image_batch("bernoulli", n=5)
    chunk = auto_iw_chunk(model, b, 40)
    assert 1 <= chunk <= 40
    fixed = iw_bound(model, b, 40, seed=2, chunk_size=7)
    torch.testing.assert_close(iw_bound(model, b, 40, seed=2, chunk_size=None), fixed, rtol=0, atol=1e-5)
    data = ArrayDataset(stripes(10))
    auto = evaluate(model, data, batch_size=4, seed=2, iw_samples=12, iw_chunk=None)
    one = evaluate(model, data, batch_size=4, seed=2, iw_samples=12, iw_chunk=1)
    assert auto.iw == pytest.approx(one.iw, abs=1e-5)


HEAP_PROBE = """
import ctypes, sys
import torch
from shared.engine import keep_freed_cpu_memory

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
