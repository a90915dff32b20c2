"""Decoding sentences from the text models (docs/design.md §7): prior samples, reconstructions, interpolations.

Every model offers the decoder a conditioning sequence (B, T, C): BIVA's d_0 from the top-down path,
the RNN-VAE's z repeated over time, nothing for the LSTM LM. The LSTM then decodes token by token:

    sample   softmax with ``temperature``, optionally restricted to the top-p nucleus
    greedy   the most likely token at each step
    beam     beam search of width K; a hypothesis ends at EOS and is ranked by GNMT's length-normalised
             score log p(y) / lp(|y|), lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016; |y| counts the
             generated tokens, EOS included; alpha = ``length_penalty``, 0 = the plain total
             log-probability, which leans to short sentences). The same score ranks finished against
             live hypotheses during the search; ``n_best`` K' <= K returns the K' best with their scores.

A ``prefix`` (a prompt's pieces) is fed through the decoder first, as if the model had generated it,
and decoding continues after it; beam scores count the continuation only. The non-autoregressive
``biva`` has independent positions given z, so there the prefix simply fills the first positions.

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
the groups of the chosen ``levels`` (default all) linearly, keeps the others at the first
sentence's means, and decodes them through the top-down path; for the RNN-VAE that is its one
latent. Decoding after interpolation is greedy unless asked otherwise.

Sentences from users are encoded with the run's tokenizer; each word outside a word tokenizer's
vocabulary becomes its own unknown piece (the scripts name such words in one warning line).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from shared.distributions import HashedNoise
from shared.errors import UserError

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, UNK_TEXT, Tokenizer

METHODS = ("sample", "greedy", "beam")
TOKEN_KEY = 1 << 20  # noise keys of token draws (TOKEN_KEY + step), apart from the latent groups' keys


@dataclass
class DecodeOptions:
    method: str = "sample"  # sample | greedy | beam
    temperature: float = 1.0  # token softmax temperature (sample)
    top_p: float = 1.0  # nucleus mass (sample); 1 = the full distribution
    beam: int = 4  # width (beam)
    seed: int = 0
    length_penalty: float = 0.6  # GNMT's alpha (beam); 0 ranks by total log-probability
    n_best: int = 1  # hypotheses returned per sentence (beam)

    def validate(self) -> "DecodeOptions":
        if self.method not in METHODS:
            raise UserError(f"unknown decoding method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.beam < 1:
            raise UserError(f"--beam must be at least 1, got {self.beam}")
        if not self.length_penalty >= 0:
            raise UserError(f"--length-penalty must be at least 0, got {self.length_penalty}")
        if self.n_best > 1 and (self.method != "beam" or self.n_best > self.beam):
            raise UserError(f"--n-best {self.n_best} needs --beam K with K >= {self.n_best}")
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
def generate(model, cond: torch.Tensor | None, ids: torch.Tensor, opts: DecodeOptions,
             prefix: list[int] | None = None) -> torch.Tensor:
    """Token ids (n, max_tokens + 1) for the sentences ``ids`` (n,): ``prefix``, pieces, EOS, PAD after
    it (or cut at the length limit). ``cond`` (n, T, C) or None."""
    opts.validate()
    if opts.method == "beam" and model.autoregressive:
        return generate_n_best(model, cond, ids, opts, prefix)[0][:, 0]
    max_len = model.cfg.max_tokens + 1
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.shape[0]
    noise = HashedNoise(opts.seed, ids)
    prefix = _check_prefix(prefix, max_len)
    if not model.autoregressive:
        return _generate_parallel(model, cond, opts, noise, max_len, prefix)
    tokens = torch.full((n, max_len), PAD_ID, dtype=torch.long, device=device)
    state, prev = _feed_prefix(model, cond, prefix, n, device)
    tokens[:, :len(prefix)] = torch.tensor(prefix, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for t in range(len(prefix), max_len):
        logits, state = model.decode_step(prev, state, cond, t)
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


@torch.no_grad()
def generate_n_best(model, cond: torch.Tensor | None, ids: torch.Tensor, opts: DecodeOptions,
                    prefix: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search: token ids (n, n_best, max_tokens + 1) and their length-normalised scores
    (n, n_best), best first."""
    opts.validate()
    if opts.method != "beam" or not model.autoregressive:
        raise UserError("--n-best needs beam search (--beam K) and a model with an LSTM decoder")
    max_len = model.cfg.max_tokens + 1
    device = next(model.parameters()).device
    prefix = _check_prefix(prefix, max_len)
    tokens, scores = _beam_search(model, cond, ids.shape[0], opts.beam, max_len, device, opts.length_penalty, prefix)
    return tokens[:, :opts.n_best], scores[:, :opts.n_best]


def _check_prefix(prefix: list[int] | None, max_len: int) -> list[int]:
    prefix = list(prefix or [])
    if len(prefix) >= max_len:
        raise UserError(f"the prompt has {len(prefix)} pieces; the model writes at most {max_len - 1}, so give a "
                        "shorter --prompt")
    return prefix


def _feed_prefix(model, cond, prefix: list[int], n: int, device):
    """The decoder's state after reading BOS and the prefix, and the next input token (n,)."""
    prev = torch.full((n,), BOS_ID, dtype=torch.long, device=device)
    state = model.initial_decoder_state(cond)  # None: zeros
    for t, token in enumerate(prefix):
        _, state = model.decode_step(prev, state, cond, t)
        prev = torch.full((n,), token, dtype=torch.long, device=device)
    return state, prev


def _generate_parallel(model, cond, opts, noise, max_len, prefix) -> torch.Tensor:
    logits = model.token_logits(cond.transpose(1, 2))[:, :max_len].float()  # (B, W, V)
    B, W, V = logits.shape
    if opts.method == "sample":
        columns = [draw_tokens(_never(logits[:, t].clone(), (BOS_ID,)), opts, noise, TOKEN_KEY + t) for t in range(W)]
        tokens = torch.stack(columns, dim=1)  # PAD after EOS is part of this model: not excluded
    else:
        tokens = _never(logits.reshape(B * W, V), (BOS_ID,)).argmax(-1).view(B, W)
    tokens[:, :len(prefix)] = torch.tensor(prefix, dtype=torch.long, device=tokens.device)
    after_eos = (tokens == EOS_ID).long().cumsum(1) - (tokens == EOS_ID).long() > 0
    return tokens.masked_fill(after_eos, PAD_ID)


def length_normalizer(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's lp(n) = ((5 + n) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    return ((5.0 + length.float()) / 6.0) ** alpha


def _beam_search(model, cond, n, K, max_len, device, alpha, prefix) -> tuple[torch.Tensor, torch.Tensor]:
    V = model.cfg.vocab_size
    state, prev = _feed_prefix(model, cond, prefix, n, device)
    state = None if state is None else tuple(s.repeat_interleave(K, dim=1) for s in state)
    prev = prev.repeat_interleave(K)
    cond = None if cond is None else cond.repeat_interleave(K, dim=0)
    scores = torch.full((n, K), float("-inf"), device=device)  # total log-probability of the continuation
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    lengths = torch.zeros(n * K, device=device)  # generated tokens, EOS included
    tokens = torch.full((n * K, max_len), PAD_ID, dtype=torch.long, device=device)
    tokens[:, :len(prefix)] = torch.tensor(prefix, dtype=torch.long, device=device)
    finished = torch.zeros(n * K, dtype=torch.bool, device=device)
    only_pad = torch.full((V,), float("-inf"), device=device)
    only_pad[PAD_ID] = 0.0  # a finished hypothesis continues with PAD at no cost
    rows = torch.arange(n, device=device)[:, None] * K
    for t in range(len(prefix), max_len):
        logits, state = model.decode_step(prev, state, cond, t)
        logp = torch.log_softmax(_never(logits), -1)
        logp = torch.where(finished[:, None], only_pad, logp)
        cand = scores.view(-1, 1) + logp  # (n*K, V)
        cand_len = lengths + (~finished).float()
        ranked = (cand / length_normalizer(cand_len, alpha)[:, None]).view(n, K * V)
        _, idx = ranked.topk(K, dim=1)
        scores = cand.view(n, K * V).gather(1, idx)
        src = (rows + torch.div(idx, V, rounding_mode="floor")).view(-1)
        tok = (idx % V).view(-1)
        tokens = tokens[src]
        tokens[:, t] = tok
        state = tuple(s[:, src] for s in state)
        lengths = cand_len[src]
        finished = finished[src] | (tok == EOS_ID)
        prev = tok
        if bool(finished.all()):
            break
    normalised = scores / length_normalizer(lengths, alpha).view(n, K)
    normalised, order = normalised.sort(dim=1, descending=True)
    tokens = tokens.view(n, K, max_len).gather(1, order[:, :, None].expand(n, K, max_len))
    return tokens, normalised


# ---------------------------------------------------------------------------------------------
# What the scripts call


def _require_latents(model, what: str) -> None:
    if model.num_groups == 0:
        raise UserError(f"an LSTM language model (lstm-lm) has no latent variables to {what}; "
                        f"use a run of biva-lstm, biva or rnn-vae")


def _decode(model, cond, ids, opts: DecodeOptions, prefix=None):
    """``generate``'s tokens (n, L), or with ``opts.n_best`` > 1 ``generate_n_best``'s (tokens, scores)."""
    if opts.n_best > 1:
        return generate_n_best(model, cond, ids, opts, prefix)
    return generate(model, cond, ids, opts, prefix)


@torch.no_grad()
def sample_prior(model, n: int, opts: DecodeOptions, latent_temperature: float = 1.0, start: int = 0,
                 prefix: list[int] | None = None):
    """Sentences start..start+n-1 (token ids) from the prior: z ~ p(z) (scales times
    ``latent_temperature``), x ~ p(x | z), each continuing ``prefix`` when one is given.
    With ``opts.n_best`` > 1: (tokens (n, n_best, L), scores (n, n_best))."""
    device = next(model.parameters()).device
    ids = torch.arange(start, start + n, device=device)
    cond = model.condition_prior(n, HashedNoise(opts.seed, ids), latent_temperature)
    return _decode(model, cond, ids, opts, prefix)


@torch.no_grad()
def reconstruct(model, batch: dict, opts: DecodeOptions, from_level: int = 0, posterior_mean: bool = False):
    """Each sentence of ``batch`` through the posterior (levels <= from_level from the prior) and back.
    ``posterior_mean``: every group at its posterior mean instead of a draw z ~ q(z | x) (only with
    from_level 0), so that greedy or beam decoding gives one reconstruction whatever the seed."""
    _require_latents(model, "reconstruct through")
    levels = model.num_levels
    if not 0 <= from_level < levels:
        raise UserError(f"--from-level must be in 0..{levels - 1} for this model of {levels} latent level(s), "
                        f"got {from_level}")
    if posterior_mean and from_level:
        raise UserError("--posterior-mean keeps every latent level at its posterior mean; it takes no --from-level")
    noise = HashedNoise(opts.seed, batch["index"])
    if posterior_mean:
        cond = model.condition_latents(model.posterior_means(batch, noise))
    else:
        cond = model.condition_posterior(batch, noise, from_level)
    return _decode(model, cond, batch["index"], opts)


def interpolation_latents(model, batch: dict, steps: int, levels: list[int] | None = None,
                          seed: int = 0) -> list[torch.Tensor]:
    """Per group (steps, ...): the posterior means of the chosen ``levels`` (default all) interpolated
    linearly from the first sentence of ``batch`` to the second, the other groups at the first's."""
    _require_latents(model, "interpolate in")
    if steps < 2:
        raise UserError(f"--steps must be at least 2 (the two ends), got {steps}")
    means = model.posterior_means(batch, HashedNoise(seed, batch["index"]))
    alpha = torch.linspace(0.0, 1.0, steps, device=means[0].device)
    latents = []
    for m, info in zip(means, model.group_info):  # (2, ...) per group
        a = alpha.view(-1, *([1] * (m.dim() - 1)))
        if levels is not None and info["level"] not in levels:
            a = torch.zeros_like(a)
        latents.append((1 - a) * m[0:1] + a * m[1:2])
    return latents


@torch.no_grad()
def interpolate(model, batch: dict, steps: int, opts: DecodeOptions, levels: list[int] | None = None):
    """``steps`` sentences from the first sentence of ``batch`` to the second (see the module doc)."""
    latents = interpolation_latents(model, batch, steps, levels, opts.seed)
    return _decode(model, model.condition_latents(latents), torch.arange(steps), opts)


@torch.no_grad()
def posterior_stats(model, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, scale) of q for every latent group, in ``group_info`` order, parents at their means
    (the quantities of active units): ladder groups (B, C, T_i), the RNN-VAE's (B, C)."""
    _require_latents(model, "encode to")
    if hasattr(model, "ladder"):
        e0, _ = model.embed(batch, None)
        out = model.ladder(e0, None, mode="posterior_mean")
        return list(zip(out.means, out.scales))
    q = model.posterior(batch)
    return [(q.mu, q.sigma)]


# ---------------------------------------------------------------------------------------------
# Sentences in and out


@dataclass
class EncodedSentences:
    batch: dict  # {"index", "tokens" (N, max_tokens + 1), "length"} of the usable sentences
    kept: list[str]
    skipped: list[tuple[str, str]]  # (sentence, why)
    unknown: list[str] = field(default_factory=list)  # words read as the unknown piece, sorted


def encode_sentences(tokenizer: Tokenizer, sentences: list[str], max_tokens: int) -> EncodedSentences:
    """Sentences as a model batch. Each word outside a word tokenizer's vocabulary becomes its own UNK
    (``Tokenizer.encode_words``: one id per word, as the word model reads every sentence it trains on) and
    is listed in ``unknown``; sentences with no words or more than ``max_tokens`` pieces are skipped with
    the reason."""
    sentences = [s.strip() for s in sentences]
    ids = tokenizer.encode_words(sentences) if sentences else []
    rows, kept, skipped, unknown = [], [], [], set()
    for sentence, pieces in zip(sentences, ids):
        if not pieces:
            skipped.append((sentence, "no words"))
        elif len(pieces) > max_tokens:
            skipped.append((sentence, f"{len(pieces)} pieces, more than the model's {max_tokens}"))
        else:
            if UNK_ID in pieces and tokenizer.model_type == "word":  # id i is word i
                unknown |= {word for word, p in zip(sentence.split(), pieces) if p == UNK_ID}
            rows.append(pieces + [EOS_ID])
            kept.append(sentence)
    tokens = torch.full((len(rows), max_tokens + 1), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    batch = {"index": torch.arange(len(rows)), "tokens": tokens,
             "length": torch.tensor([len(r) for r in rows], dtype=torch.long)}
    return EncodedSentences(batch, kept, skipped, sorted(unknown))


def warn_unknown(encoded: EncodedSentences, file=None) -> None:
    """One line on stderr naming the words read as the unknown piece, if any."""
    if encoded.unknown:
        print(f"warning: {len(encoded.unknown)} word(s) outside the run's vocabulary read as {UNK_TEXT}: "
              f"{', '.join(encoded.unknown)}", file=file or sys.stderr)


def encode_for_script(tokenizer: Tokenizer, sentences: list[str], max_tokens: int, source: str) -> EncodedSentences:
    """``encode_sentences`` as the scripts use it: each skipped sentence and the unknown words said on
    stderr, and a UserError when nothing is left."""
    encoded = encode_sentences(tokenizer, sentences, max_tokens)
    for sentence, why in encoded.skipped:
        print(f"skipped: {sentence!r} ({why})", file=sys.stderr)
    warn_unknown(encoded)
    if not encoded.kept:
        raise UserError(f"no usable sentence in {source}: all {len(sentences)} were skipped "
                        f"({encoded.skipped[0][1]} in the first)")
    return encoded


def to_text(tokenizer: Tokenizer, tokens: torch.Tensor) -> list[str]:
    """Sentences of token ids (n, L), or lists of sentences for n-best ids (n, K, L)."""
    if tokens.dim() == 3:
        n, K, L = tokens.shape
        flat = tokenizer.decode(tokens.reshape(n * K, L).cpu().tolist())
        return [flat[i * K:(i + 1) * K] for i in range(n)]
    return tokenizer.decode(tokens.cpu().tolist())
