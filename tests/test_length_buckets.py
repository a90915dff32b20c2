"""Length buckets, text without padding waste: length-bucketed batches, and a sentence's bound that does not
depend on the batch it is in while the LSTM and the softmax run only where a batch has tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import biva_text.parts as text_parts  # LOGIT_ROWS: the chunked softmax's rows
from biva_text.data import TextDataset, TokenArray
from biva_text.model import build_text_model
from biva_text.presets import get_preset
from biva_text.tokenizer import BOS_ID, EOS_ID, PAD_ID
from shared.bounds import elbo, iw_bound
from shared.config import RunConfig, replace, to_dict
from shared.distributions import HashedNoise
from shared.batching import BatchPlan
from shared.engine import Trainer

V, MAX_TOKENS = 30, 12


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_text_model(get_preset("tiny", name, vocab_size=V, max_tokens=MAX_TOKENS).model).eval()


def make_batch(lengths, seed: int = 0, index=None) -> dict:
    """Store rows of width max_tokens + 1: pieces (ids >= 4), EOS, then PAD; lengths count the EOS."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), MAX_TOKENS + 1), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, : n - 1] = torch.randint(4, V, (n - 1,), generator=g)
        tokens[i, n - 1] = EOS_ID
    index = torch.arange(len(lengths)) if index is None else torch.as_tensor(index)
    return {"index": index, "tokens": tokens, "length": torch.tensor(lengths)}


def random_lengths(n: int, seed: int = 0) -> torch.Tensor:
    """Predicted tokens per sentence, 2 to 41 (the paper's 40 pieces + EOS)."""
    return torch.randint(2, 42, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- (a) length-bucketed batches

def epoch_batches(plan_args: dict, epoch: int, world: int, accum: int, start: int = 0) -> list[list[int]]:
    """The global batches of ``epoch`` from ``start``, put together from every rank's micro-batches
    (each rank its own plan object, as each process builds its own)."""
    per_rank = [list(BatchPlan(**plan_args, world=world, rank=r, accum=accum).micro_batches(epoch, start))
                for r in range(world)]
    steps = len(per_rank[0]) // accum
    return [sum((per_rank[r][s * accum + j] for r in range(world) for j in range(accum)), []) for s in range(steps)]


def spread(batches, lengths) -> float:
    return float(np.mean([int(lengths[b].max() - lengths[b].min()) for b in batches]))


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 2)])
def test_bucketed_batches_visit_every_sentence_once_and_resume(world, accum):
    n, B = 4096, 16  # 256 batches: four pools of 64
    lengths = random_lengths(n)
    args = dict(n=n, global_batch=B, seed=7, lengths=lengths)
    for epoch in (0, 1):
        batches = epoch_batches(args, epoch, world, accum)
        assert len(batches) == n // B and all(len(b) == B for b in batches)
        assert sorted(sum(batches, [])) == list(range(n))  # every sentence exactly once
        # Resuming mid-epoch (a fresh plan, as after a restart) continues with the same batches.
        assert epoch_batches(args, epoch, world, accum, start=101) == batches[101:]
    # Each epoch makes new batches, not the same buckets in a new order.
    first, second = ({frozenset(b) for b in epoch_batches(args, e, world, accum)} for e in (0, 1))
    assert len(first & second) < 0.1 * len(first)
    # The same global batches whatever the number of processes and accumulation steps.
    assert [sorted(b) for b in epoch_batches(args, 0, world, accum)] == \
        [sorted(b) for b in epoch_batches(args, 0, 1, 1)]
    # Length-homogeneous, unlike a plain permutation; and the batch order is shuffled, not sorted.
    plain = epoch_batches(dict(args, lengths=None), 0, world, accum)
    bucketed = epoch_batches(args, 0, world, accum)
    assert spread(bucketed, lengths) < 0.2 * spread(plain, lengths)
    means = np.array([float(lengths[b].float().mean()) for b in bucketed])
    assert 0.3 < float(np.mean(np.diff(means) > 0)) < 0.7  # sorted pools in a row would rise ~always


def test_bucketed_plan_drops_a_random_remainder_each_epoch():
    n, B = 1000, 24  # 41 full batches, 16 sentences left over
    lengths = random_lengths(n, seed=1)
    plan = BatchPlan(n, B, 1, 0, 1, seed=3, lengths=lengths)
    seen = []
    for epoch in range(3):
        flat = sum(plan.micro_batches(epoch, 0), [])
        assert len(flat) == len(set(flat)) == 41 * B
        seen.append(set(range(n)) - set(flat))
    assert seen[0] != seen[1]  # not always the same (e.g. the longest) sentences left out


def test_text_trainer_draws_length_buckets(tmp_path):
    """The text presets switch buckets on (recorded in config.json); the engine then sorts by the
    dataset's lengths."""
    preset = get_preset("tiny", "lstm-lm", vocab_size=V, max_tokens=MAX_TOKENS)
    assert preset.train.length_buckets and not RunConfig("image", "x", {}, {}).train.length_buckets
    n = 512
    lengths = torch.randint(2, MAX_TOKENS + 2, (n,), generator=torch.Generator().manual_seed(2))
    tokens = make_batch(lengths.tolist())["tokens"].numpy().astype(np.uint16)
    data = TextDataset(TokenArray(tokens, lengths.numpy().astype(np.int32)))
    run = RunConfig(modality="text", preset="tiny", model=to_dict(preset.model), data={},
                    train=replace(preset.train, batch_size=32, max_steps=2))
    assert run.to_json()["train"]["length_buckets"] is True
    from script_utils import load_script

    from shared.cli import training_overrides

    parse = load_script("train_text").parse_args
    assert training_overrides(parse(["--no-length-buckets"]))["length_buckets"] is False
    assert "length_buckets" not in training_overrides(parse([]))  # the preset's (True) stays
    trainer = Trainer(run, lambda: build_text_model(preset.model), data, data, tmp_path / "run")
    batch = next(trainer._loader())[0]
    assert batch["index"].tolist() == next(BatchPlan(n, 32, 1, 0, 1, run.train.seed, lengths=lengths).micro_batches(0, 0))
    assert int(batch["length"].max() - batch["length"].min()) <= 1


# ---------------------------------------------------------------- (b) the bound does not depend on the batch

@pytest.mark.parametrize("name", ["biva-lstm", "rnn-vae", "lstm-lm"])
def test_a_sentence_bound_is_the_same_in_any_batch(name):
    model = make_model(name)
    full = MAX_TOKENS + 1
    batch = make_batch([full, 3, full, 7, full - 1], seed=1, index=[10, 11, 12, 13, 14])
    together = elbo(model, batch, seed=5).bound()
    for i in (1, 3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        alone = elbo(model, one, seed=5).bound()
        torch.testing.assert_close(alone, together[i:i + 1], rtol=1e-5, atol=1e-5)
        # ... and with the store row cut to the sentence (nothing past its EOS handed in at all).
        cut = dict(one, tokens=one["tokens"][:, : int(one["length"])])
        torch.testing.assert_close(elbo(model, cut, seed=5).bound(), alone, rtol=1e-5, atol=1e-5)
    if name != "lstm-lm":  # L_K too (no gradient: the chunked softmax path)
        k = iw_bound(model, batch, 6, seed=2)
        torch.testing.assert_close(iw_bound(model, {kk: v[1:2] for kk, v in batch.items()}, 6, seed=2), k[1:2],
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- (c) truncated = full padded computation

def reference_log_likelihood(decoder, io, tokens, lengths, cond):
    """Textbook teacher forcing over every padded position T, logits (B, T, V), masked sum."""
    B, T = tokens.shape
    prev = torch.cat([torch.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], dim=1)
    x = io.embedding(prev) * io.dim ** 0.5
    if cond is not None:
        x = torch.cat([x, decoder.read_cond(cond)], dim=2)  # the config's view of d_0 (scaled for biva-lstm)
    h, _ = decoder.lstm(x, decoder.initial_state(cond))
    logits = torch.nn.functional.linear(decoder.proj(h), io.embedding.weight, io.out_bias)
    logp = torch.log_softmax(logits.float(), -1).gather(2, tokens[:, :, None]).squeeze(2)
    return torch.where(torch.arange(T)[None] < lengths[:, None], logp, torch.zeros_like(logp)).sum(1)


@pytest.mark.parametrize("name", ["biva-lstm", "rnn-vae", "lstm-lm"])
@pytest.mark.parametrize("logit_rows", [text_parts.LOGIT_ROWS, 5])
def test_truncated_gathered_likelihood_equals_the_full_padded_one(name, logit_rows, monkeypatch):
    monkeypatch.setattr(text_parts, "LOGIT_ROWS", logit_rows)  # 5: the chunked softmax (without autograd)
    model = make_model(name, seed=3).train()
    T = model.cfg.seq_len
    lengths = torch.tensor([4, 9, 2, 6])  # the longest (9) well below T: the LSTM stops there
    tokens = torch.nn.functional.pad(make_batch(lengths.tolist(), seed=4)["tokens"], (0, T - MAX_TOKENS - 1))
    cond_dim = model.decoder.cond_dim
    cond = torch.randn(4, T, cond_dim, generator=torch.Generator().manual_seed(0)) if cond_dim else None
    fast = model.decoder.log_likelihood(model.io, tokens, lengths, cond)
    slow = reference_log_likelihood(model.decoder, model.io, tokens, lengths, cond)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # The same gradients, too.
    params = [model.io.embedding.weight, model.io.out_bias, model.decoder.proj.weight, model.decoder.lstm.weight_hh_l0]
    g_fast = torch.autograd.grad(fast.sum(), params)
    g_slow = torch.autograd.grad(slow.sum(), params)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.decoder.log_likelihood(model.io, tokens, lengths, cond), slow.detach(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logit_rows", [text_parts.LOGIT_ROWS, 7])
def test_non_autoregressive_likelihood_equals_all_positions(logit_rows, monkeypatch):
    monkeypatch.setattr(text_parts, "LOGIT_ROWS", logit_rows)
    model = make_model("biva")
    batch = make_batch([4, 8, 13], seed=3)
    noise = HashedNoise(0, batch["index"])
    with torch.no_grad():
        out = model(batch, noise)
        d0 = model.ladder(model.embed(batch, noise)[0], noise).d0
        logp = torch.log_softmax(model.token_logits(d0), -1)[:, : MAX_TOKENS + 1]  # every position, then cut
    manual = logp.gather(2, batch["tokens"][:, :, None]).squeeze(2).sum(1)
    torch.testing.assert_close(out.log_px, manual, rtol=1e-5, atol=1e-5)
