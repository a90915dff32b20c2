"""The report's evidence that latents carry the sentence: reconstruction gain and unigram overlap."""
from __future__ import annotations

import pytest
import torch

from biva_text.report import reconstruction_stats, unigram_overlap
from biva_text.tokenizer import EOS_ID
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

    def copy_input(model_, batch_, opts, from_level=0):  # the perfect reconstruction
        return batch_["tokens"]

    import biva_text.decode as decode
    old = decode.reconstruct
    decode.reconstruct = copy_input
    try:
        stats = reconstruction_stats(model, data, progress=False, others=5)
    finally:
        decode.reconstruct = old
    u = stats["unigram_overlap"]
    assert u["own"] == 1.0 and u["other"] < 0.9 and u["ratio"] > 1.1
    assert EOS_ID not in sum((row[:n - 1] for row, n in zip(batch["tokens"].tolist(), batch["length"].tolist())), [])
