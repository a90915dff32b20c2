"""The engine: every variant learns, a resumed run equals an uninterrupted one, an exported run
rebuilds the same model, and bad runs are refused without touching existing files."""
import json

import pytest
import torch
from core_utils import ArrayDataset, build, stripes, tiny_image_config, tiny_run

from biva_image.model import ImageModelConfig, ImageVAE
from shared.bounds import elbo
from shared.config import RunConfig, from_dict
from shared.engine import Trainer
from shared.errors import UserError
from shared.ladder import LadderConfig
from shared.checkpoints import latest_checkpoint
from shared.metrics_log import read_metrics
from shared.run_dir import check_output_dir, load_weights, read_run_config, write_run_config

TRAIN, VALID = stripes(256, seed=0), stripes(64, seed=1)


def train(out, model_cfg, resume=False, **kw):
    run = tiny_run(model_cfg, **kw)
    check_output_dir(out, resume)
    if not resume:
        out.mkdir(parents=True)
        write_run_config(out, run)
    trainer = Trainer(run, build(model_cfg), ArrayDataset(TRAIN), ArrayDataset(VALID), out, resume=resume)
    summary = trainer.fit()
    return trainer, summary


@pytest.mark.parametrize("variant,groups", [("biva", 5), ("lvae+", 3), ("lvae", 3)])
def test_every_variant_learns(tmp_path, variant, groups):
    cfg = tiny_image_config(variant)
    trainer, summary = train(tmp_path / "run", cfg, max_steps=120, eval_every=40, save_every=120, free_bits=0.1)
    valid = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "valid"]
    train_records = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "train"]
    assert len(valid) == 3
    # From about 44 nats per 8x8 image at the start to well below 35 (the data hold ~10 bits of structure).
    assert train_records[0]["elbo"] < -40 and valid[-1]["elbo"] > -35
    assert valid[-1]["elbo"] > valid[0]["elbo"]
    assert all(len(r["kl_per_group"]) == groups for r in train_records + valid)
    assert len(trainer.raw_model.group_info) == groups


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path):
    cfg = tiny_image_config("biva")
    kw = dict(eval_every=20, save_every=20, free_bits=0.5, free_bits_patience=1, log_every=10)
    full, _ = train(tmp_path / "full", cfg, max_steps=40, **kw)
    train(tmp_path / "part", cfg, max_steps=20, **kw)
    resumed, _ = train(tmp_path / "part", cfg, resume=True, max_steps=40, **kw)
    assert resumed.resumed_from == 20
    a, b = params(full.raw_model), params(resumed.raw_model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ea, eb = params(full.ema.model), params(resumed.ema.model)
    assert all(torch.allclose(ea[k], eb[k], atol=1e-6) for k in ea)
    assert full.free_bits.state_dict() == pytest.approx(resumed.free_bits.state_dict())
    ma = [r for r in read_metrics(tmp_path / "full") if r.get("split") == "valid"]
    mb = [r for r in read_metrics(tmp_path / "part") if r.get("split") == "valid"]
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert ma[-1]["elbo"] == pytest.approx(mb[-1]["elbo"], abs=1e-4)


def test_exported_run_rebuilds_the_same_model(tmp_path):
    cfg = tiny_image_config("lvae+", likelihood="logistic-mixture", channels=1)
    trainer, _ = train(tmp_path / "run", cfg, max_steps=10, eval_every=10, save_every=10)
    run = read_run_config(tmp_path / "run", "image")
    rebuilt = load_weights(tmp_path / "run", ImageVAE(from_dict(ImageModelConfig, run.model))).eval()
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    b = {"index": torch.arange(4), "x": x}
    assert torch.equal(elbo(rebuilt, b, seed=9).bound(), elbo(trainer.ema.model, b, seed=9).bound())
    assert latest_checkpoint(tmp_path / "run")[0] == 10


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_runs_are_refused_and_touch_nothing(tmp_path):
    cfg = tiny_image_config("biva")
    train(tmp_path / "run", cfg, max_steps=5, eval_every=5, save_every=5)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="already holds a run"):
        check_output_dir(tmp_path / "run", resume=False)
    with pytest.raises(UserError, match="does not exist"):
        check_output_dir(tmp_path / "missing", resume=True)
    with pytest.raises(UserError, match="is not a run directory|does not exist"):
        read_run_config(tmp_path / "missing")
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(tmp_path / "afile" / "run", resume=False)
    other = tiny_image_config("lvae")
    with pytest.raises(UserError, match="different model"):
        train(tmp_path / "run", other, resume=True, max_steps=10)
    with pytest.raises(UserError, match="not a text run"):
        read_run_config(tmp_path / "run", "text")
    assert snapshot(tmp_path) == before


def test_config_errors_are_user_errors():
    data = json.loads(json.dumps(tiny_run(tiny_image_config()).to_json()))
    data["train"]["learning_rate"] = 1.0
    with pytest.raises(UserError, match="unknown key.*learning_rate"):
        RunConfig.from_json(data)
    with pytest.raises(UserError, match="does not fit the strides"):
        LadderConfig(input_size=[30, 30], strides=[2, 1, 2]).validate()
    with pytest.raises(UserError, match="entries but levels"):
        LadderConfig(levels=4).validate()


def test_the_ema_builds_its_tensor_lists_once_and_updates_as_before():
    """EMA.update reads the source's fp32 parameters without a detach each step; the average is bit for bit
    the lerp of the detached values, and the lists follow a new source model."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from shared.ema import EMA

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    ema = EMA(model, 0.9)
    expected = [p.detach().clone() for p in ema.model.parameters()]
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.9, (1.0 + step) / (10.0 + step))
        expected = [torch.lerp(e, p.detach(), 1.0 - decay) for e, p in zip(expected, model.parameters())]
        with Count() as count:
            ema.update(model, step)
        assert not [op for op in count.ops if "detach" in op]  # no per-parameter work beyond the fused lerp
        for e, p in zip(expected, ema.model.parameters()):
            assert torch.equal(e, p)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    ema.update(other, 100)  # a new source: its own tensors are read
    assert torch.allclose(next(ema.model.parameters()),
                          torch.lerp(expected[0], next(other.parameters()).detach(), 1.0 - 0.9))
