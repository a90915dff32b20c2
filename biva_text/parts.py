"""What every text model is built from: the token embedding with its tied output layer, the token
log-likelihoods, the LSTM decoder, and the mixin of batch handling and KL warm-up (see model.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.distributions import standard_normal_like
from shared.errors import UserError
from shared.model import ModelOutput

from .model_config import TextModelConfig
from .names import NON_AUTOREGRESSIVE
from .tokenizer import BOS_ID, PAD_ID, UNK_ID


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
