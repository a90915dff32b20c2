"""Text presets (docs/design.md §7): the paper's BookCorpus sizes, a small CPU benchmark size, a quick-start
size for a few minutes on a CPU, a tiny test size.

A preset fixes the widths of all four models and the training defaults that go with them; the
vocabulary size comes from the trained tokenizer and the padded length T from ``max_tokens``.

paper   The paper's (BIVA's text appendix, docs/design.md §7): L = 7 levels of 128 kernels, embeddings 512,
        an LSTM of 1024 units, 20,000 pieces and sentences of at most 40, Adamax 2e-3, batch 512,
        5 epochs, one sample, free bits starting at a 30-nat budget and lowered on plateaus.
        Ours, where the paper gives no value: M = 3 gated layers per block, kernel 5 at the bottom and
        3 above, stride 2 at levels 1, 4 and 7 (T = 48 for 40 pieces: 48 → 24 → 12 → 6 positions),
        convolutional latents of 16 channels at the bottom down to 4 at the top, the RNN-VAE's
        32-dimensional latent, the plateau rule (halve B after 4 evaluations without a gain of 0.05
        nats over the best, floor 1 nat in all: the paper says only "incrementally decrease on
        plateau"), validation every 2000 steps on 10,000 sentences, EMA 0.999, KL warm-up over 20k
        steps, biva-lstm reading d_0 through a learned gain (docs/text.md, "The decoder's view of z").
        The Hybrid VAE: convolutions of 128, 256, 512 channels (kernel 3, stride 2), 200 feature
        channels, alpha = 0.2 (the authors' released code; BIVA's paper gives no widths), the same
        embeddings, LSTM and latent size as the RNN-VAE; KL warm-up over 20k steps.
small   ours: the same shapes, narrow (32 kernels, L = 4, LSTM 128, embeddings 64), for CPU runs of
        about 20 minutes (6,000 steps of 64); a budget of 8 nats halved after 2 evaluations without a
        0.1-nat gain, floor 1. 6,000 steps because at 2,000 biva-lstm's perplexity was still far from
        the LM's (measured on Jane Austen: docs/benchmarks.md, "Text quality on Jane Austen").
quick   ours: the small preset's model with a schedule that ends in about 8 minutes on 2 CPU cores,
        the preset of ``--dataset austen`` (the README's quick start): QUICK_STEPS steps of 64, the same
        free-bits budget (8 nats, halved on plateaus), validation every 250 steps (docs/text.md).
tiny    ours: a seconds-long model for tests.

Every preset trains on length-bucketed batches (``length_buckets``; shared/engine.py BatchPlan).
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.config import TrainConfig, replace
from shared.errors import UserError
from shared.ladder import LadderConfig

from .model_config import HybridConfig, TextModelConfig, padded_length
from .names import DEFAULT_KL_SCHEDULE, HYBRID_MODELS, TEXT_MODELS, TEXT_PRESETS


@dataclass
class TextPreset:
    model: TextModelConfig
    train: TrainConfig
    description: str


def _ladder(max_tokens: int, embedding_dim: int, levels: int, channels: int, latent_channels: list[int],
            strides: list[int], depth: int, first_kernel: int = 5) -> LadderConfig:
    T = padded_length(max_tokens, strides)
    return LadderConfig(ndim=1, input_channels=embedding_dim, input_size=[T], output_channels=channels,
                        levels=levels, channels=[channels] * levels, latent_channels=latent_channels,
                        strides=strides, kernels=[first_kernel] + [3] * (levels - 1), depth=depth,
                        latent_kind="conv", dropout_inference=0.0, dropout_generative=0.0)


def paper(max_tokens: int) -> tuple[dict, TrainConfig, str]:
    sizes = dict(embedding_dim=512, hidden_size=1024, latent_dim=32,
                 ladder=_ladder(max_tokens, 512, 7, 128, [16, 14, 12, 10, 8, 6, 4], [2, 1, 1, 2, 1, 1, 2], 3),
                 hybrid=HybridConfig(conv_channels=[128, 256, 512], feature_channels=200))
    # BookCorpus: ~145k steps per epoch at batch 512; validate and checkpoint every 2000 steps on
    # 10k validation sentences. KL warm-up (RNN-VAE) over the first 20k steps.
    train = TrainConfig(epochs=5, batch_size=512, lr=2e-3, eval_every=2000, save_every=2000, log_every=50,
                        eval_examples=10000, ema_decay=0.999, free_bits_budget=30.0, free_bits_patience=4,
                        free_bits_factor=0.5, free_bits_threshold=0.05, free_bits_min=1.0, length_buckets=True)
    return sizes, train, "the paper's BookCorpus models: BIVA L=7, 128 kernels, LSTM 1024, embeddings 512"


def small(max_tokens: int) -> tuple[dict, TrainConfig, str]:
    sizes = dict(embedding_dim=64, hidden_size=128, latent_dim=16,
                 ladder=_ladder(max_tokens, 64, 4, 32, [8, 8, 6, 4], [2, 1, 2, 1], 1),
                 hybrid=HybridConfig(conv_channels=[32, 48, 64], feature_channels=32))
    train = TrainConfig(max_steps=6000, batch_size=64, lr=2e-3, eval_every=100, save_every=500, log_every=25,
                        eval_examples=2000, ema_decay=0.99, free_bits_budget=8.0, free_bits_patience=2,
                        free_bits_factor=0.5, free_bits_threshold=0.1, free_bits_min=1.0, length_buckets=True)
    return sizes, train, "a narrow BIVA (L=4, 32 kernels, LSTM 128) for CPU runs of about 20 minutes"


QUICK_STEPS = 3500  # about 7.5 minutes at ~8 steps/s, evaluations included (2-core EPYC, quiet)


def quick(max_tokens: int) -> tuple[dict, TrainConfig, str]:
    sizes, train, _ = small(max_tokens)
    train = replace(train, "the quick preset", max_steps=QUICK_STEPS, eval_every=250, save_every=500, log_every=50)
    return sizes, train, f"the small preset's model for {QUICK_STEPS} steps, about 8 minutes on 2 CPU cores"


def tiny(max_tokens: int) -> tuple[dict, TrainConfig, str]:
    sizes = dict(embedding_dim=16, hidden_size=32, latent_dim=4,
                 ladder=_ladder(max_tokens, 16, 3, 16, [4, 4, 4], [2, 1, 2], 1, first_kernel=3),
                 hybrid=HybridConfig(conv_channels=[8, 16], feature_channels=8))
    train = TrainConfig(max_steps=40, batch_size=16, lr=3e-3, eval_every=20, save_every=20, log_every=10,
                        eval_examples=256, ema_decay=0.9, free_bits_budget=2.0, free_bits_patience=2,
                        free_bits_factor=0.5, free_bits_threshold=0.05, free_bits_min=0.5, length_buckets=True)
    return sizes, train, "a seconds-long CPU model for tests and smoke runs"


PRESETS = {"paper": paper, "small": small, "quick": quick, "tiny": tiny}
WARMUP_STEPS = {"paper": 20000, "small": 500, "quick": 500, "tiny": 20}
assert set(PRESETS) == set(TEXT_PRESETS)


def get_preset(name: str, model: str = "biva-lstm", *, vocab_size: int = 20000, max_tokens: int = 40,
               kl_schedule: str | None = None, kl_warmup_steps: int | None = None) -> TextPreset:
    """The preset ``name`` for ``model``; ``kl_schedule`` None takes the model's default (free bits
    for BIVA, warm-up for the RNN-VAE). Warm-up sets the free-bits budget to 0."""
    if name not in PRESETS:
        raise UserError(f"unknown text preset {name!r}; choose one of {', '.join(PRESETS)}")
    if model not in TEXT_MODELS:
        raise UserError(f"unknown text model {model!r}; choose one of {', '.join(TEXT_MODELS)}")
    sizes, train, description = PRESETS[name](max_tokens)
    schedule = DEFAULT_KL_SCHEDULE[model] if kl_schedule is None else kl_schedule
    if model == "lstm-lm":
        schedule = None  # no latent variables: nothing to schedule
    warmup = 0
    if schedule == "warmup":
        warmup = WARMUP_STEPS[name] if kl_warmup_steps is None else kl_warmup_steps
        train.free_bits_budget = 0.0
    if model not in ("biva-lstm", "biva"):
        sizes["ladder"] = None
    if model not in HYBRID_MODELS:
        sizes["hybrid"] = None
    cfg = TextModelConfig(model=model, vocab_size=vocab_size, max_tokens=max_tokens, kl_schedule=schedule,
                          kl_warmup_steps=warmup, **sizes)
    if model == "biva-lstm":
        # Ours: d_0 times a learned gain (initially 4) at the LSTM's input, because the decoder then reads
        # the latents far earlier than with plain concatenation at the same ELBO (measured on Jane Austen:
        # docs/text.md, "The decoder's view of z"). The baselines keep their papers' plain concatenation.
        cfg.decoder_input = "scaled"
    return TextPreset(cfg.validate(), train, description)
