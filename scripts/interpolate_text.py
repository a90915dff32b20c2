#!/usr/bin/env python
"""Interpolate between two sentences in a text run's latent space.

    python scripts/interpolate_text.py --run RUN "the first sentence ." "and the second one ." --steps 8
    python scripts/interpolate_text.py --run RUN "the first sentence ." "and the second one ." --levels 5..

Both sentences are encoded to the posterior means of all latent groups (each group's mean given
its parents at their means), the groups of the --levels chosen (default all) are interpolated
linearly in --steps points from the first sentence to the second while every other group stays at
the first sentence's mean, and each point is decoded through the top-down path and the decoder
(greedy unless --sample or --beam is given). For the RNN-VAE that is its single latent (level 1).
Sentences should be tokenised like the training text; words outside the vocabulary read as <unk>
(with a warning).

--levels: levels are numbered 1 (nearest the words) to L (the top); give levels and inclusive
ranges separated by commas, open at either end: 7, 3,4, 5..7, 5.. (5 to the top), ..2.
"""
from __future__ import annotations


from biva_text.cli import (add_decoding_flags, check_n_best, levels_arg, n_best_lines,
                           open_for_decoding, resolve_levels)
from shared.cli import ArgumentParser, positive_int
from shared.errors import UserError, run_cli
from shared.run_dir import resolve_run


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory (--output-dir of train_text.py), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("first", help="the sentence to start from")
    p.add_argument("second", help="the sentence to end at")
    p.add_argument("--steps", type=positive_int, default=8, help="sentences on the path, both ends included (default 8)")
    p.add_argument("--levels", type=levels_arg, metavar="SPEC",
                   help="latent levels to interpolate, e.g. 5.. or 3,4 or 2..4 (default: all); the others stay at "
                        "the first sentence's posterior mean")
    add_decoding_flags(p, "greedy")
    args = p.parse_args(argv)
    check_n_best(p, args)
    args.run = resolve_run(args.run)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the two ends)")
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)

    from biva_text.decode import encode_sentences, interpolate, to_text, warn_unknown

    model, tokenizer, opts = open_for_decoding(args)
    levels = resolve_levels(args.levels, model.num_levels) if args.levels else None
    encoded = encode_sentences(tokenizer, [args.first, args.second], model.cfg.max_tokens)
    if encoded.skipped:
        sentence, why = encoded.skipped[0]
        raise UserError(f"cannot encode {sentence!r}: {why}; use a shorter sentence")
    warn_unknown(encoded)
    batch = {k: v.to(next(model.parameters()).device) for k, v in encoded.batch.items()}
    out = interpolate(model, batch, args.steps, opts, levels)
    if opts.n_best > 1:
        tokens, scores = out
        hypotheses = to_text(tokenizer, tokens)
        for i, (texts, row) in enumerate(zip(hypotheses, scores.tolist())):
            print("\n".join(n_best_lines(texts, row, f"{i / (args.steps - 1):.2f}") + [""]))
        return [texts[0] for texts in hypotheses]
    sentences = to_text(tokenizer, out)
    for i, sentence in enumerate(sentences):
        print(f"{i / (args.steps - 1):.2f}  {sentence}")
    return sentences


if __name__ == "__main__":
    run_cli(main)
