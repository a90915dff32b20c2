"""How the LSTM decoder reads the latents' features (``decoder_input``, ``decoder_init``): the default
is the original concatenation with a zero initial state, every option trains, reads d_0, decodes as it
scores, and round-trips through the config and the state dict."""
from __future__ import annotations

import pytest
import torch
from test_text_model import MAX_TOKENS, V, make_batch, step_by_step_log_px

from biva_text.model import TextModelConfig, build_text_model
from biva_text.presets import get_preset
from shared.config import from_dict, to_dict
from shared.distributions import HashedNoise
from shared.errors import UserError
from shared.free_bits import free_bits_kl

OPTIONS = [("scaled", "zeros"), ("normalised", "zeros"), ("concat", "latents"), ("scaled", "latents"),
           ("normalised", "latents")]


def build(name: str = "biva-lstm", seed: int = 0, **view):
    cfg = get_preset("tiny", name, vocab_size=V, max_tokens=MAX_TOKENS).model
    for key, value in view.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return build_text_model(cfg.validate())


def training_loss(model, batch) -> torch.Tensor:
    out = model(batch, HashedNoise(7, batch["index"]))
    return -out.log_px.mean() + free_bits_kl(out.kl, 0.0)


def test_the_default_is_the_original_decoder():
    """Same parameters (old runs load) and the same loss, seed for seed, as explicit concat + zeros."""
    batch = make_batch([4, 13, 2, 7], seed=1)
    default = build("rnn-vae").train()  # biva-lstm's preset reads d_0 scaled (test_biva_lstm_preset_scales_d0)
    explicit = build("rnn-vae", decoder_input="concat", decoder_init="zeros").train()
    assert (default.cfg.decoder_input, default.cfg.decoder_init) == ("concat", "zeros")
    assert default.state_dict().keys() == explicit.state_dict().keys()
    assert not any("cond_gain" in k or "init_state" in k for k in default.state_dict())
    assert training_loss(default, batch) == training_loss(explicit, batch)
    # ... and another view is a different model on the same weights.
    scaled = build("rnn-vae", decoder_input="scaled").train()
    assert training_loss(scaled, batch) != training_loss(default, batch)


def test_biva_lstm_preset_scales_d0_and_the_baselines_concatenate():
    from biva_text.model import TextModelConfig

    assert TextModelConfig.decoder_input == "concat"  # old config.json files without the field load as they were
    for preset in ("paper", "small", "tiny"):
        views = {m: get_preset(preset, m).model.decoder_input for m in ("biva-lstm", "rnn-vae", "hybrid-vae")}
        assert views == {"biva-lstm": "scaled", "rnn-vae": "concat", "hybrid-vae": "concat"}


@pytest.mark.parametrize("decoder_input,decoder_init", OPTIONS)
def test_each_option_trains_and_reads_the_latents(decoder_input, decoder_init):
    model = build(decoder_input=decoder_input, decoder_init=decoder_init).train()
    batch = make_batch([4, 13, 2, 7], seed=2)
    opt = torch.optim.Adamax(model.parameters(), lr=3e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = training_loss(model, batch)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    new = [n for n, p in model.named_parameters() if n.startswith("decoder.cond_") or n.startswith("decoder.init_")]
    assert new and all(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in new)
    # The decoder's likelihood moves when d_0 is another sentence's (through the input, the initial
    # state or both).
    model.eval()
    tokens, lengths = model.padded_tokens(batch), batch["length"]
    cond = model.condition_posterior(batch, HashedNoise(0, batch["index"]))  # (B, T, C)
    base = model.decoder.log_likelihood(model.io, tokens, lengths, cond)
    moved = model.decoder.log_likelihood(model.io, tokens, lengths, cond.roll(1, dims=0))
    assert (base - moved).abs().min() > 1e-3
    if decoder_init == "latents":  # the initial state alone carries d_0
        h0, c0 = model.decoder.initial_state(cond)
        assert h0.shape == (1, 4, model.cfg.hidden_size) and not torch.allclose(h0, model.decoder.initial_state(cond + 1)[0])


@pytest.mark.parametrize("name", ["biva-lstm", "rnn-vae", "hybrid-vae"])
@pytest.mark.parametrize("decoder_input,decoder_init", [("normalised", "latents"), ("scaled", "zeros")])
def test_step_by_step_decoding_scores_as_training_does(name, decoder_input, decoder_init):
    """Sampling and beam search start from ``initial_decoder_state`` and read cond_t the same way."""
    model = build(name, decoder_input=decoder_input, decoder_init=decoder_init).eval()
    batch = make_batch([5, 9], seed=3)
    log_px = model(batch, HashedNoise(3, batch["index"])).log_px
    cond = model.condition_posterior(batch, HashedNoise(3, batch["index"]))
    torch.testing.assert_close(log_px, step_by_step_log_px(model, batch, cond), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("decoder_input,decoder_init", OPTIONS)
def test_config_and_state_dict_round_trip(decoder_input, decoder_init):
    model = build(decoder_input=decoder_input, decoder_init=decoder_init, decoder_gain=2.5).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the initialisation, so loading is what makes them equal
            p.add_(0.01 * torch.randn_like(p))
    cfg = from_dict(TextModelConfig, to_dict(model.cfg), "config.json model")
    assert (cfg.decoder_input, cfg.decoder_init, cfg.decoder_gain) == (decoder_input, decoder_init, 2.5)
    torch.manual_seed(123)
    copy = build_text_model(cfg).eval()
    copy.load_state_dict(model.state_dict())
    batch = make_batch([6, 3], seed=4)
    torch.testing.assert_close(copy(batch, HashedNoise(1, batch["index"])).log_px,
                               model(batch, HashedNoise(1, batch["index"])).log_px)
    with pytest.raises(RuntimeError):  # a run of another view does not load silently
        build(decoder_input="concat").load_state_dict(model.state_dict())


def test_options_are_refused_where_no_lstm_reads_latents():
    for name in ("lstm-lm", "biva", "hybrid-vae-conv"):
        with pytest.raises(UserError, match="no LSTM"):
            build(name, decoder_init="latents")
    with pytest.raises(UserError, match="decoder_input"):
        build(decoder_input="sum")


def test_bag_of_words_term_changes_gradients_not_values():
    """--bow-weight: the training loss's value and every evaluation figure are the plain ELBO's (same weights
    without the term), but the gradient reaching the ladder differs and the bag-of-words layer learns."""
    batch = make_batch([4, 13, 2, 7], seed=1)
    bow = build(bow_weight=1.0).train()
    plain = build().train()
    missing, unexpected = plain.load_state_dict(bow.state_dict(), strict=False)
    assert not missing and unexpected == ["bow.weight", "bow.bias"]
    a, b = training_loss(bow, batch), training_loss(plain, batch)
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    assert bow.bow.weight.grad is not None and bow.bow.weight.grad.abs().sum() > 0
    ladder = [n for n, _ in plain.named_parameters() if n.startswith("ladder.")]
    grads = dict(bow.named_parameters()), dict(plain.named_parameters())
    assert any(not torch.allclose(grads[0][n].grad, grads[1][n].grad) for n in ladder if grads[1][n].grad is not None)
    with torch.no_grad():  # evaluation: the bound alone
        bow.eval(), plain.eval()
        x, y = bow(batch, HashedNoise(3, batch["index"])), plain(batch, HashedNoise(3, batch["index"]))
        assert torch.equal(x.bound(), y.bound())


def test_bag_of_words_ignores_word_order_and_padding():
    """log p_bow reads d_0 averaged over the sentence: the same words in another order score the same, PAD
    after the length never counts, and the probabilities over the vocabulary sum to one."""
    model = build(bow_weight=0.5).eval()
    torch.manual_seed(0)
    d0 = torch.randn(2, model.cfg.ladder.output_channels, 12)
    tokens = torch.randint(4, V, (2, 12))
    lengths = torch.tensor([5, 9])
    base = model.bag_of_words_log_prob(d0, tokens, lengths)
    shuffled = tokens.clone()
    shuffled[0, :5] = tokens[0, [3, 0, 4, 1, 2]]
    shuffled[1, 9:] = 0  # PAD past the length
    assert torch.allclose(model.bag_of_words_log_prob(d0, shuffled, lengths), base)
    n = 9
    summary = d0[1, :, :n].mean(1, keepdim=True).T
    probs = torch.softmax(model.io.logits(model.bow(summary)).float(), -1)
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    assert torch.allclose(base[1], probs[0, tokens[1, :n]].log().sum(), atol=1e-5)
    with pytest.raises(UserError, match="bow_weight"):
        build("rnn-vae", bow_weight=1.0)


@pytest.mark.parametrize("name,decoder_input", [("biva-lstm", "scaled"), ("biva-lstm", "none"), ("hybrid-vae", "concat")])
def test_attention_decodes_as_it_scores(name, decoder_input):
    """--decoder-attention: step-by-step decoding (each step attending over the whole d_0) gives the
    training likelihood, and the attention's layers are new parameters that learn."""
    model = build(name, decoder_input=decoder_input, decoder_attention=True).eval()
    assert {"decoder.att_query.weight", "decoder.att_out.weight"} <= set(model.state_dict())
    batch = make_batch([5, 9], seed=3)
    log_px = model(batch, HashedNoise(3, batch["index"])).log_px
    cond = model.condition_posterior(batch, HashedNoise(3, batch["index"]))
    torch.testing.assert_close(log_px, step_by_step_log_px(model, batch, cond), rtol=1e-5, atol=1e-4)
    model.train()
    loss = training_loss(model, make_batch([4, 13, 2, 7], seed=1))
    loss.backward()
    assert model.decoder.att_query.weight.grad.abs().sum() > 0 and model.decoder.att_out.weight.grad.abs().sum() > 0


def test_attention_reads_by_content_not_position():
    """With decoder_input none the LSTM sees d_0 only through attention, which has no notion of position: the
    likelihood is the same whatever the order of d_0's positions, and changes with another sentence's d_0.
    With the positional input beside it (scaled), the order matters."""
    batch = make_batch([6, 11, 3], seed=5)
    tokens, lengths = None, batch["length"]
    for decoder_input, order_matters in (("none", False), ("scaled", True)):
        model = build(decoder_input=decoder_input, decoder_attention=True).eval()
        tokens = model.padded_tokens(batch)
        cond = model.condition_posterior(batch, HashedNoise(0, batch["index"]))  # (B, T, C)
        base = model.decoder.log_likelihood(model.io, tokens, lengths, cond)
        shuffled = model.decoder.log_likelihood(model.io, tokens, lengths, cond[:, torch.randperm(cond.shape[1])])
        other = model.decoder.log_likelihood(model.io, tokens, lengths, cond.roll(1, dims=0))
        assert (base - other).abs().min() > 1e-3
        if order_matters:
            assert (base - shuffled).abs().min() > 1e-4
        else:
            torch.testing.assert_close(base, shuffled, rtol=1e-5, atol=1e-4)


def test_attention_round_trips_and_is_refused_where_it_cannot_apply():
    model = build(decoder_attention=True)
    cfg = from_dict(TextModelConfig, to_dict(model.cfg), "config.json model")
    assert cfg.decoder_attention is True
    old = to_dict(build().cfg)
    old.pop("decoder_attention")  # a config.json written before the option: the decoder it had
    assert from_dict(TextModelConfig, old, "config.json model").decoder_attention is False
    with pytest.raises(RuntimeError):  # weights with attention do not load silently into a decoder without
        build().load_state_dict(model.state_dict())
    for name in ("lstm-lm", "biva", "hybrid-vae-conv"):
        with pytest.raises(UserError, match="no LSTM"):
            build(name, decoder_attention=True)
    with pytest.raises(UserError, match="blind"):
        build(decoder_input="none")
