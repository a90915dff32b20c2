"""bf16 autocast: log-densities stay fp32 and the ELBO within 1% of fp32's, a bf16 run trains through the
engine on a CPU, and a CPU without bf16 kernels warns."""
import pytest
import torch
from core_utils import ArrayDataset, build, image_batch, stripes, tiny_image_config, tiny_run

from biva_image.model import ImageVAE
from shared.bounds import elbo
from shared.engine import Trainer
from shared.metrics_log import read_metrics
from shared.run_dir import write_run_config


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


def test_bf16_on_a_cpu_without_bf16_kernels_warns_and_nowhere_else(monkeypatch):
    from shared import launch

    monkeypatch.setattr(launch, "native_cpu_bf16", lambda: False)
    line = launch.cpu_bf16_warning("cpu", "bf16")
    assert line.startswith("warning: --mixed-precision bf16") and "\n" not in line
    assert launch.cpu_bf16_warning("cpu", "no") is None
    assert launch.cpu_bf16_warning("cuda", "bf16") is None
    monkeypatch.setattr(launch, "native_cpu_bf16", lambda: True)
    assert launch.cpu_bf16_warning("cpu", "bf16") is None


def test_bf16_run_trains_and_validates_on_the_cpu(tmp_path, fresh_accelerator_state, capsys):
    from shared.launch import native_cpu_bf16

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
