"""Decoding sentences from the text models (DESIGN.md §7): prior samples, reconstructions, interpolations.

Every model offers the decoder a conditioning sequence (B, T, C): BIVA's d_0 from the top-down path,
the RNN-VAE's z repeated over time, nothing for the LSTM LM. The LSTM then decodes token by token:

    sample   softmax with ``temperature``, optionally restricted to the top-p nucleus
    greedy   the most likely token at each step
    beam     beam search of width K; a hypothesis ends at EOS, the best total log-probability wins
             (no length normalisation, so it leans to short sentences as beam search does)

PAD and BOS are never generated. The non-autoregressive ``biva`` predicts all positions at once
from d_0: sampling draws each position independently, greedy and beam both give the per-position
argmax, which is that factorised distribution's exact mode. Decoding stops at EOS or after
max_tokens + 1 tokens.

Every draw (latents and tokens) comes from ``HashedNoise`` keyed by (seed, sentence index, step), so
sample i is the same whatever ``n`` or the batching; tokens are drawn by inverse CDF from one
uniform per sentence and step. Latents: prior samples draw z with the prior scales multiplied by
``latent_temperature``; reconstructions draw from the posterior
(``from_level`` k > 0: levels <= k from the conditional prior instead, as for images).
Interpolation takes the posterior means of *all* latent groups of the two sentences (each group's
mean with its parents at their means, the quantity active units are measured on), interpolates
every group linearly, and decodes them through the top-down path; for the RNN-VAE that is its one
latent. Decoding after interpolation is greedy unless asked otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.distributions import HashedNoise
from shared.errors import UserError

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

METHODS = ("sample", "greedy", "beam")
TOKEN_KEY = 1 << 20  # noise keys of token draws (TOKEN_KEY + step), apart from the latent groups' keys


@dataclass
class DecodeOptions:
    method: str = "sample"  # sample | greedy | beam
    temperature: float = 1.0  # token softmax temperature (sample)
    top_p: float = 1.0  # nucleus mass (sample); 1 = the full distribution
    beam: int = 4  # width (beam)
    seed: int = 0

    def validate(self) -> "DecodeOptions":
        if self.method not in METHODS:
            raise UserError(f"unknown decoding method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.beam < 1:
            raise UserError(f"--beam must be at least 1, got {self.beam}")
        return self


def nucleus_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with temperature applied and everything outside the top-p nucleus at -inf
    (the smallest set of most likely tokens whose mass reaches p; the top token always stays)."""
    logits = logits.float() / temperature
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def draw_tokens(logits: torch.Tensor, opts: "DecodeOptions", noise, key: int) -> torch.Tensor:
    """One token per row of logits (B, V): inverse CDF of the (temperature, top-p) softmax."""
    probs = nucleus_logits(logits, opts.temperature, opts.top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    u = noise.uniform((probs.shape[0], 1), key, probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_max(probs.shape[1] - 1)


def _never(logits: torch.Tensor, ids=(PAD_ID, BOS_ID)) -> torch.Tensor:
    logits[:, list(ids)] = float("-inf")
    return logits


@torch.no_grad()
def generate(model, cond: torch.Tensor | None, ids: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """Token ids (n, max_tokens + 1) for the sentences ``ids`` (n,): pieces, EOS, PAD after it (or
    cut at the length limit). ``cond`` (n, T, C) or None."""
    opts.validate()
    max_len = model.cfg.max_tokens + 1
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.shape[0]
    noise = HashedNoise(opts.seed, ids)
    if not model.autoregressive:
        return _generate_parallel(model, cond, opts, noise, max_len)
    if opts.method == "beam" and opts.beam > 1:
        return _beam_search(model, cond, n, opts.beam, max_len, device)
    tokens = torch.full((n, max_len), PAD_ID, dtype=torch.long, device=device)
    prev = torch.full((n,), BOS_ID, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    state = model.initial_decoder_state(cond)  # None: zeros
    for t in range(max_len):
        logits, state = model.decode_step(prev, state, None if cond is None else cond[:, t])
        logits = _never(logits)
        if opts.method == "sample":
            nxt = draw_tokens(logits, opts, noise, TOKEN_KEY + t)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        tokens[:, t] = nxt
        done |= nxt == EOS_ID
        if bool(done.all()):
            break
        prev = nxt
    return tokens


def _generate_parallel(model, cond, opts, noise, max_len) -> torch.Tensor:
    logits = model.token_logits(cond.transpose(1, 2))[:, :max_len].float()  # (B, W, V)
    B, W, V = logits.shape
    if opts.method == "sample":
        columns = [draw_tokens(_never(logits[:, t].clone(), (BOS_ID,)), opts, noise, TOKEN_KEY + t) for t in range(W)]
        tokens = torch.stack(columns, dim=1)  # PAD after EOS is part of this model: not excluded
    else:
        tokens = _never(logits.reshape(B * W, V), (BOS_ID,)).argmax(-1).view(B, W)
    after_eos = (tokens == EOS_ID).long().cumsum(1) - (tokens == EOS_ID).long() > 0
    return tokens.masked_fill(after_eos, PAD_ID)


def _beam_search(model, cond, n, K, max_len, device) -> torch.Tensor:
    V = model.cfg.vocab_size
    cond = None if cond is None else cond.repeat_interleave(K, dim=0)
    scores = torch.full((n, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    tokens = torch.full((n * K, max_len), PAD_ID, dtype=torch.long, device=device)
    finished = torch.zeros(n * K, dtype=torch.bool, device=device)
    only_pad = torch.full((V,), float("-inf"), device=device)
    only_pad[PAD_ID] = 0.0  # a finished hypothesis continues with PAD at no cost
    prev = torch.full((n * K,), BOS_ID, dtype=torch.long, device=device)
    state = model.initial_decoder_state(cond)  # None: zeros
    rows = torch.arange(n, device=device)[:, None] * K
    for t in range(max_len):
        logits, state = model.decode_step(prev, state, None if cond is None else cond[:, t])
        logp = torch.log_softmax(_never(logits), -1)
        logp = torch.where(finished[:, None], only_pad, logp)
        cand = (scores.view(-1, 1) + logp).view(n, K * V)
        scores, idx = cand.topk(K, dim=1)
        src = (rows + torch.div(idx, V, rounding_mode="floor")).view(-1)
        tok = (idx % V).view(-1)
        tokens = tokens[src]
        tokens[:, t] = tok
        state = tuple(s[:, src] for s in state)
        finished = finished[src] | (tok == EOS_ID)
        prev = tok
        if bool(finished.all()):
            break
    best = scores.argmax(dim=1)
    return tokens.view(n, K, max_len)[torch.arange(n, device=device), best]


# ---------------------------------------------------------------------------------------------
# What the scripts call


def _require_latents(model, what: str) -> None:
    if model.num_groups == 0:
        raise UserError(f"an LSTM language model (lstm-lm) has no latent variables to {what}; "
                        f"use a run of biva-lstm, biva or rnn-vae")


@torch.no_grad()
def sample_prior(model, n: int, opts: DecodeOptions, latent_temperature: float = 1.0, start: int = 0) -> torch.Tensor:
    """Sentences start..start+n-1 (token ids) from the prior: z ~ p(z) (scales times
    ``latent_temperature``), x ~ p(x | z)."""
    device = next(model.parameters()).device
    ids = torch.arange(start, start + n, device=device)
    cond = model.condition_prior(n, HashedNoise(opts.seed, ids), latent_temperature)
    return generate(model, cond, ids, opts)


@torch.no_grad()
def reconstruct(model, batch: dict, opts: DecodeOptions, from_level: int = 0) -> torch.Tensor:
    """Each sentence of ``batch`` through the posterior (levels <= from_level from the prior) and back."""
    _require_latents(model, "reconstruct through")
    levels = model.num_levels
    if not 0 <= from_level < levels:
        raise UserError(f"--from-level must be in 0..{levels - 1} for this model of {levels} latent level(s), "
                        f"got {from_level}")
    noise = HashedNoise(opts.seed, batch["index"])
    cond = model.condition_posterior(batch, noise, from_level)
    return generate(model, cond, batch["index"], opts)


@torch.no_grad()
def interpolate(model, batch: dict, steps: int, opts: DecodeOptions) -> torch.Tensor:
    """``steps`` sentences from the first sentence of ``batch`` to the second: every group's
    posterior mean interpolated linearly, decoded through the top-down path."""
    _require_latents(model, "interpolate in")
    if steps < 2:
        raise UserError(f"--steps must be at least 2 (the two ends), got {steps}")
    means = model.posterior_means(batch, HashedNoise(opts.seed, batch["index"]))
    alpha = torch.linspace(0.0, 1.0, steps, device=means[0].device)
    latents = []
    for m in means:  # (2, ...) per group
        a = alpha.view(-1, *([1] * (m.dim() - 1)))
        latents.append((1 - a) * m[0:1] + a * m[1:2])
    return generate(model, model.condition_latents(latents), torch.arange(steps), opts)


# ---------------------------------------------------------------------------------------------
# Sentences in and out


@dataclass
class EncodedSentences:
    batch: dict  # {"index", "tokens" (N, max_tokens + 1), "length"} of the usable sentences
    kept: list[str]
    skipped: list[tuple[str, str]]  # (sentence, why)


def encode_sentences(tokenizer: Tokenizer, sentences: list[str], max_tokens: int) -> EncodedSentences:
    """Sentences as a model batch; those with unknown words (word tokenizer), no words, or more than
    ``max_tokens`` pieces are skipped with the reason."""
    sentences = [s.strip() for s in sentences]
    ids = tokenizer.encode(sentences) if sentences else []
    rows, kept, skipped = [], [], []
    for sentence, pieces in zip(sentences, ids):
        if not pieces:
            skipped.append((sentence, "no words"))
        elif UNK_ID in pieces:
            words = sentence.split()
            unknown = sorted({words[i] for i, p in enumerate(pieces) if p == UNK_ID and i < len(words)})
            skipped.append((sentence, "unknown word(s): " + ", ".join(unknown or ["?"])))
        elif len(pieces) > max_tokens:
            skipped.append((sentence, f"{len(pieces)} pieces, more than the model's {max_tokens}"))
        else:
            rows.append(pieces + [EOS_ID])
            kept.append(sentence)
    tokens = torch.full((len(rows), max_tokens + 1), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    batch = {"index": torch.arange(len(rows)), "tokens": tokens,
             "length": torch.tensor([len(r) for r in rows], dtype=torch.long)}
    return EncodedSentences(batch, kept, skipped)


def to_text(tokenizer: Tokenizer, tokens: torch.Tensor) -> list[str]:
    return tokenizer.decode(tokens.cpu().tolist())
