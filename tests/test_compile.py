"""--compile changes no number: the torch.compile'd (inductor) training step gives the eager loss and
gradients for a BIVA and an LVAE image step and a biva-lstm text step (tiny models), and the compiled
forward pass gives the eager importance-weighted bound L_K (report_image.py --compile).

Tolerance: rtol 1e-4, atol 1e-5 on the loss and on every gradient (inductor fuses and reorders fp32
arithmetic; measured differences are below 1e-6). The random draws (latent noise, dropout) are made
equal with inductor's ``fallback_random``, which makes compiled code draw from torch's eager RNG.
Compiling takes tens of seconds per model on two cores, hence one case per model kind.
"""
import copy

import pytest
import torch
from core_utils import stripes, tiny_image_config

from biva_image.model import ImageVAE
from shared.distributions import TrainNoise
from shared.objective import training_loss

pytestmark = pytest.mark.slow


def loss_and_grads(model, batch, params_of=None):
    torch.manual_seed(1)
    loss, _ = training_loss(model, batch, TrainNoise(), lam=0.1)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in (params_of or model).named_parameters()}


def assert_compiled_step_equals_eager(model, batch):
    model.train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="inductor")  # what Accelerator(dynamo_backend="inductor") does
    eager_loss, eager_grads = loss_and_grads(model, batch)
    with torch._inductor.config.patch(fallback_random=True):
        compiled_loss, compiled_grads = loss_and_grads(compiled, batch, params_of=twin)
    torch._dynamo.reset()
    assert torch.isfinite(eager_loss)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        assert grad is not None and compiled_grads[name] is not None, name
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["biva", "lvae"])
def test_compiled_image_step_equals_eager(variant):
    torch.manual_seed(0)
    cfg = tiny_image_config(variant, levels=2)
    cfg.ladder.dropout_inference = cfg.ladder.dropout_generative = 0.2  # the dropout path is compiled too
    model = ImageVAE(cfg)
    assert_compiled_step_equals_eager(model, {"index": torch.arange(6), "x": torch.as_tensor(stripes(6))})


def test_compiled_text_step_equals_eager():
    from biva_text.model import build_text_model
    from biva_text.presets import get_preset
    from test_text_model import MAX_TOKENS, V, make_batch

    torch.manual_seed(0)
    model = build_text_model(get_preset("tiny", "biva-lstm", vocab_size=V, max_tokens=MAX_TOKENS).model)
    assert_compiled_step_equals_eager(model, make_batch([4, 13, 2, 7, 9]))


def test_compiled_importance_weighted_bound_equals_eager():
    """report_image.py --compile: L_K through the inductor-compiled forward equals eager L_K (one chunk
    shape, so one compilation; the evaluation noise is hashed, no RNG to align)."""
    from shared.bounds import iw_bound

    torch.manual_seed(0)
    model = ImageVAE(tiny_image_config("biva", levels=2)).eval()
    batch = {"index": torch.arange(3), "x": torch.as_tensor(stripes(3))}
    eager = iw_bound(model, batch, 8, seed=1, chunk_size=4)  # two chunks of 4 samples: the same shape
    try:
        compiled = iw_bound(torch.compile(model, backend="inductor"), batch, 8, seed=1, chunk_size=4)
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_dropout_does_not_break_the_compiled_graph_on_a_cpu():
    """Dropout's CPU mask (64-bit draws cut into lanes: an in-place random_ that dynamo cannot trace)
    reaches the compiler as one opaque operator: the whole training forward is one graph."""
    torch.manual_seed(0)
    cfg = tiny_image_config("biva", levels=2)
    cfg.ladder.dropout_inference = cfg.ladder.dropout_generative = 0.5
    model = ImageVAE(cfg).train()
    batch = {"index": torch.arange(4), "x": torch.as_tensor(stripes(4))}
    try:
        explained = torch._dynamo.explain(model)(batch, TrainNoise())
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("p", [0.5, 0.25, 0.2])
def test_compiled_dropout_draws_the_eager_mask(p):
    """Under torch.compile on a CPU the random lanes are drawn by the same opaque operator and unpacked
    (p = 0.5: bits) or compared (p = 0.25: 8-bit lanes, p = 0.2: 16-bit) inside the graph: the same seed gives the same
    output, element for element, as eager, and the same gradient."""
    from shared.nn import Dropout

    drop = Dropout(p).train()
    x = torch.randn(4, 8, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(3)
    eager = drop(x)
    eager.sum().backward()
    eager_grad, x.grad = x.grad, None
    try:
        torch.manual_seed(3)
        compiled = torch.compile(drop, backend="inductor")(x)
        compiled.sum().backward()
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager) and torch.equal(x.grad, eager_grad)
    assert compiled.is_contiguous(memory_format=torch.channels_last)


def test_compiled_optimizer_step_equals_eager():
    """--compile compiles Adamax's update too (shared.optim.compile_optimizer_step): after three steps
    the parameters and the optimiser's state equal the eager optimiser's (rtol 1e-5)."""
    from shared.optim import compile_optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ELU(), torch.nn.Linear(7, 3))
    twin = copy.deepcopy(model)
    eager_opt = torch.optim.Adamax(model.parameters(), lr=2e-3)
    compiled_opt = compile_optimizer_step(torch.optim.Adamax(twin.parameters(), lr=2e-3))
    x = torch.randn(4, 5)
    try:
        for _ in range(3):
            for m, opt in ((model, eager_opt), (twin, compiled_opt)):
                opt.zero_grad()
                m(x).square().sum().backward()
                opt.step()
    finally:
        torch._dynamo.reset()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        for key in ("exp_avg", "exp_inf"):
            torch.testing.assert_close(compiled_opt.state[b][key], eager_opt.state[a][key], rtol=1e-5, atol=1e-7)


def test_compile_takes_the_optimiser_step_into_the_engine(tmp_path, monkeypatch):
    """Trainer with compile on: the model and the optimiser's step both go through torch.compile (here
    with the 'eager' backend, which runs the traced graphs as they are: inductor's numbers are checked
    above), and the run's figures equal an uncompiled run's."""
    import functools

    from accelerate.state import AcceleratorState
    from core_utils import ArrayDataset, build, tiny_run

    from shared.engine import Trainer
    from shared.metrics_log import read_metrics
    from shared.run_dir import write_run_config

    calls, compile_ = [], functools.partial(torch.compile, backend="eager")

    def traced(fn, **options):
        calls.append(getattr(fn, "__qualname__", type(fn).__name__))
        options.pop("backend", None)
        return compile_(fn, **options)

    cfg = tiny_image_config("biva", levels=2)
    records = {}
    for compiled in (False, True):
        out = tmp_path / f"run{int(compiled)}"
        out.mkdir()
        run = tiny_run(cfg, max_steps=4, eval_every=4, save_every=4, log_every=1, compile=compiled)
        write_run_config(out, run)
        if compiled:
            monkeypatch.setattr(torch, "compile", traced)
        torch.manual_seed(0)
        AcceleratorState._reset_state()  # one process-wide state: its dynamo backend is set once
        try:
            Trainer(run, build(cfg), ArrayDataset(stripes(64)), ArrayDataset(stripes(16, seed=1)), out).fit()
        finally:
            torch._dynamo.reset()
            AcceleratorState._reset_state()
        records[compiled] = [r for r in read_metrics(out) if r.get("split") == "train"]
    assert "Adamax.step" in calls and len(calls) == 2, calls  # the optimiser's step and the model
    assert len(records[True]) == len(records[False]) == 4
    for a, b in zip(records[False], records[True]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.mark.parametrize("setting, device, precision, expected", [
    (True, "cuda", "bf16", True), (False, "cpu", "no", False), ("cpu", "cpu", "no", True),
    ("cpu", "cpu", "bf16", True), ("cpu", "cpu", "fp16", False), ("cpu", "cuda", "no", False),
    ("cpu", "mps", "bf16", False)])
def test_the_compile_setting_resolves_by_device_and_precision(setting, device, precision, expected):
    """TrainConfig.compile "cpu" (the binary preset's default) compiles only where that was measured faster:
    a CPU in fp32 or bf16."""
    from shared.launch import compile_wanted

    assert compile_wanted(setting, device, precision) is expected


def test_a_bad_compile_setting_is_a_user_error():
    from shared.launch import compile_wanted
    from shared.errors import UserError

    with pytest.raises(UserError, match="compile must be true, false or \"cpu\", got 'gpu'"):
        compile_wanted("gpu", "cpu")


def test_only_the_binary_preset_compiles_by_default():
    from biva_image.presets import get_preset, with_labels
    from biva_text.presets import PRESETS as TEXT_PRESETS
    from biva_text.presets import get_preset as get_text_preset

    assert get_preset("binary").train.compile == "cpu"
    assert get_preset("binary", "lvae").train.compile == "cpu"
    assert with_labels(get_preset("binary"), 10).train.compile is False  # semi-supervised: unmeasured
    for name in ("cifar10", "celeba64", "tiny"):
        assert get_preset(name).train.compile is False
    for name in TEXT_PRESETS:
        assert get_text_preset(name).train.compile is False


@pytest.mark.parametrize("flags, expected", [([], None), (["--compile"], True), (["--no-compile"], False)])
def test_compile_flags_override_the_preset(flags, expected):
    import argparse

    from shared.cli import add_training_flags, training_overrides

    p = argparse.ArgumentParser()
    add_training_flags(p, ["binary", "tiny"], "image")
    assert training_overrides(p.parse_args(flags)).get("compile") is expected


@pytest.mark.parametrize("precision, compiled", [("no", True), ("bf16", True), ("fp16", False)])
def test_the_engine_compiles_a_cpu_preset_in_fp32_and_bf16(tmp_path, monkeypatch, precision, compiled):
    """compile "cpu" in the run's config: on this CPU the Trainer compiles the optimiser's step (and hands
    accelerate the inductor backend for the model) in fp32 and bf16, and stays eager under fp16."""
    from accelerate.state import AcceleratorState
    from core_utils import ArrayDataset, build, tiny_run

    from shared.engine import Trainer
    from shared.run_dir import write_run_config

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(type(fn).__name__) or fn)
    cfg = tiny_image_config("biva", levels=2)
    run = tiny_run(cfg, max_steps=1, compile="cpu", mixed_precision=precision)
    write_run_config(tmp_path, run)
    AcceleratorState._reset_state()
    try:
        trainer = Trainer(run, build(cfg), ArrayDataset(stripes(16)), ArrayDataset(stripes(8, seed=1)), tmp_path)
        assert trainer.compiled is compiled
        assert (trainer.accelerator.state.dynamo_plugin.backend.value.lower() == "inductor") is compiled
        assert calls == (["method", "ImageVAE"] if compiled else [])  # the optimiser's bound step, the model
    finally:
        AcceleratorState._reset_state()


def test_compiled_bf16_step_matches_eager_bf16():
    """The binary preset compiles on a CPU under bf16 autocast too: the compiled step's loss and gradients
    match the eager bf16 step's up to bf16 rounding (fused kernels round at other points)."""
    torch.manual_seed(0)
    cfg = tiny_image_config("biva", levels=2)
    cfg.ladder.dropout_inference = cfg.ladder.dropout_generative = 0.2
    model = ImageVAE(cfg).train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="inductor")
    batch = {"index": torch.arange(6), "x": torch.as_tensor(stripes(6))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_loss, eager_grads = loss_and_grads(model, batch)
        with torch._inductor.config.patch(fallback_random=True):
            compiled_loss, compiled_grads = loss_and_grads(compiled, batch, params_of=twin)
    torch._dynamo.reset()
    assert torch.isfinite(eager_loss) and compiled_loss.dtype == eager_loss.dtype == torch.float32
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-2, atol=1e-3)
    flat = lambda grads: torch.cat([grads[n].flatten() for n in sorted(eager_grads)])  # noqa: E731
    a, b = flat(eager_grads), flat(compiled_grads)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (b.norm() / a.norm() - 1).abs() < 0.05


def test_the_cpu_default_falls_back_to_eager_without_a_cpp_compiler(monkeypatch):
    """A preset's default must not fail on a machine where inductor cannot build its CPU code: without a
    C++ compiler "cpu" trains eager and says so; an explicit --compile is left to fail loudly."""
    import torch._inductor.cpp_builder as cpp_builder

    from shared.launch import compile_wanted

    def no_compiler():
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.warns(UserWarning, match="finds no C\\+\\+ compiler"):
        assert compile_wanted("cpu", "cpu", "no") is False
    assert compile_wanted(True, "cpu", "no") is True
