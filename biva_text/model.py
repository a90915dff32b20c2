"""Text models (docs/design.md §7): BIVA over sentences, with or without an LSTM decoder, and the baselines.

    biva-lstm  the shared ladder with 1-D convolutions over the embedded sentence; its top-down
               output d_0 (B, C, T) feeds an LSTM decoder that reads, at step t, the previous
               token's embedding (BOS at t = 0) concatenated with d_0[:, :, t] and predicts token t
    biva       the same ladder, tokens predicted from d_0 directly (no autoregression); it scores
               every position up to max_tokens + 1, padding after EOS included: its distribution
               is over fixed-length sequences
    lstm-lm    an LSTM language model (no latent variables, G = 0)
    rnn-vae    Bowman et al. (2015): an LSTM encoder, one Gaussian latent concatenated to the
               decoder's input at every step, an LSTM decoder
    hybrid-vae, hybrid-vae-conv
               Semeniuta et al. (2017): a convolutional encoder, a deconvolutional decoder whose
               features feed the LSTM (or, -conv, the softmax directly); see hybrid.py

Shared choices:
    * Sentences are padded with PAD (id 0) to a fixed length T: max_tokens + 1 (pieces + EOS)
      rounded up to the product of the ladder's strides. The encoder sees PAD's embedding after EOS.
    * The output layer projects the LSTM state (or d_0) to the embedding width and scores it
      against the embedding matrix (tied weights, Press & Wolf 2017) plus a bias: a 20k x 512
      softmax matrix is not paid twice.
    * Embeddings start at std E^-1/2 and are multiplied by sqrt(E) where they are inputs (ladder,
      LSTM), so inputs have unit scale while the tied logits start small.
    * Loss: log p(x | z) sums over the predicted tokens t < length (EOS included); PAD positions
      never count, except in ``biva``, whose likelihood covers the fixed-length sequence.
    * KL warm-up (``kl_schedule="warmup"``): the gradients of log q and log p are multiplied by
      ``kl_weight`` (0 -> 1 over ``kl_warmup_steps`` optimiser steps), their values are not, so
      every reported number (loss, ELBO, KL) is the plain weight-1 figure.
    * Every random draw in ``forward`` comes from the noise object (``HashedNoise`` in
      evaluation), so a sentence's bound does not depend on what it is batched with.
"""
from __future__ import annotations
from __future__ import annotations

import torch
from torch import nn

from shared.distributions import Gaussian
from shared.errors import UserError
from shared.model import LadderModel, LatentVariableModel, ModelOutput
from shared.nn import WNConv

from .hybrid import HybridVAE
from .model_config import HybridConfig, TextModelConfig, padded_length  # noqa: F401  (re-exported)
from .names import HYBRID_MODELS
from .parts import (LOGIT_ROWS, LSTMDecoder, TextModelMixin, TokenIO, make_lstm, run_lstm,  # noqa: F401
                    scale_grad, tied_log_prob, token_log_prob)

RNN_VAE_KEY = 0  # noise key of the RNN-VAE's latent (its only group)


class TextLadderModel(TextModelMixin, LadderModel):
    """``biva-lstm`` and ``biva``: the shared ladder over the embedded sentence (B, E, T)."""

    def __init__(self, cfg: TextModelConfig):
        cfg.validate()
        super().__init__(cfg.ladder)
        self._init_text(cfg)
        self.io = TokenIO(cfg.vocab_size, cfg.embedding_dim)
        C = cfg.ladder.output_channels
        if self.autoregressive:
            self.decoder = self.make_decoder(C)
            if cfg.bow_weight:  # only then: runs without the term load unchanged
                self.bow = nn.Linear(C, cfg.embedding_dim)
        else:
            self.head = WNConv(1, C, cfg.embedding_dim, kernel=1)  # d_0 → tied output layer, per position

    def embed(self, batch, noise):
        tokens = self.padded_tokens(batch)  # (B, T)
        e0 = self.io.embed(tokens).transpose(1, 2)  # (B, E, T)
        return e0, tokens

    def token_logits(self, d0: torch.Tensor) -> torch.Tensor:
        """Non-autoregressive logits (B, T, V) from d_0 (B, C, T)."""
        return self.io.logits(self.head(d0).transpose(1, 2))

    def bag_of_words_log_prob(self, d0: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log p_bow(x | d_0) per sentence (B,): every token t < length (EOS included) scored by one softmax
        read from d_0 (B, C, T) averaged over the sentence's positions."""
        n = tokens.shape[1]
        mask = (torch.arange(n, device=tokens.device)[None, :] < lengths[:, None])  # (B, n)
        w = mask[:, None, :].to(d0.dtype)
        summary = (d0[:, :, :n] * w).sum(2) / w.sum(2).clamp_min(1)  # (B, C)
        lp = torch.log_softmax(self.io.logits(self.bow(summary)).float(), dim=-1)  # (B, V)
        return (lp.gather(1, tokens) * mask).sum(1)

    def log_likelihood(self, d0, tokens, batch):
        if self.autoregressive:
            lengths = batch["length"].long()
            log_px = self.decoder.log_likelihood(self.io, tokens, lengths, d0.transpose(1, 2))
            if self.cfg.bow_weight and self.training and torch.is_grad_enabled():
                bow = self.bag_of_words_log_prob(d0, tokens, lengths)
                log_px = log_px + self.cfg.bow_weight * (bow - bow.detach())  # its gradient, not its value
            return log_px
        W = self.cfg.max_tokens + 1  # the fixed-length sequence: pieces, EOS, then PAD
        h = self.head(d0[:, :, :W]).transpose(1, 2)  # (B, W, E); the head is per position (kernel 1)
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device).repeat_interleave(W)
        return tied_log_prob(self.io, h.reshape(B * W, -1), tokens[:, :W].reshape(-1), rows, B)

    def forward(self, batch, noise, *, mode="posterior", k=0, analytic_kl=False) -> ModelOutput:
        return self._warm(super().forward(batch, noise, mode=mode, k=k, analytic_kl=analytic_kl))

    # ---- decoding: the conditioning a decoder reads, as (B, T, C) features ----
    def condition_prior(self, n: int, noise, latent_temperature: float = 1.0) -> torch.Tensor:
        return self.decode_prior(n, noise, latent_temperature).transpose(1, 2)

    def condition_posterior(self, batch: dict, noise, from_level: int = 0) -> torch.Tensor:
        e0, _ = self.embed(batch, noise)
        return self.ladder(e0, noise, mode="posterior", k=from_level).d0.transpose(1, 2)

    def condition_latents(self, latents: list[torch.Tensor]) -> torch.Tensor:
        d0 = self.ladder(None, None, mode="prior", batch_size=latents[0].shape[0], latents=latents,
                         device=latents[0].device).d0
        return d0.transpose(1, 2)

    def posterior_log_density(self, batch: dict, latents: list[torch.Tensor]) -> torch.Tensor:
        """log q(z | x) summed over the groups, for given latents (B,)."""
        e0, _ = self.embed(batch, None)
        return self.ladder(e0, None, mode="posterior", latents=latents).log_q.sum(1)

    def posterior_sample(self, batch: dict, noise) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents z ~ q(z | x) of every group, and log q(z | x) (B,)."""
        e0, _ = self.embed(batch, noise)
        out = self.ladder(e0, noise, mode="posterior")
        return out.samples, out.log_q.sum(1)


class LSTMLanguageModel(TextModelMixin, LatentVariableModel):
    """The LSTM LM baseline: no latent variables, log p(x) exact."""

    group_info: list[dict] = []

    def __init__(self, cfg: TextModelConfig):
        cfg.validate()
        super().__init__()
        self._init_text(cfg)
        self.io = TokenIO(cfg.vocab_size, cfg.embedding_dim)
        self.decoder = LSTMDecoder(cfg.embedding_dim, 0, cfg.hidden_size, cfg.word_dropout)

    def forward(self, batch, noise, *, mode="posterior", k=0, analytic_kl=False) -> ModelOutput:
        tokens = self.padded_tokens(batch)
        log_px = self.decoder.log_likelihood(self.io, tokens, batch["length"].long(), None)
        empty = log_px.new_zeros(log_px.shape[0], 0)
        return ModelOutput(log_px=log_px, log_q=empty, log_p=empty, scored=[])

    def posterior_means(self, batch, noise):
        return []

    def condition_prior(self, n: int, noise, latent_temperature: float = 1.0):
        return None

    def condition_posterior(self, batch, noise, from_level: int = 0):
        return None


class RNNVAE(TextModelMixin, LatentVariableModel):
    """Bowman et al. (2015): LSTM encoder → q(z | x) diagonal Gaussian → z fed at every decoder step."""

    group_info = [{"level": 1, "kind": "top"}]

    def __init__(self, cfg: TextModelConfig):
        cfg.validate()
        super().__init__()
        self._init_text(cfg)
        self.io = TokenIO(cfg.vocab_size, cfg.embedding_dim)
        self.encoder = make_lstm(cfg.embedding_dim, cfg.hidden_size)
        self.q_head = nn.Linear(cfg.hidden_size, 2 * cfg.latent_dim)
        nn.init.zeros_(self.q_head.bias)
        self.q_head.weight.data.mul_(0.1)  # start near the prior, as the ladder's heads do
        self.decoder = self.make_decoder(cfg.latent_dim)

    def posterior(self, batch: dict) -> Gaussian:
        tokens = self.padded_tokens(batch)
        lengths = batch["length"].long()
        n = int(lengths.max())
        h, _ = run_lstm(self.encoder, self.io.embed(tokens[:, :n]))  # causal: the state after EOS ignores padding
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, H)
        return Gaussian.from_params(self.q_head(last))

    def _expand(self, z: torch.Tensor, n: int) -> torch.Tensor:
        return z[:, None, :].expand(z.shape[0], n, z.shape[1])

    def forward(self, batch, noise, *, mode="posterior", k=0, analytic_kl=False) -> ModelOutput:
        lengths = batch["length"].long()

        def log_px(z):
            return self.decoder.log_likelihood(self.io, self.padded_tokens(batch), lengths,
                                               self._expand(z, int(lengths.max())))

        return self.one_latent_forward(batch, noise, mode, k, analytic_kl, "the RNN-VAE", RNN_VAE_KEY, log_px)

    def posterior_means(self, batch, noise):
        return [self.posterior(batch).mu]

    def condition_prior(self, n: int, noise, latent_temperature: float = 1.0) -> torch.Tensor:
        device = self.q_head.weight.device
        z = latent_temperature * noise.normal((n, self.cfg.latent_dim), RNN_VAE_KEY, device)
        return self._expand(z, self.cfg.seq_len)

    def condition_posterior(self, batch, noise, from_level: int = 0) -> torch.Tensor:
        if from_level != 0:
            raise UserError(f"the RNN-VAE has one latent level; --from-level must be 0, got {from_level}")
        q = self.posterior(batch)
        return self._expand(q.sample(noise.normal(q.mu.shape, RNN_VAE_KEY, q.mu.device)), self.cfg.seq_len)

    def condition_latents(self, latents: list[torch.Tensor]) -> torch.Tensor:
        return self._expand(latents[0], self.cfg.seq_len)

    def posterior_log_density(self, batch: dict, latents: list[torch.Tensor]) -> torch.Tensor:
        return self.posterior(batch).log_prob(latents[0])

    def posterior_sample(self, batch: dict, noise) -> tuple[list[torch.Tensor], torch.Tensor]:
        q = self.posterior(batch)
        z = q.sample(noise.normal(q.mu.shape, RNN_VAE_KEY, q.mu.device))
        return [z], q.log_prob(z)


def build_text_model(cfg: TextModelConfig) -> LatentVariableModel:
    cfg.validate()
    if cfg.is_ladder:
        return TextLadderModel(cfg)
    if cfg.model == "lstm-lm":
        return LSTMLanguageModel(cfg)
    if cfg.model in HYBRID_MODELS:
        return HybridVAE(cfg)
    return RNNVAE(cfg)


def num_params(model: nn.Module) -> int:
    """Trainable parameters; the tied output matrix counts once."""
    return sum(p.numel() for p in model.parameters())
