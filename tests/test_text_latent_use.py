"""The report's evidence that latents carry the sentence: reconstruction gain and unigram overlap."""
from __future__ import annotations

import pytest
import torch

from biva_text.report import reconstruction_stats, unigram_overlap
from biva_text.tokenizer import BOS_ID, EOS_ID
from test_text_model import make_batch, make_model


class Sentences(torch.utils.data.Dataset):
    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self):
        return self.batch["index"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_unigram_overlap_is_clipped_precision():
    assert unigram_overlap([5, 5, 6, 7], [5, 6, 8]) == pytest.approx(2 / 4)  # the second 5 is not matched
    assert unigram_overlap([5, 6], [6, 5, 5]) == 1.0
    assert unigram_overlap([], [5]) == 0.0
    assert unigram_overlap([9], [5]) == 0.0


def _silence_latents(model) -> None:
    """Zero the LSTM's input weights of the conditioning channels: the decoder no longer reads z."""
    lstm = model.decoder.lstm
    with torch.no_grad():
        lstm.weight_ih_l0[:, model.cfg.embedding_dim:] = 0.0


@pytest.mark.parametrize("name", ["biva-lstm", "rnn-vae"])
def test_gain_is_zero_when_the_decoder_ignores_z_and_not_otherwise(name):
    torch.manual_seed(0)
    data = Sentences(make_batch([3, 5, 9, 2, 7, 4, 6, 8], seed=1))
    model = make_model(name)
    with torch.no_grad():  # a decoder that reads z strongly (the tiny preset starts near the prior)
        model.decoder.lstm.weight_ih_l0[:, model.cfg.embedding_dim:] *= 50.0
    stats = reconstruction_stats(model, data, progress=False, others=3)
    assert abs(stats["reconstruction_gain"]) > 1e-3
    u = stats["unigram_overlap"]
    assert u["sentences"] == 8 and 0.0 <= u["other"] <= 1.0 and 0.0 <= u["own"] <= 1.0
    _silence_latents(model)
    silent = reconstruction_stats(model, data, progress=False, others=3)
    assert silent["reconstruction_gain"] == pytest.approx(0.0, abs=1e-4)


def test_overlap_counts_the_reconstruction_against_its_own_input():
    """A model whose greedy reconstruction is its input scores own = 1 and other < 1."""
    batch = make_batch([3, 5, 9, 2, 7, 4], seed=2)
    data = Sentences(batch)
    model = make_model("rnn-vae")

    def copy_input(model_, batch_, opts, from_level=0, posterior_mean=False):  # the perfect reconstruction
        return batch_["tokens"]

    import biva_text.decode as decode
    old = decode.reconstruct
    decode.reconstruct = copy_input
    try:
        stats = reconstruction_stats(model, data, progress=False, others=5)
    finally:
        decode.reconstruct = old
    for u in (stats["unigram_overlap"], stats["unigram_overlap_mean"]):
        assert u["own"] == 1.0 and u["other"] < 0.9 and u["ratio"] > 1.1
    assert EOS_ID not in sum((row[:n - 1] for row, n in zip(batch["tokens"].tolist(), batch["length"].tolist())), [])


def test_teacher_forced_argmax_is_the_step_by_step_decoders():
    """next_token_argmax (one teacher-forced pass) equals feeding the true words one step at a time."""
    torch.manual_seed(0)
    model = make_model("biva-lstm")
    batch = make_batch([3, 5, 9, 2], seed=4)
    tokens, lengths = model.padded_tokens(batch), batch["length"].long()
    from shared.distributions import HashedNoise

    with torch.no_grad():
        cond = model.condition_posterior(batch, HashedNoise(0, batch["index"]))
        fast = model.decoder.next_token_argmax(model.io, tokens, lengths, cond)
        state, prev, slow = model.decoder.initial_state(cond), torch.full((4,), BOS_ID), []
        for t in range(int(lengths.max())):
            logits, state = model.decoder.step(model.io, prev, state, cond, t)
            slow.append(logits.argmax(-1))
            prev = tokens[:, t]
    assert torch.equal(fast, torch.stack(slow, dim=1))


def test_teacher_forced_accuracy_counts_words_and_rare_words():
    from biva_text.report import teacher_forced_accuracy

    data = Sentences(make_batch([3, 5, 9, 2, 7, 4, 6, 8], seed=1))
    words = sum(n - 1 for n in [3, 5, 9, 2, 7, 4, 6, 8])  # EOS excluded
    lm = teacher_forced_accuracy(make_model("lstm-lm"), data, progress=False, frequent=3)
    assert lm["posterior"] == lm["prior"] and lm["posterior"]["words"] == words and lm["frequent"] == 3
    assert 0 < lm["posterior"]["rare_words"] < words and 0.0 <= lm["posterior"]["rare"] <= 1.0
    assert teacher_forced_accuracy(make_model("biva"), data, progress=False) is None  # no LSTM decoder

    model = make_model("biva-lstm")
    got = teacher_forced_accuracy(model, data, progress=False, frequent=3)
    perfect = lambda io, tokens, lengths, cond: tokens[:, : int(lengths.max())]  # noqa: E731
    model.decoder.next_token_argmax = perfect
    assert got["posterior"]["all"] < 1.0
    right = teacher_forced_accuracy(model, data, progress=False, frequent=3)
    assert right["posterior"]["all"] == 1.0 and right["prior"]["rare"] == 1.0
    # ... read as sentences they are the inputs themselves: full overlap with their own, less with others'
    for row in ("posterior", "prior"):
        overlap = right[row]["overlap"]
        assert overlap["own"] == 1.0 and 0.0 < overlap["other"] < 1.0 and overlap["ratio"] == 1.0 / overlap["other"]
        assert overlap["sentences"] == 8
    assert got["posterior"]["overlap"]["own"] < 1.0


def test_posterior_mean_reconstructions_do_not_depend_on_the_seed():
    """reconstruct(posterior_mean=True) decodes every group at its posterior mean: greedy output is the
    same for every seed, where draws z ~ q (a decoder that reads z strongly) change it; and it refuses
    --from-level, whose lower levels would be draws."""
    from biva_text.decode import DecodeOptions, reconstruct
    from shared.errors import UserError

    torch.manual_seed(0)
    model = make_model("biva-lstm")
    with torch.no_grad():
        model.decoder.lstm.weight_ih_l0[:, model.cfg.embedding_dim:] *= 50.0
    batch = make_batch([3, 5, 9, 2, 7, 4, 6, 8], seed=1)
    drawn = [reconstruct(model, batch, DecodeOptions(method="greedy", seed=s)) for s in range(3)]
    means = [reconstruct(model, batch, DecodeOptions(method="greedy", seed=s), posterior_mean=True) for s in range(3)]
    assert not all(torch.equal(drawn[0], d) for d in drawn[1:])
    assert all(torch.equal(means[0], m) for m in means[1:])
    with pytest.raises(UserError, match="--posterior-mean"):
        reconstruct(model, batch, DecodeOptions(method="greedy"), from_level=1, posterior_mean=True)
