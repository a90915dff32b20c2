"""The text models' configuration (docs/design.md §7): which model, its widths, and how its decoder reads z."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.errors import UserError
from shared.ladder import LadderConfig

from .names import DECODER_INITS, DECODER_INPUTS, HYBRID_MODELS, KL_SCHEDULES, LADDER_MODELS, NON_AUTOREGRESSIVE, TEXT_MODELS


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
            raise UserError(f"word_dropout (--word-dropout) must be in [0, 1) (1 would hide every input word), "
                            f"got {self.word_dropout}")
        if self.decoder_input not in DECODER_INPUTS or self.decoder_init not in DECODER_INITS:
            raise UserError(f"decoder_input must be one of {', '.join(DECODER_INPUTS)} and decoder_init one of "
                            f"{', '.join(DECODER_INITS)}; got {self.decoder_input!r}, {self.decoder_init!r}")
        if self.decoder_input == "none" and self.decoder_init == "zeros" and not self.decoder_attention:
            raise UserError("decoder_input none (--decoder-input none) leaves the LSTM blind to the latents; add "
                            "decoder_attention (--decoder-attention) or decoder_init latents (--decoder-init latents)")
        if ((self.decoder_input, self.decoder_init) != ("concat", "zeros") or self.decoder_attention) \
                and self.model in ("lstm-lm",) + NON_AUTOREGRESSIVE:
            raise UserError(f"model {self.model} has no LSTM reading latents; drop the decoder options "
                            f"(--decoder-input, --decoder-init, --decoder-attention)")
        if self.model in HYBRID_MODELS:
            h = self.hybrid
            if h is None or not h.conv_channels or h.kernel % 2 == 0 or h.aux_weight < 0:
                raise UserError(f"model {self.model} needs a hybrid config with conv channels, an odd kernel and "
                                f"aux_weight >= 0, got {h}")
        if self.bow_weight < 0 or (self.bow_weight and self.model != "biva-lstm"):
            raise UserError(f"bow_weight (--bow-weight) is biva-lstm's bag-of-words term and must be >= 0; got "
                            f"{self.bow_weight} for {self.model}; use it with --model biva-lstm")
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
