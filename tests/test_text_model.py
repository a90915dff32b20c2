"""Text models (docs/design.md §7): forward passes, masking of padding, decoder consistency, KL warm-up.

Tokens are random ids over a tiny vocabulary; every model is the ``tiny`` preset (seconds on a CPU).
"""
from __future__ import annotations

import math

import pytest
import torch

from biva_text.model import build_text_model, padded_length
from biva_text.names import TEXT_MODELS
from biva_text.presets import get_preset
from biva_text.tokenizer import BOS_ID, EOS_ID, PAD_ID
from shared.bounds import elbo, iw_bound
from shared.distributions import HashedNoise, TrainNoise
from shared.free_bits import free_bits_kl

V, MAX_TOKENS = 30, 12



def make_model(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = get_preset("tiny", name, vocab_size=V, max_tokens=MAX_TOKENS, **kw).model
    return build_text_model(cfg).eval()


def make_batch(lengths: list[int], seed: int = 0, width: int = MAX_TOKENS + 1, index=None) -> dict:
    """Store rows: pieces (ids >= 4), EOS, then PAD; ``lengths`` count the EOS."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, : n - 1] = torch.randint(4, V, (n - 1,), generator=g)
        tokens[i, n - 1] = EOS_ID
    index = torch.arange(len(lengths)) if index is None else torch.as_tensor(index)
    return {"index": index, "tokens": tokens, "length": torch.tensor(lengths)}


def select(batch: dict, rows: list[int]) -> dict:
    return {k: v[rows] for k, v in batch.items()}


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_forward_shapes_loss_and_gradients(name):
    model = make_model(name).train()
    batch = make_batch([4, 13, 2, 7, 9])
    out = model(batch, TrainNoise())
    G = model.num_groups
    assert G == {"biva-lstm": 5, "biva": 5, "lstm-lm": 0, "rnn-vae": 1, "hybrid-vae": 1,
                 "hybrid-vae-conv": 1}[name]  # tiny ladder: L = 3 -> 2L-1
    assert out.log_px.shape == (5,) and out.log_q.shape == (5, G) and out.log_p.shape == (5, G)
    assert torch.isfinite(out.bound()).all() and (out.log_px < 0).all()
    assert model.data_size(batch).tolist() == [4.0, 13.0, 2.0, 7.0, 9.0]
    loss = -out.log_px.mean() + (free_bits_kl(out.kl, 0.0) if G else 0.0)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    assert grads["io.embedding.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_padding_does_not_change_a_sentence_bound(name):
    """The same sentence scores the same alone, batched with a longer one, or padded wider."""
    model = make_model(name)
    batch = make_batch([3, 13, 6], seed=1)
    together = elbo(model, batch, seed=5).bound()
    alone = torch.cat([elbo(model, select(batch, [i]), seed=5).bound() for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    # Short sentences on their own, where the batch is much shorter than the store width.
    short = select(batch, [0, 2])
    short_cut = dict(short, tokens=short["tokens"][:, :6])
    torch.testing.assert_close(elbo(model, short, seed=5).bound(), elbo(model, short_cut, seed=5).bound(),
                               rtol=1e-5, atol=1e-4)
    wide = dict(batch, tokens=torch.nn.functional.pad(batch["tokens"], (0, 9), value=PAD_ID))
    torch.testing.assert_close(elbo(model, wide, seed=5).bound(), together, rtol=1e-5, atol=1e-4)
    # ... and the bound does see the words: change one and it moves.
    changed = dict(batch, tokens=batch["tokens"].clone())
    changed["tokens"][1, 4] = 4 + (int(changed["tokens"][1, 4]) - 3) % (V - 4)
    assert not torch.allclose(elbo(model, changed, seed=5).bound()[1], together[1])


@pytest.mark.parametrize("name", ["lstm-lm", "rnn-vae", "biva-lstm"])
def test_teacher_forcing_equals_step_by_step_decoding(name):
    """log p(x | z) of the training path equals the sum of the decoder's per-step log-probabilities,
    counting EOS and nothing after it (what sampling and beam search rely on)."""
    model = make_model(name)
    batch = make_batch([5, 9], seed=2)
    noise = HashedNoise(3, batch["index"])
    log_px = model(batch, noise).log_px
    cond = model.condition_posterior(batch, HashedNoise(3, batch["index"]))
    torch.testing.assert_close(log_px, step_by_step_log_px(model, batch, cond), rtol=1e-5, atol=1e-4)


def step_by_step_log_px(model, batch: dict, cond) -> torch.Tensor:
    """Σ_t log p(token_t | tokens_<t, cond) (B,) from ``decode_step`` one token at a time, from the
    decoder's initial state, counting EOS and nothing after it."""
    B = batch["length"].shape[0]
    state, total = model.initial_decoder_state(cond), torch.zeros(B)
    prev = torch.full((B,), BOS_ID)
    for t in range(int(batch["length"].max())):
        logits, state = model.decode_step(prev, state, cond, t)
        lp = torch.log_softmax(logits, -1).gather(1, batch["tokens"][:, t:t + 1]).squeeze(1)
        total += torch.where(t < batch["length"], lp, torch.zeros_like(lp))
        prev = batch["tokens"][:, t]
    return total


def test_non_autoregressive_biva_scores_the_padding():
    """Its likelihood is over fixed-length sequences of max_tokens + 1 positions: changing a PAD
    after EOS changes it, and it equals the per-position sum of log-probabilities."""
    model = make_model("biva")
    batch = make_batch([4, 8], seed=3)
    noise = HashedNoise(0, batch["index"])
    out = model(batch, noise)
    d0 = model.ladder(model.embed(batch, noise)[0], noise).d0
    logp = torch.log_softmax(model.token_logits(d0), -1)[:, : MAX_TOKENS + 1]
    manual = logp.gather(2, batch["tokens"][:, :, None]).squeeze(2).sum(1)
    torch.testing.assert_close(out.log_px, manual, rtol=1e-5, atol=1e-4)
    assert logp.shape[1] == MAX_TOKENS + 1 > int(batch["length"].max())


def test_padded_length_fits_the_strides():
    assert padded_length(40, [2, 1, 1, 2, 1, 1, 2]) == 48
    assert padded_length(40, [1, 1]) == 41
    cfg = get_preset("paper", "biva-lstm").model
    assert cfg.seq_len == 48 and cfg.ladder.levels == 7 and cfg.ladder.channels == [128] * 7
    train = get_preset("paper", "biva-lstm").train
    assert (train.batch_size, train.lr, train.epochs, train.free_bits_budget) == (512, 2e-3, 5, 30.0)
    assert get_preset("paper", "rnn-vae").train.free_bits_budget == 0.0  # warm-up instead
    assert get_preset("paper", "rnn-vae", kl_schedule="free-bits").model.kl_warmup_steps == 0


def test_kl_warmup_scales_the_kl_gradient_not_the_value():
    model = make_model("rnn-vae").train()
    batch = make_batch([5, 9, 3], seed=4)

    def run(weight):
        model.zero_grad()
        model.set_kl_weight(weight)
        torch.manual_seed(0)
        out = model(batch, TrainNoise())
        (-out.log_px.mean() + out.kl.mean(0).sum()).backward()
        return out.bound().detach(), model.q_head.weight.grad.clone()

    bound_0, grad_0 = run(0.0)
    bound_1, grad_1 = run(1.0)
    bound_h, grad_h = run(0.5)
    torch.testing.assert_close(bound_0, bound_1)  # the reported ELBO never changes
    # The gradient is linear in the weight: grad(w) = grad_rec + w * grad_kl.
    torch.testing.assert_close(grad_h, 0.5 * (grad_0 + grad_1), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grad_0, grad_1)


def test_evaluation_is_reproducible_and_importance_weighting_tightens():
    model = make_model("rnn-vae", seed=1)
    batch = make_batch([6, 10, 4, 12], seed=5)
    l1 = elbo(model, batch, seed=0).bound()
    torch.testing.assert_close(l1, elbo(model, batch, seed=0).bound())
    assert not torch.allclose(l1, elbo(model, batch, seed=1).bound())
    many = torch.stack([elbo(model, batch, seed=s).bound() for s in range(40)]).mean(0)
    lk = iw_bound(model, batch, num_samples=64, seed=0, chunk_size=16)
    assert (lk > many).all()
    lm = make_model("lstm-lm")
    torch.testing.assert_close(iw_bound(lm, batch, 5, seed=0), elbo(lm, batch).bound())  # exact likelihood


def test_fixed_latents_reproduce_the_posterior_density():
    """Scoring a posterior sample under the same sentence's posterior gives back its log q; under
    another sentence's it differs (the aggregate-posterior term of the mutual information)."""
    model = make_model("biva-lstm")
    batch = make_batch([5, 11], seed=6)
    latents, log_q = model.posterior_sample(batch, HashedNoise(0, batch["index"]))
    assert len(latents) == model.num_groups and all(z is not None for z in latents)
    torch.testing.assert_close(model.posterior_log_density(batch, latents), log_q, rtol=1e-5, atol=1e-3)
    swapped = select(batch, [1, 0])
    assert not torch.allclose(model.posterior_log_density(swapped, latents), log_q)
    # Decoding given latents equals the posterior pass that drew them.
    cond = model.condition_latents(latents)
    torch.testing.assert_close(cond, model.condition_posterior(batch, HashedNoise(0, batch["index"])))


def test_sentence_longer_than_the_model_is_refused():
    from shared.errors import UserError

    model = make_model("biva-lstm")
    T = model.cfg.seq_len
    batch = make_batch([T + 2], width=T + 2)
    with pytest.raises(UserError, match="at most"):
        elbo(model, batch)
    assert math.isfinite(float(elbo(make_model("lstm-lm"), make_batch([5])).bound()))


# ---------------------------------------------------------------------------------------------
# Decoding


def test_nucleus_and_inverse_cdf_sampling():
    from biva_text.decode import DecodeOptions, draw_tokens, nucleus_logits

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(nucleus_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(nucleus_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    n = 20000
    noise = HashedNoise(0, torch.arange(n))
    drawn = draw_tokens(logits.expand(n, 4), DecodeOptions(), noise, key=7)
    freq = torch.bincount(drawn, minlength=4).float() / n
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    hot = draw_tokens(logits.expand(n, 4), DecodeOptions(temperature=0.5), noise, key=7)
    sharp = probs[0] ** 2 / (probs[0] ** 2).sum()
    torch.testing.assert_close(torch.bincount(hot, minlength=4).float() / n, sharp, atol=0.015, rtol=0)


@torch.no_grad()
def _sequence_log_prob(model, rows: list[list[int]]) -> torch.Tensor:
    """Σ_t log p(token_t | tokens_<t) of each row, up to and including its EOS."""
    scores = []
    for row in rows:
        state, prev, total = None, torch.tensor([BOS_ID]), 0.0
        for t, tok in enumerate(row):
            logits, state = model.decode_step(prev, state, None, t)
            total += float(torch.log_softmax(logits, -1)[0, tok])
            if tok == EOS_ID:
                break
            prev = torch.tensor([tok])
        scores.append(total)
    return torch.tensor(scores)


@pytest.mark.parametrize("seed", [0, 2])  # 0: greedy misses the mode; 2: the mode is the empty sentence
def test_beam_search_is_exact_when_wide_enough_and_greedy_is_the_argmax_path(seed):
    """On a 2-piece language model, a beam as wide as the hypothesis space finds the most likely
    sentence found by enumerating all of them; greedy follows the argmax at each step."""
    import itertools

    from biva_text.decode import DecodeOptions, generate

    torch.manual_seed(seed)
    cfg = get_preset("tiny", "lstm-lm", vocab_size=8, max_tokens=2).model
    model = build_text_model(cfg).eval()
    with torch.no_grad():
        model.io.out_bias.copy_(2 * torch.randn(8))  # a peaked, uneven distribution
    words = [1] + list(range(4, 8))  # UNK and the pieces: everything but PAD, BOS, EOS
    candidates = [[EOS_ID]] + [[w, EOS_ID] for w in words] + [[a, b, EOS_ID] for a, b in itertools.product(words, words)]
    candidates += [[a, b, c] for a, b, c in itertools.product(words, words, words)]  # cut at the limit
    best = candidates[int(_sequence_log_prob(model, candidates).argmax())]
    beam = generate(model, None, torch.arange(1), DecodeOptions(method="beam", beam=64))[0].tolist()
    assert [t for t in beam if t != PAD_ID] == best
    greedy = generate(model, None, torch.arange(1), DecodeOptions(method="greedy"))[0].tolist()
    state, prev = None, torch.tensor([BOS_ID])
    for t, tok in enumerate(greedy):
        if tok == PAD_ID:
            break
        logits, state = model.decode_step(prev, state, None, t)
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")
        assert tok == int(logits.argmax())
        prev = torch.tensor([tok])


def test_non_autoregressive_decoding_cuts_at_eos():
    from biva_text.decode import DecodeOptions, sample_prior

    model = make_model("biva")
    for method in ("sample", "greedy"):
        tokens = sample_prior(model, 6, DecodeOptions(method=method))
        assert tokens.shape == (6, MAX_TOKENS + 1)
        for row in tokens.tolist():
            if EOS_ID in row:
                assert all(t == PAD_ID for t in row[row.index(EOS_ID) + 1:])
            assert BOS_ID not in row


def test_packed_lstm_weights_survive_a_safetensors_checkpoint():
    """On a GPU cuDNN packs each LSTM's weights into one buffer; Accelerate's safetensors saving
    drops every tensor that shares storage with another. Simulate the packing on the CPU."""
    from accelerate.utils.other import clean_state_dict_for_safetensors

    model = make_model("rnn-vae")
    for lstm in (model.encoder, model.decoder.lstm):
        params = list(lstm.parameters())
        flat = torch.cat([p.detach().flatten() for p in params])
        offset = 0
        for p in params:
            p.data = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    state = model.state_dict()
    cleaned = clean_state_dict_for_safetensors(dict(state))
    assert set(cleaned) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(cleaned[key], value)


@pytest.mark.parametrize("name", ["biva-lstm", "rnn-vae"])
def test_bf16_autocast_on_cpu_runs_the_lstm_in_fp32(name):
    model = make_model(name)
    batch = make_batch([5, 13, 3], seed=7)
    full = elbo(model, batch).bound()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = elbo(model, batch).bound()
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.5)


def test_word_dropout_acts_in_training_only():
    torch.manual_seed(0)
    cfg = get_preset("tiny", "rnn-vae", vocab_size=V, max_tokens=MAX_TOKENS).model
    cfg.word_dropout = 0.5
    model = build_text_model(cfg)
    batch = make_batch([6, 13, 9], seed=8)
    model.eval()
    evaluated = elbo(model, batch).bound()
    assert torch.equal(evaluated, elbo(model, batch).bound())
    model.train()
    with torch.no_grad():
        trained = model(batch, HashedNoise(0, batch["index"])).bound()
    assert not torch.allclose(trained, evaluated)  # some inputs were replaced by UNK
    cfg.word_dropout = 1.0
    with pytest.raises(Exception, match="word_dropout"):
        cfg.validate()
