"""What a text user expects from a sentence VAE, on tiny runs: unknown words read as UNK with a warning,
encode_text.py's latents, prompts, interpolating chosen levels only, and beam search with length
normalisation and n-best lists."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from script_utils import run_main as run_script
from test_text_scripts import biva_run, corpus, vae_run  # noqa: F401  (module fixtures: tiny runs)

from biva_text.decode import (DecodeOptions, encode_sentences, generate, generate_n_best, interpolation_latents,
                              length_normalizer, to_text)
from biva_text.report import load_text_run
from biva_text.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from shared.distributions import HashedNoise

KNOWN = "the big cat sees the dog ."
OTHER = "the old man likes the red car and the happy child !"


def batch_of(model, tokenizer, sentences):
    return encode_sentences(tokenizer, sentences, model.cfg.max_tokens)


def test_unknown_words_warn_and_encode_as_the_unknown_piece(biva_run, tmp_path, capsys):
    _, model, tokenizer = load_text_run(biva_run)
    encoded = batch_of(model, tokenizer, ["the zebra sees the okapi .", KNOWN])
    assert encoded.unknown == ["okapi", "zebra"] and not encoded.skipped
    row = encoded.batch["tokens"][0].tolist()
    assert row[1] == row[4] == UNK_ID and UNK_ID not in encoded.batch["tokens"][1].tolist()
    path = tmp_path / "in.txt"
    path.write_text(f"{KNOWN}\nthe zebra sees the okapi .\n")
    code, out, err = run_script("reconstruct_text", ["--run", biva_run, "--input", path, "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.count("> ") == 2 and out.count("< ") == 2
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 2 word(s) outside the run's vocabulary read as <unk>: okapi, zebra"]


def test_adjacent_unknown_words_are_named_and_read_as_one_unknown_piece_each(biva_run, tmp_path, capsys):
    """The word model's SentencePiece encode merges a run of unknown words into one <unk>: each must still
    be its own UNK, and the warning must name those words and no others."""
    _, model, tokenizer = load_text_run(biva_run)
    sentence = "the zebra okapi sees the dog and the happy child !"  # two unknown words in a row
    assert tokenizer.encode([sentence])[0].count(UNK_ID) == 1  # what SentencePiece alone gives
    encoded = batch_of(model, tokenizer, [sentence])
    assert encoded.unknown == ["okapi", "zebra"] and not encoded.skipped
    row, length = encoded.batch["tokens"][0].tolist(), int(encoded.batch["length"][0])
    assert length == len(sentence.split()) + 1 and row[length - 1] == EOS_ID
    assert [i for i, t in enumerate(row[:length - 1]) if t == UNK_ID] == [1, 2]
    known = tokenizer.encode(["the big cat sees the dog and the happy child !"])[0]
    assert row[3:length - 1] == known[3:]  # the words after them keep their own pieces
    assert tokenizer.encode_words([KNOWN, OTHER]) == tokenizer.encode([KNOWN, OTHER])  # no unknown word: as before
    path = tmp_path / "in.txt"
    path.write_text(sentence + "\n")
    code, out, err = run_script("reconstruct_text", ["--run", biva_run, "--input", path, "--device", "cpu"], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: 2 word(s) outside the run's vocabulary read as <unk>: okapi, zebra"]


def test_encode_text_writes_every_groups_posterior_mean_and_scale(biva_run, vae_run, tmp_path, capsys):
    path = tmp_path / "in.txt"
    too_long = " ".join(["the cat"] * 10)
    path.write_text(f"{KNOWN}\n{too_long}\n{OTHER}\nthe zebra sees the dog .\n")
    for run in (biva_run, vae_run):
        out = tmp_path / f"{run.name}.safetensors"
        code, _, err = run_script("encode_text", ["--run", run, "--input", path, "--out", out, "--batch-size", 2],
                                  capsys)
        assert code == 0, err
        assert "skipped: " in err and "zebra" in err
        _, model, tokenizer = load_text_run(run)
        tensors = load_file(str(out))
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        kept = [KNOWN, OTHER, "the zebra sees the dog ."]
        assert json.loads(meta["sentences"]) == kept and json.loads(meta["groups"]) == model.group_info
        assert set(tensors) == {f"level{g['level']}.{g['kind']}.{s}" for g in model.group_info for s in ("mean", "scale")}
        batch = batch_of(model, tokenizer, kept).batch
        means = model.posterior_means(batch, HashedNoise(0, batch["index"]))
        for g, info in enumerate(model.group_info):
            mean, scale = tensors[f"level{info['level']}.{info['kind']}.mean"], tensors[f"level{info['level']}.{info['kind']}.scale"]
            if hasattr(model, "ladder"):
                assert mean.shape == (3, *model.ladder.latent_shape(info["level"]))  # (N, C, T_i)
                assert mean.dim() == 3
            else:
                assert mean.shape == (3, model.cfg.latent_dim)
            assert scale.shape == mean.shape and bool((scale > 0).all())
            torch.testing.assert_close(mean, means[g].float(), atol=1e-5, rtol=1e-5)  # batches of 2 = one of 3
    assert len(model.group_info) == 1 and len(load_file(str(tmp_path / f"{biva_run.name}.safetensors"))) == 2 * 5


def test_prompt_is_continued(biva_run, capsys):
    for flags in ([], ["--greedy"], ["--beam", "3"]):
        code, out, err = run_script("sample_text", ["--run", biva_run, "--num", 4, "--prompt", "the big cat",
                                                    "--device", "cpu", *flags], capsys)
        assert code == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 4 and all(line.startswith("the big cat") for line in lines), lines
    code, _, err = run_script("sample_text", ["--run", biva_run, "--prompt", " ".join(["the"] * 13)], capsys)
    assert code == 2 and "--prompt" in err
    # The prompt goes through the decoder: prompting greedy decoding with its own first pieces changes nothing.
    _, model, _ = load_text_run(biva_run)
    ids = torch.arange(4)
    cond = model.condition_prior(4, HashedNoise(1, ids), 1.0)
    opts = DecodeOptions(method="greedy")
    free = generate(model, cond, ids, opts)
    checked = 0
    for i in range(4):
        prompt = free[i, :3].tolist()
        if EOS_ID not in prompt:
            assert torch.equal(generate(model, cond[i:i + 1], ids[i:i + 1], opts, prefix=prompt)[0], free[i])
            checked += 1
    assert checked


def test_levels_interpolate_only_the_chosen_levels(biva_run, capsys):
    _, model, tokenizer = load_text_run(biva_run)
    batch = batch_of(model, tokenizer, [KNOWN, OTHER]).batch
    means = model.posterior_means(batch, HashedNoise(0, batch["index"]))
    latents = interpolation_latents(model, batch, 5, levels=[2, 3])
    for g, info in enumerate(model.group_info):
        if info["level"] == 1:  # fixed at the first sentence's posterior mean
            assert all(torch.equal(row, means[g][0]) for row in latents[g])
        else:
            torch.testing.assert_close(latents[g][0], means[g][0])
            torch.testing.assert_close(latents[g][-1], means[g][1])
            assert not torch.allclose(latents[g][2], means[g][0])
    everything = interpolation_latents(model, batch, 5)
    assert not torch.allclose(everything[-1][-1], latents[-1][-1])  # level 1 moves without --levels
    code, out, err = run_script("interpolate_text", ["--run", biva_run, KNOWN, OTHER, "--steps", 3, "--levels", "2..",
                                                     "--device", "cpu"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 3, err
    for spec, message in (("4", "outside this model's levels 1..3"), ("a..b", "cannot read"), ("0", "numbered from 1")):
        code, _, err = run_script("interpolate_text", ["--run", biva_run, KNOWN, OTHER, "--levels", spec], capsys)
        assert code == 2 and message in err, (spec, err)


def teacher_forced_log_prob(model, cond, tokens):
    """log p(tokens | cond) (B,) through the decoder's steps, PAD and BOS excluded as when decoding."""
    prev = torch.full((tokens.shape[0],), BOS_ID)
    state, total = None, torch.zeros(tokens.shape[0])
    alive = torch.ones(tokens.shape[0], dtype=torch.bool)
    for t in range(tokens.shape[1]):
        logits, state = model.decode_step(prev, state, cond, t)
        logits[:, [PAD_ID, BOS_ID]] = float("-inf")
        logp = torch.log_softmax(logits, -1).gather(1, tokens[:, t:t + 1])[:, 0]
        total += torch.where(alive, logp, torch.zeros_like(logp))
        alive &= tokens[:, t] != EOS_ID
        prev = tokens[:, t]
    return total


@torch.no_grad()
def test_beam_search_n_best_sorted_by_normalised_score_and_beam_one_is_greedy(biva_run, capsys):
    _, model, tokenizer = load_text_run(biva_run)
    ids = torch.arange(3)
    cond = model.condition_prior(3, HashedNoise(5, ids), 1.5)  # varied latents: varied sentence lengths
    for alpha in (0.0, 0.6, 2.0):
        opts = DecodeOptions(method="beam", beam=5, n_best=4, length_penalty=alpha)
        tokens, scores = generate_n_best(model, cond, ids, opts)
        assert tokens.shape == (3, 4, model.cfg.max_tokens + 1) and scores.shape == (3, 4)
        assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first
        for k in range(4):  # each score is the hypothesis's own normalised log-probability
            length = ((tokens[:, k] != PAD_ID).sum(1)).float()
            expected = teacher_forced_log_prob(model, cond, tokens[:, k]) / length_normalizer(length, alpha)
            torch.testing.assert_close(scores[:, k], expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(generate(model, cond, ids, DecodeOptions(method="beam", beam=5, length_penalty=alpha)),
                           tokens[:, 0])
        one = generate(model, cond, ids, DecodeOptions(method="beam", beam=1, length_penalty=alpha))
        assert torch.equal(one, generate(model, cond, ids, DecodeOptions(method="greedy")))
    code, out, err = run_script("sample_text", ["--run", biva_run, "--num", 2, "--beam", 4, "--n-best", 3,
                                                "--device", "cpu"], capsys)
    assert code == 0, err
    blocks = [b.splitlines() for b in out.strip().split("\n\n")]
    assert [len(b) for b in blocks] == [3, 3]
    for block in blocks:
        values = [float(line.split()[0]) for line in block]
        assert values == sorted(values, reverse=True)
    code, _, err = run_script("sample_text", ["--run", biva_run, "--beam", 2, "--n-best", 3], capsys)
    assert code == 2 and "--n-best 3 needs --beam" in err
    assert to_text(tokenizer, tokens)[0][0] == to_text(tokenizer, tokens[:, 0])[0]
