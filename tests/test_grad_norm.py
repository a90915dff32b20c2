"""shared.optim.grad_norm: the skip guard's gradient norm, clipping only when --grad-clip asks for it."""
from __future__ import annotations

import math

import pytest
import torch

from shared.optim import grad_norm


def _params_with_grads(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g)),
              torch.nn.Parameter(torch.randn(2))]
    for p in params[:2]:
        p.grad = torch.randn(p.shape, generator=g) * 10
    return params  # the last one has no gradient


def _by_hand(params) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))


def test_without_max_norm_the_norm_is_read_and_no_gradient_is_touched(monkeypatch):
    params = _params_with_grads()
    before = [p.grad.clone() for p in params[:2]]
    ids = [p.grad.data_ptr() for p in params[:2]]

    def refuse(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called without a max_norm")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", refuse)
    norm = grad_norm(params)
    assert float(norm) == pytest.approx(_by_hand(params), rel=1e-6)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert [p.grad.data_ptr() for p in params[:2]] == ids
    assert params[2].grad is None


def test_max_norm_clips_and_returns_the_norm_before_clipping():
    params = _params_with_grads()
    total = _by_hand(params)
    norm = grad_norm(params, max_norm=0.5)
    assert float(norm) == pytest.approx(total, rel=1e-6)
    assert _by_hand(params) == pytest.approx(0.5, rel=1e-4)


def test_non_finite_gradients_give_a_non_finite_norm():
    params = _params_with_grads()
    params[0].grad[1, 2] = float("nan")
    assert not math.isfinite(float(grad_norm(params)))


def test_accelerator_clips_only_when_asked(monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    try:
        acc = Accelerator(cpu=True)
        calls = []
        real = acc.clip_grad_norm_
        monkeypatch.setattr(acc, "clip_grad_norm_", lambda ps, m, **kw: calls.append(m) or real(ps, m, **kw))
        params = _params_with_grads()
        total = _by_hand(params)
        assert float(grad_norm(params, None, acc)) == pytest.approx(total, rel=1e-6)
        assert calls == []
        assert float(grad_norm(params, 0.25, acc)) == pytest.approx(total, rel=1e-6)
        assert calls == [0.25]
        assert _by_hand(params) == pytest.approx(0.25, rel=1e-4)
    finally:
        AcceleratorState._reset_state()


@pytest.mark.parametrize("clip", [None, 0.01])
def test_trainer_clips_with_grad_clip_only(tmp_path, monkeypatch, clip):
    """The engine's step: --grad-clip reaches accelerate's clip_grad_norm_; without it nothing clips, and
    the logged grad_norm is the gradients' norm either way."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from core_utils import ArrayDataset, build, stripes, tiny_image_config, tiny_run

    from shared.engine import Trainer
    from shared.metrics_log import read_metrics
    from shared.run_dir import write_run_config

    calls = []
    real = Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, norm_type=2):
        calls.append(max_norm)
        return real(self, parameters, max_norm, norm_type)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)
    cfg = tiny_image_config("biva", levels=2)
    run = tiny_run(cfg, max_steps=3, eval_every=3, save_every=3, log_every=1, grad_clip=clip)
    write_run_config(tmp_path, run)
    torch.manual_seed(0)
    AcceleratorState._reset_state()
    try:
        Trainer(run, build(cfg), ArrayDataset(stripes(48)), ArrayDataset(stripes(16, seed=1)), tmp_path).fit()
    finally:
        AcceleratorState._reset_state()
    assert calls == ([] if clip is None else [clip] * 3)
    norms = [r["grad_norm"] for r in read_metrics(tmp_path) if r.get("split") == "train"]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)
