"""The Hybrid VAE baseline of the paper's Table 7 (Semeniuta, Severyn & Barth 2017, "A Hybrid
Convolutional Variational Autoencoder for Text Generation").

    encoder   the embedded sentence (B, E, T) through strided 1-D convolutions (kernel 3, stride 2,
              each followed by a layer norm over channels and a ReLU), flattened, a linear map to the
              mean and scale of one diagonal Gaussian z
    decoder   z → a linear map and ReLU to the bottom feature map, transposed convolutions (stride 2)
              mirroring the encoder back to a feature sequence f (B, C, T)
    hybrid-vae       an LSTM reads, at step t, the previous token's embedding and f[:, :, t] (the
                     project's LSTMDecoder, so the decoder-view options apply) and predicts token t
    hybrid-vae-conv  no LSTM: tokens come from f through the auxiliary softmax directly (non-
                     autoregressive; like ``biva``, its distribution is over fixed-length sequences, so
                     it scores the padding after EOS too)

The auxiliary reconstruction term: the training objective of ``hybrid-vae`` is J = ELBO + alpha * J_aux,
J_aux = sum over the sentence's tokens (EOS included) of log softmax(W f[:, :, t])[x_t], which makes
the features (hence z) carry the sentence whatever the LSTM does. It is added as the KL warm-up is:
its gradient enters the training loss, its value does not, so every number reported (loss, ELBO, KL,
the bounds of report_text.py) is the plain bound. alpha = 0.2 is the value of the authors' README
example (github.com/ssemeniuta/textvae); we could not check it against the paper's text.

Differences from the authors' code, and why: a layer norm over channels in place of batch norm
(a sentence's bound must not depend on what it is batched with, docs/design.md §3); the input is the
embedding (as for the other models) rather than one-hot tokens; the auxiliary classifier is a plain
linear map from the C = 200 feature channels to the vocabulary, as in their code, so it is not tied
to the embedding (the parameter counts this gives, against the paper's: docs/text.md).
"""
from __future__ import annotations

import torch
from torch import nn

from shared.distributions import Gaussian
from shared.errors import UserError
from shared.model import LatentVariableModel, ModelOutput

from .model_config import TextModelConfig
from .parts import TextModelMixin, TokenIO, token_log_prob

LATENT_KEY = 0  # noise key of the single latent group


class ChannelNorm(nn.Module):
    """Layer norm over the channels of (B, C, T), per position: independent of the batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def _stage(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, ChannelNorm(channels), nn.ReLU())


class HybridVAE(TextModelMixin, LatentVariableModel):
    group_info = [{"level": 1, "kind": "top"}]

    def __init__(self, cfg: TextModelConfig):
        cfg.validate()
        super().__init__()
        self._init_text(cfg)
        h = cfg.hybrid
        self.io = TokenIO(cfg.vocab_size, cfg.embedding_dim)
        k, pad = h.kernel, h.kernel // 2
        widths = [cfg.embedding_dim] + list(h.conv_channels)
        self.encoder = nn.Sequential(*[_stage(nn.Conv1d(a, b, k, stride=2, padding=pad), b)
                                       for a, b in zip(widths[:-1], widths[1:])])
        self.bottom = (h.conv_channels[-1], cfg.seq_len // 2 ** len(h.conv_channels))  # (C, T / 2^n)
        flat = self.bottom[0] * self.bottom[1]
        self.q_head = nn.Linear(flat, 2 * cfg.latent_dim)
        nn.init.zeros_(self.q_head.bias)
        self.q_head.weight.data.mul_(0.1)  # start near the prior, as the other models' heads do
        self.from_z = nn.Sequential(nn.Linear(cfg.latent_dim, flat), nn.ReLU())
        # Each transposed convolution doubles the length exactly (output_padding 1 for stride 2).
        up = list(reversed(h.conv_channels)) + [h.feature_channels]
        self.deconv = nn.Sequential(*[_stage(nn.ConvTranspose1d(a, b, k, stride=2, padding=pad, output_padding=1), b)
                                      for a, b in zip(up[:-1], up[1:])])
        # The auxiliary softmax (-conv: the output layer, whose bias is the token embedding's, io.out_bias).
        self.aux = nn.Linear(h.feature_channels, cfg.vocab_size, bias=self.autoregressive)
        if self.autoregressive:
            self.decoder = self.make_decoder(h.feature_channels)

    # ---- the two halves ----
    def posterior(self, batch: dict) -> Gaussian:
        e0 = self.io.embed(self.padded_tokens(batch)).transpose(1, 2)  # (B, E, T)
        return Gaussian.from_params(self.q_head(self.encoder(e0).flatten(1)))

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, Z) → the deconvolution's feature sequence (B, C, T)."""
        return self.deconv(self.from_z(z).view(z.shape[0], *self.bottom))

    def aux_logits(self, f: torch.Tensor) -> torch.Tensor:
        """The auxiliary softmax's logits (..., V) from features (..., C)."""
        return self.aux(f) if self.autoregressive else self.aux(f) + self.io.out_bias

    def token_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The auxiliary softmax's logits (B, T, V) from features (B, C, T)."""
        return self.aux_logits(features.transpose(1, 2))

    def aux_log_prob(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """J_aux per sentence (B,): the auxiliary softmax's log-probability of the tokens t < length."""
        n = int(lengths.max())
        mask = torch.arange(n, device=tokens.device)[None, :] < lengths[:, None]  # (B, n)
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(mask)[mask]
        logits = self.aux_logits(features[:, :, :n].transpose(1, 2)[mask])  # (N, V)
        return token_log_prob(logits, tokens[:, :n][mask], rows, tokens.shape[0])

    def log_likelihood(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.autoregressive:
            return self.fixed_length_log_prob(self.token_logits(features), tokens)
        log_px = self.decoder.log_likelihood(self.io, tokens, lengths, features.transpose(1, 2))
        alpha = self.cfg.hybrid.aux_weight
        if self.training and alpha > 0 and torch.is_grad_enabled():
            aux = self.aux_log_prob(features, tokens, lengths)
            log_px = log_px + alpha * (aux - aux.detach())  # the gradient of alpha * J_aux, not its value
        return log_px

    def _sample(self, q: Gaussian, noise) -> torch.Tensor:
        return q.sample(noise.normal(q.mu.shape, LATENT_KEY, q.mu.device))

    def forward(self, batch, noise, *, mode="posterior", k=0, analytic_kl=False) -> ModelOutput:
        def log_px(z):
            return self.log_likelihood(self.features(z), self.padded_tokens(batch), batch["length"].long())

        return self.one_latent_forward(batch, noise, mode, k, analytic_kl, "the Hybrid VAE", LATENT_KEY, log_px)

    def posterior_means(self, batch, noise):
        return [self.posterior(batch).mu]

    # ---- decoding: the conditioning a decoder reads, as (B, T, C) features ----
    def condition_prior(self, n: int, noise, latent_temperature: float = 1.0) -> torch.Tensor:
        device = self.q_head.weight.device
        z = latent_temperature * noise.normal((n, self.cfg.latent_dim), LATENT_KEY, device)
        return self.features(z).transpose(1, 2)

    def condition_posterior(self, batch, noise, from_level: int = 0) -> torch.Tensor:
        if from_level != 0:
            raise UserError(f"the Hybrid VAE has one latent level; --from-level must be 0, got {from_level}")
        return self.features(self._sample(self.posterior(batch), noise)).transpose(1, 2)

    def condition_latents(self, latents: list[torch.Tensor]) -> torch.Tensor:
        return self.features(latents[0]).transpose(1, 2)

    def posterior_log_density(self, batch: dict, latents: list[torch.Tensor]) -> torch.Tensor:
        return self.posterior(batch).log_prob(latents[0])

    def posterior_sample(self, batch: dict, noise) -> tuple[list[torch.Tensor], torch.Tensor]:
        q = self.posterior(batch)
        z = self._sample(q, noise)
        return [z], q.log_prob(z)
