"""Text models (DESIGN.md §7): BIVA over sentences, with or without an LSTM decoder, and the baselines.

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

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shared.distributions import Gaussian, standard_normal_like
from shared.errors import UserError
from shared.ladder import LadderConfig
from shared.model import LadderModel, LatentVariableModel, ModelOutput
from shared.nn import WNConv

from .names import (DECODER_INITS, DECODER_INPUTS, HYBRID_MODELS, KL_SCHEDULES, LADDER_MODELS, NON_AUTOREGRESSIVE,
                    TEXT_MODELS)
from .tokenizer import BOS_ID, PAD_ID, UNK_ID

RNN_VAE_KEY = 0  # noise key of the RNN-VAE's latent (its only group)


@dataclass
class HybridConfig:
    """The Hybrid VAE's convolutional parts (Semeniuta et al. 2017; the widths are those of the authors'
    released code, ssemeniuta/textvae, three-layer setting: BIVA's paper does not give them)."""

    conv_channels: list[int] = field(default_factory=lambda: [128, 256, 512])  # encoder, stride 2 each; the decoder mirrors it
    kernel: int = 3
    feature_channels: int = 200  # the deconvolution's output: what the LSTM and the auxiliary softmax read
    aux_weight: float = 0.2  # alpha of J = ELBO + alpha * J_aux (training only; the authors' README example)


@dataclass
class TextModelConfig:
    model: str = "biva-lstm"  # biva-lstm | biva | lstm-lm | rnn-vae | hybrid-vae | hybrid-vae-conv
    vocab_size: int = 20000  # the tokenizer's actual size
    max_tokens: int = 40  # pieces per sentence, without EOS
    embedding_dim: int = 512  # E, also the width of the tied output projection
    hidden_size: int = 1024  # LSTM units (decoder; and the RNN-VAE's encoder)
    latent_dim: int = 32  # the RNN-VAE's latent
    kl_schedule: str | None = "free-bits"  # free-bits | warmup | None (lstm-lm)
    kl_warmup_steps: int = 0  # optimiser steps of the linear KL warm-up (kl_schedule "warmup")
    word_dropout: float = 0.0  # training only: decoder inputs replaced by UNK (Bowman et al. 2015); 0 = the paper
    decoder_input: str = "concat"  # the LSTM reads [embedding, cond_t] (concat), gain * cond_t (scaled) or gain * layernorm(cond_t) (normalised)
    decoder_init: str = "zeros"  # the LSTM's initial (h, c): zeros, or a linear map of the conditioning averaged over time (latents)
    decoder_gain: float = 4.0  # initial value of the learned gain (scaled, normalised)
    # The LSTM's output also attends over the whole conditioning sequence (Luong et al. 2015's global
    # attention, without input feeding): what z says is found by content, not only at position t.
    decoder_attention: bool = False
    # biva-lstm, training only (ours, after Zhao et al. 2017): the gradient of bow_weight * log p_bow(x | d_0),
    # a bag-of-words softmax over the sentence's tokens read from d_0 averaged over the sentence (position-
    # free, so the words must be in the latents, not in where they sit); reported bounds never include it.
    bow_weight: float = 0.0
    ladder: LadderConfig | None = field(default_factory=LadderConfig)  # None for the baselines
    hybrid: HybridConfig | None = None  # the Hybrid VAE's convolutions; None for the other models

    @property
    def is_ladder(self) -> bool:
        return self.model in LADDER_MODELS

    @property
    def seq_len(self) -> int:
        """T: the padded length every sentence is embedded at."""
        if self.is_ladder:
            return self.ladder.input_size[0]
        if self.model in HYBRID_MODELS:
            return padded_length(self.max_tokens, [2] * len(self.hybrid.conv_channels))
        return self.max_tokens + 1

    def validate(self) -> "TextModelConfig":
        if self.model not in TEXT_MODELS:
            raise UserError(f"unknown text model {self.model!r}; choose one of {', '.join(TEXT_MODELS)}")
        if self.kl_schedule is not None and self.kl_schedule not in KL_SCHEDULES:
            raise UserError(f"unknown KL schedule {self.kl_schedule!r}; choose one of {', '.join(KL_SCHEDULES)}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise UserError(f"word_dropout must be in [0, 1), got {self.word_dropout}")
        if self.decoder_input not in DECODER_INPUTS or self.decoder_init not in DECODER_INITS:
            raise UserError(f"decoder_input must be one of {', '.join(DECODER_INPUTS)} and decoder_init one of "
                            f"{', '.join(DECODER_INITS)}; got {self.decoder_input!r}, {self.decoder_init!r}")
        if self.decoder_input == "none" and self.decoder_init == "zeros" and not self.decoder_attention:
            raise UserError("decoder_input none leaves the LSTM blind to the latents; add decoder_attention or "
                            "decoder_init latents")
        if ((self.decoder_input, self.decoder_init) != ("concat", "zeros") or self.decoder_attention) \
                and self.model in ("lstm-lm",) + NON_AUTOREGRESSIVE:
            raise UserError(f"model {self.model} has no LSTM reading latents; drop the decoder input/init options")
        if self.model in HYBRID_MODELS:
            h = self.hybrid
            if h is None or not h.conv_channels or h.kernel % 2 == 0 or h.aux_weight < 0:
                raise UserError(f"model {self.model} needs a hybrid config with conv channels, an odd kernel and "
                                f"aux_weight >= 0, got {h}")
        if self.bow_weight < 0 or (self.bow_weight and self.model != "biva-lstm"):
            raise UserError(f"bow_weight is biva-lstm's bag-of-words term and must be >= 0; got {self.bow_weight} "
                            f"for {self.model}")
        if self.vocab_size < 5:
            raise UserError(f"vocab_size must be at least 5 (4 specials and a word), got {self.vocab_size}")
        if self.is_ladder:
            if self.ladder is None:
                raise UserError(f"model {self.model} needs a ladder config")
            lad = self.ladder
            if lad.ndim != 1 or lad.input_channels != self.embedding_dim:
                raise UserError(f"the text ladder must be 1-D over {self.embedding_dim} embedding channels, got "
                                f"ndim={lad.ndim}, input_channels={lad.input_channels}")
            if lad.input_size[0] < self.max_tokens + 1:
                raise UserError(f"the ladder's length {lad.input_size[0]} is shorter than max_tokens + 1 = "
                                f"{self.max_tokens + 1}; rebuild the preset for --max-tokens {self.max_tokens}")
            lad.validate()
        return self


def padded_length(max_tokens: int, strides: list[int]) -> int:
    """max_tokens + 1 (pieces + EOS) rounded up to the product of the strides."""
    total = math.prod(strides)
    return -(-(max_tokens + 1) // total) * total


def scale_grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same value as ``x``; gradient multiplied by ``weight`` (the KL warm-up)."""
    return weight * x + (1.0 - weight) * x.detach()


class TokenIO(nn.Module):
    """Token embedding and the tied output layer: logits = proj(h) @ E^T + b."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.dim = dim
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, E) inputs at unit scale."""
        return self.embedding(tokens) * math.sqrt(self.dim)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., E) projected states → (..., V)."""
        return F.linear(h, self.embedding.weight, self.out_bias)


def token_log_prob(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Sum of log softmax(logits)[target] per sentence, in fp32: logits (N, V) of N scored tokens
    belonging to sentences ``rows`` (N,) → (B,)."""
    lp = -F.cross_entropy(logits.float(), targets, reduction="none")
    return torch.zeros(batch_size, device=logits.device, dtype=torch.float32).index_add_(0, rows, lp)


# Rows of logits made at once when no gradient is kept: an L_K chunk of 100 samples x 16 sentences
# scores ~37k tokens, 2.9 GB of fp32 logits at 20k pieces; 8192 rows are 640 MB.
LOGIT_ROWS = 8192


def tied_log_prob(io: TokenIO, h: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                  batch_size: int) -> torch.Tensor:
    """``token_log_prob`` of the tied output layer at the N scored positions only: h (N, E)
    projected states → (B,). Without autograd the logits are made LOGIT_ROWS rows at a time (the
    same numbers); with it in one piece, since backward needs them all anyway."""
    if h.shape[0] <= LOGIT_ROWS or (torch.is_grad_enabled() and h.requires_grad):
        return token_log_prob(io.logits(h), targets, rows, batch_size)
    lp = torch.cat([-F.cross_entropy(io.logits(h_c).float(), t_c, reduction="none")
                    for h_c, t_c in zip(h.split(LOGIT_ROWS), targets.split(LOGIT_ROWS))])
    return torch.zeros(batch_size, device=h.device, dtype=torch.float32).index_add_(0, rows, lp)


def _unalias_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook of every LSTM: on a GPU, cuDNN packs an LSTM's weights into one flat buffer
    (flatten_parameters), so its state-dict tensors share storage, and safetensors-based savers
    (Accelerate's save_state) keep one name per storage and silently drop the others. Views into a
    larger storage are handed out as copies; loading still copies into the packed weights."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and torch.is_tensor(value) and not isinstance(value, nn.Parameter):
            if value.untyped_storage().nbytes() > value.numel() * value.element_size():
                state_dict[key] = value.clone()


def make_lstm(input_size: int, hidden_size: int) -> nn.LSTM:
    lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
    lstm.register_state_dict_post_hook(_unalias_state)
    return lstm


def run_lstm(lstm: nn.LSTM, x: torch.Tensor, state=None):
    """``lstm(x, state)``; on a CPU under bf16/fp16 autocast in fp32 (oneDNN has no reduced-precision
    LSTM on most CPUs; cuDNN has one)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            state = None if state is None else tuple(s.float() for s in state)
            return lstm(x.float(), state)
    return lstm(x, state)


class LSTMDecoder(nn.Module):
    """An LSTM that reads [embedding of token t-1 (BOS at t=0), cond_t] and predicts token t; with
    ``attention`` its output also reads the whole conditioning sequence, with ``cond_input`` "none" only that.

    The token embedding and output layer (``io``) belong to the model and are passed in, so the
    tied matrix is stored once."""

    def __init__(self, embedding_dim: int, cond_dim: int, hidden_size: int, word_dropout: float = 0.0,
                 cond_input: str = "concat", cond_init: str = "zeros", gain: float = 4.0, attention: bool = False):
        super().__init__()
        self.cond_dim = cond_dim
        self.word_dropout = word_dropout
        reads = cond_dim if cond_input != "none" else 0
        self.lstm = make_lstm(embedding_dim + reads, hidden_size)
        self.proj = nn.Linear(hidden_size, embedding_dim)
        # The defaults add no parameter: runs saved before these options load unchanged.
        self.cond_input, self.cond_init, self.attention = cond_input, cond_init, attention
        if attention:
            self.att_query = nn.Linear(hidden_size, cond_dim)
            self.att_out = nn.Linear(cond_dim, embedding_dim)
        if cond_input not in ("concat", "none"):
            # The embeddings enter at unit scale; a small d_0 beside them is easy for the LSTM to ignore.
            self.cond_gain = nn.Parameter(torch.tensor(float(gain)))
        if cond_input == "normalised":
            self.cond_norm = nn.LayerNorm(cond_dim, elementwise_affine=False)
        if cond_init == "latents":
            self.init_state = nn.Linear(cond_dim, 2 * hidden_size)

    def features(self, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The tied output layer's input (B, n, E) from the LSTM's outputs h (B, n, H): proj(h), plus with
        attention a context read from the conditioning (B, T, C) by softmax(q(h) . cond / sqrt(C))."""
        out = self.proj(h)
        if not self.attention or cond is None:
            return out
        q = self.att_query(h)
        cond = cond.to(q.dtype)
        weights = torch.softmax((q @ cond.transpose(1, 2)).float() / math.sqrt(cond.shape[-1]), dim=-1)
        return out + self.att_out(weights.to(q.dtype) @ cond)

    def read_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """What the LSTM reads of the conditioning (..., C) at each step."""
        if self.cond_input == "normalised":
            cond = self.cond_norm(cond.float())
        return cond if self.cond_input == "concat" else self.cond_gain * cond

    def initial_state(self, cond: torch.Tensor | None):
        """(h_0, c_0) from the whole conditioning sequence (B, T, C) averaged over time, or None (zeros)."""
        if self.cond_init == "zeros" or cond is None:
            return None
        # fp32 like the embeddings the LSTM reads beside it, so input and state share a dtype under autocast.
        with torch.autocast(cond.device.type, enabled=False):
            h, c = self.init_state(cond.float().mean(1)).chunk(2, dim=-1)  # (B, H) each
        return torch.tanh(h)[None].contiguous(), c[None].contiguous()

    def teacher_forced(self, io: TokenIO, tokens: torch.Tensor, lengths: torch.Tensor,
                       cond: torch.Tensor | None) -> torch.Tensor:
        """The LSTM's outputs (B, n, H) reading the true previous tokens, n = the longest length."""
        n = int(lengths.max())  # the LSTM is causal: positions past the longest sentence never count
        prev = torch.cat([torch.full_like(tokens[:, :1], BOS_ID), tokens[:, : n - 1]], dim=1)
        if self.training and self.word_dropout > 0:  # weakens the decoder so that it reads z
            drop = torch.rand(prev.shape, device=prev.device) < self.word_dropout
            prev = torch.where(drop & (prev != BOS_ID), torch.full_like(prev, UNK_ID), prev)
        x = io.embed(prev)  # (B, n, E)
        if cond is not None and self.cond_input != "none":
            x = torch.cat([x, self.read_cond(cond[:, :n]).to(x.dtype)], dim=2)
        return run_lstm(self.lstm, x, self.initial_state(cond))[0]

    def next_token_argmax(self, io: TokenIO, tokens: torch.Tensor, lengths: torch.Tensor,
                          cond: torch.Tensor | None) -> torch.Tensor:
        """Under teacher forcing, the most likely token at each of the n positions (B, n)."""
        return io.logits(self.features(self.teacher_forced(io, tokens, lengths, cond), cond)).argmax(-1)

    def log_likelihood(self, io: TokenIO, tokens: torch.Tensor, lengths: torch.Tensor,
                       cond: torch.Tensor | None) -> torch.Tensor:
        """log p(tokens) per sentence (B,), teacher forcing; ``cond`` (B, >=n, C) or None."""
        h = self.teacher_forced(io, tokens, lengths, cond)  # (B, n, H)
        n = h.shape[1]  # not lengths.max() again: one host read per pass
        mask = torch.arange(n, device=tokens.device)[None, :] < lengths[:, None]  # (B, n)
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(mask)[mask]
        # Logits only at the N scored positions (gathered before the 20k-wide output layer).
        features = self.features(h, cond)[mask] if self.attention else self.proj(h[mask])
        return tied_log_prob(io, features, tokens[:, :n][mask], rows, tokens.shape[0])

    def step(self, io: TokenIO, prev: torch.Tensor, state, cond: torch.Tensor | None, t: int):
        """Decoding step t: prev (B,) ids, cond (B, T, C) or None → logits (B, V) fp32, new state."""
        x = io.embed(prev[:, None])
        if cond is not None and self.cond_input != "none":
            x = torch.cat([x, self.read_cond(cond[:, t:t + 1]).to(x.dtype)], dim=2)
        h, state = run_lstm(self.lstm, x, state)
        return io.logits(self.features(h, cond)[:, 0]).float(), state


class TextModelMixin:
    """What every text model shares: batch handling, data size, the KL warm-up weight."""

    modality = "text"
    cfg: TextModelConfig

    def _init_text(self, cfg: TextModelConfig) -> None:
        self.cfg = cfg
        # Non-persistent: set by the trainer from its step count, never exported with the weights.
        self.register_buffer("kl_weight", torch.ones(()), persistent=False)

    @property
    def autoregressive(self) -> bool:
        return self.cfg.model not in NON_AUTOREGRESSIVE

    def make_decoder(self, cond_dim: int) -> LSTMDecoder:
        """The LSTM decoder with the config's view of the conditioning (``decoder_input``, ``decoder_init``)."""
        c = self.cfg
        return LSTMDecoder(c.embedding_dim, cond_dim, c.hidden_size, c.word_dropout, c.decoder_input,
                           c.decoder_init, c.decoder_gain, c.decoder_attention)

    def initial_decoder_state(self, cond: torch.Tensor | None):
        """The LSTM state before the first token, from the whole conditioning (n, T, C); None = zeros."""
        return self.decoder.initial_state(cond)

    def fixed_length_log_prob(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Non-autoregressive log p(x | z): logits (B, >=W, V) scored at all W = max_tokens + 1
        positions (pieces, EOS, then PAD: a distribution over fixed-length sequences) → (B,)."""
        W = self.cfg.max_tokens + 1
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device).repeat_interleave(W)
        return token_log_prob(logits[:, :W].reshape(B * W, -1), tokens[:, :W].reshape(-1), rows, B)

    def data_size(self, batch: dict) -> torch.Tensor:
        """Predicted tokens per sentence, EOS included (a sentence of n words counts n + 1)."""
        return batch["length"].float()

    def decode_step(self, prev: torch.Tensor, state, cond: torch.Tensor | None, t: int):
        """Autoregressive step t: prev (B,) ids, cond (B, T, C) or None → logits (B, V), state."""
        return self.decoder.step(self.io, prev, state, cond, t)

    def set_kl_weight(self, weight: float) -> None:
        self.kl_weight.fill_(float(weight))

    def padded_tokens(self, batch: dict) -> torch.Tensor:
        """(B, T) ids: the batch's tokens padded with PAD (or cut, where only PAD is cut) to T."""
        tokens = batch["tokens"].long()
        T = self.cfg.seq_len
        W = tokens.shape[1]
        if W < T:
            return F.pad(tokens, (0, T - W), value=PAD_ID)
        if W > T:
            if bool((tokens[:, T:] != PAD_ID).any()):
                raise UserError(f"a sentence has more than {T} tokens but the model reads at most {T}; "
                                f"use sentences of at most {self.cfg.max_tokens} pieces")
            return tokens[:, :T]
        return tokens

    def one_latent_forward(self, batch, noise, mode: str, k: int, analytic_kl: bool, what: str, key: int,
                           log_px) -> ModelOutput:
        """``forward`` of a model with one Gaussian latent (the RNN-VAE, the Hybrid VAEs): z ~ q(z | x),
        or in mode "prior" z ~ p(z) (log p(x | z) of a latent that knows nothing of x); ``log_px(z)``
        scores the batch."""
        if k != 0:
            raise UserError(f"{what} has one latent level; k must be 0, got {k}")
        q = self.posterior(batch)
        prior = standard_normal_like(q.mu.shape, q.mu.device)
        eps = noise.normal(q.mu.shape, key, q.mu.device)
        z = eps if mode == "prior" else q.sample(eps)
        out = ModelOutput(log_px=log_px(z), log_q=q.log_prob(z)[:, None], log_p=prior.log_prob(z)[:, None],
                          scored=[True], kl_analytic=q.kl(prior)[:, None] if analytic_kl else None)
        return self._warm(out)

    def _warm(self, out: ModelOutput) -> ModelOutput:
        # Decided on the config, not on the weight's value: no device sync, no recompilation.
        if self.cfg.kl_schedule != "warmup" or out.log_q.shape[1] == 0 or not torch.is_grad_enabled():
            return out
        w = self.kl_weight
        out.log_q, out.log_p = scale_grad(out.log_q, w), scale_grad(out.log_p, w)
        if out.kl_analytic is not None:
            out.kl_analytic = scale_grad(out.kl_analytic, w)
        return out


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
        from .hybrid import HybridVAE  # hybrid.py builds on this module

        return HybridVAE(cfg)
    return RNNVAE(cfg)


def num_params(model: nn.Module) -> int:
    """Trainable parameters; the tied output matrix counts once."""
    return sum(p.numel() for p in model.parameters())
