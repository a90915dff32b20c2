"""The Hybrid VAE baseline (Semeniuta et al. 2017; biva_text/hybrid.py): sizes of the paper's Table 7,
bounds, the auxiliary term (training gradient only), and the scripts end to end on the tiny preset."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_text_model import make_batch, make_model
from test_text_scripts import corpus, train  # noqa: F401  (corpus: the module's fixture)
from script_utils import run_main as run_script

from biva_text.model import build_text_model, num_params
from biva_text.presets import get_preset
from shared.bounds import elbo, iw_bound
from shared.distributions import HashedNoise
from shared.free_bits import free_bits_kl

# Parameter counts of the paper preset (20,000 pieces, 40 tokens), ours, pinned exactly; the paper's Table 7
# in brackets: biva-lstm 23.0M, biva 14.0M, lstm-lm 15.0M, rnn-vae 23.7M, hybrid-vae 23.7M (docs/benchmarks.md).
PARAMS = {"biva-lstm": 23_022_417, "biva": 15_740_240, "lstm-lm": 17_084_448, "rnn-vae": 23_580_768,
          "hybrid-vae": 23_482_584, "hybrid-vae-conv": 15_818_936}
HYBRIDS = ("hybrid-vae", "hybrid-vae-conv")


@pytest.mark.parametrize("name", list(PARAMS))
def test_paper_preset_parameter_count_is_pinned(name):
    cfg = get_preset("paper", name, vocab_size=20000, max_tokens=40).model
    with torch.device("meta"):  # counts without allocating 24M floats
        model = build_text_model(cfg)
    assert num_params(model) == PARAMS[name]
    if name in HYBRIDS:
        assert cfg.seq_len == 48 and cfg.kl_schedule == "warmup" and model.autoregressive == (name == "hybrid-vae")


@pytest.mark.parametrize("name", HYBRIDS)
def test_bounds_are_finite_and_importance_sampling_tightens_them(name):
    model = make_model(name)
    batch = make_batch([4, 13, 2, 7, 9, 11], seed=1)
    elbos = torch.stack([elbo(model, batch, seed=s).bound() for s in range(8)])  # (8, B)
    assert torch.isfinite(elbos).all() and (elbos < 0).all()
    iw = iw_bound(model, batch, num_samples=64, seed=0, chunk_size=16)
    assert torch.isfinite(iw).all()
    assert iw.mean() >= elbos.mean() - 0.05  # L_K >= L_1 in expectation
    out = model(batch, HashedNoise(0, batch["index"]))
    assert out.kl.shape == (6, 1) and torch.allclose(out.bound(), elbos[0])


def test_aux_term_enters_the_training_gradient_not_the_bound():
    """J = ELBO + alpha * J_aux: the gradient is that of -ELBO - alpha * J_aux; every value (log p(x|z),
    bound, loss) is the plain bound's, in training and in evaluation."""
    model = make_model("hybrid-vae").train()
    alpha = model.cfg.hybrid.aux_weight
    assert alpha == 0.2
    batch = make_batch([4, 13, 2, 7], seed=2)
    tokens, lengths = model.padded_tokens(batch), batch["length"]

    def loss_and_grads(weight: float, explicit_aux: bool = False):
        model.cfg.hybrid.aux_weight = weight
        model.zero_grad()
        out = model(batch, HashedNoise(0, batch["index"]))
        loss = -out.log_px.mean() + free_bits_kl(out.kl, 0.0)
        target = loss
        if explicit_aux:  # the objective written out: the same features, same noise
            z = model.posterior_sample(batch, HashedNoise(0, batch["index"]))[0][0]
            target = loss - alpha * model.aux_log_prob(model.features(z), tokens, lengths).mean()
        target.backward()
        return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    with_aux, loss_aux, g_aux = loss_and_grads(alpha)
    without, loss_plain, g_plain = loss_and_grads(0.0)
    _, _, g_explicit = loss_and_grads(0.0, explicit_aux=True)
    torch.testing.assert_close(with_aux.bound(), without.bound())
    assert loss_aux == loss_plain
    assert "aux.weight" in g_aux and "aux.weight" not in g_plain  # only the auxiliary term trains it
    assert not torch.allclose(g_aux["from_z.0.weight"], g_plain["from_z.0.weight"])
    for name, grad in g_aux.items():
        torch.testing.assert_close(grad, g_explicit[name], rtol=1e-4, atol=1e-6, msg=name)
    model.eval()
    bound_plain = elbo(model, batch).bound()
    model.cfg.hybrid.aux_weight = alpha
    torch.testing.assert_close(elbo(model, batch).bound(), bound_plain)


def test_conv_variant_predicts_from_the_features_alone():
    """hybrid-vae-conv: no LSTM; its likelihood is the auxiliary softmax over all max_tokens + 1
    positions (padding included), the same logits decoding uses."""
    model = make_model("hybrid-vae-conv")
    assert not hasattr(model, "decoder")
    batch = make_batch([4, 8], seed=3)
    noise = HashedNoise(0, batch["index"])
    out = model(batch, noise)
    cond = model.condition_posterior(batch, HashedNoise(0, batch["index"]))  # (B, T, C), same z
    logp = torch.log_softmax(model.token_logits(cond.transpose(1, 2)), -1)[:, : model.cfg.max_tokens + 1]
    manual = logp.gather(2, batch["tokens"][:, :, None]).squeeze(2).sum(1)
    torch.testing.assert_close(out.log_px, manual, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def hybrid_run(corpus):  # noqa: F811
    return train(corpus, "hybrid", "hybrid-vae", "--max-steps", "6", "--eval-every", "6", "--kl-warmup-steps", "3",
                 "--aux-weight", "0.5", "--decoder-input", "normalised", "--decoder-init", "latents",
                 "--decoder-attention")


def test_training_and_every_text_script_work_on_a_hybrid_run(hybrid_run, tmp_path, capsys):
    config = json.loads((hybrid_run / "config.json").read_text())
    m = config["model"]
    assert m["model"] == "hybrid-vae" and m["hybrid"]["aux_weight"] == 0.5 and m["ladder"] is None
    assert (m["decoder_input"], m["decoder_init"], m["kl_schedule"]) == ("normalised", "latents", "warmup")
    assert m["decoder_attention"] is True  # and every script below decodes through the attention
    code, out, err = run_script("report_text", ["--run", str(hybrid_run), "--iw-samples", "8", "--max-sentences", "16"],
                                capsys)
    assert code == 0, err
    report = json.loads((hybrid_run / "report-test.json").read_text())
    for key in ("num_params", "nll", "nll_elbo", "kl", "ppl", "ppl_elbo", "mutual_info"):
        assert math.isfinite(report[key]), key
    assert [(g["level"], g["kind"]) for g in report["kl_per_group"]] == [(1, "top")]
    assert report["nll"] <= report["nll_elbo"] + 0.5 and "| hybrid-vae |" in out
    code, out, err = run_script("sample_text", ["--run", str(hybrid_run), "--num", "3", "--beam", "2", "--device", "cpu"],
                                capsys)
    assert code == 0, err
    path = tmp_path / "in.txt"
    path.write_text("the big cat sees the dog .\n")
    code, out, err = run_script("reconstruct_text", ["--run", str(hybrid_run), "--input", str(path), "--device", "cpu"],
                                capsys)
    assert code == 0 and out.count("< ") == 1, err


def test_conv_variant_trains_and_bad_hybrid_flags_fail(corpus, capsys):  # noqa: F811
    run = train(corpus, "hybrid-conv", "hybrid-vae-conv", "--max-steps", "3", "--eval-every", "3")
    assert json.loads((run / "config.json").read_text())["model"]["model"] == "hybrid-vae-conv"
    for argv, message in ((["--model", "hybrid-vae-conv", "--aux-weight", "0.1"], "--aux-weight"),
                          (["--model", "hybrid-vae-conv", "--word-dropout", "0.2"], "no autoregression"),
                          (["--model", "hybrid-vae-conv", "--decoder-input", "scaled"], "no LSTM"),
                          (["--model", "rnn-vae", "--bow-weight", "1"], "--bow-weight"),
                          (["--model", "lstm-lm", "--decoder-attention"], "no LSTM"),
                          (["--decoder-input", "none"], "blind"),
                          (["--decoder-input", "none", "--decoder-attention", "--decoder-gain", "2"], "--decoder-gain")):
        code, _, err = run_script("train_text", argv, capsys)
        assert code == 2 and message in err, (argv, err)
