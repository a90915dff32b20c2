#!/usr/bin/env python
"""Reconstruct sentences through a text run's posterior: x -> z ~ q(z | x) -> decoder.

    python scripts/reconstruct_text.py --run RUN --input sentences.txt
    echo "the cat sat on the mat ." | python scripts/reconstruct_text.py --run RUN
    python scripts/reconstruct_text.py --run RUN --input s.txt --from-level 3 --beam 5
    python scripts/reconstruct_text.py --run RUN --split test --num 5    # sentences the run never trained on

One sentence per line, tokenised like the training text (BookCorpus: lower-cased, spaces around
punctuation); or, with --split, --num sentences of the run's own split (its held-out valid or test
sentences, or train), a random draw seeded by --seed (report_text.py's --max-sentences draw). Prints each input ("> ") beside its reconstruction ("< "). Decoding is greedy unless
--sample or --beam is given. --from-level k keeps the posterior of levels above k and draws levels
<= k from the conditional prior (as for images; 0 = the full posterior). --posterior-mean decodes
every latent at its posterior mean instead of a draw from the posterior: with greedy or beam decoding
the same sentence then always gives the same reconstruction. Words outside a word
tokenizer's vocabulary read as <unk> (named in one warning line on stderr); sentences with too many
pieces are skipped and counted on stderr. --beam K --n-best K' prints the K' best reconstructions
with their length-normalised scores (nats).
"""
from __future__ import annotations

import sys
from pathlib import Path

from biva_text.cli import add_decoding_flags, check_n_best, n_best_lines, open_for_decoding, read_input
from shared.cli import ArgumentParser, nonneg_int, positive_int
from shared.errors import UserError, run_cli
from shared.run_dir import resolve_run

BATCH = 256


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory (--output-dir of train_text.py), a folder of scripts/export.py, or a hub id owner/name")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help="text file, one sentence per line (default: standard input)")
    source.add_argument("--split", choices=["test", "valid", "train"],
                        help="reconstruct sentences of the run's own split instead (the run's data, read again "
                             "through its token cache; see --num)")
    p.add_argument("--num", type=positive_int,
                   help="with --split: how many sentences, drawn at random by --seed (default 10)")
    p.add_argument("--from-level", type=nonneg_int, default=0,
                   help="draw latent levels <= k from the prior, keep the posterior above (default 0)")
    p.add_argument("--posterior-mean", action="store_true",
                   help="decode from the posterior means of the latents instead of a draw z ~ q(z | x)")
    add_decoding_flags(p, "greedy")
    args = p.parse_args(argv)
    check_n_best(p, args)
    if args.num is not None and args.split is None:
        p.error("--num counts sentences of --split; pass --split test (or valid, train), or give --input")
    args.run = resolve_run(args.run)
    if args.input is not None and not args.input.is_file():
        p.error(f"--input {args.input} is not a file")
    return args


def main(argv=None) -> list[tuple[str, str]]:
    args = parse_args(argv)
    if args.split is not None:
        from biva_text.report import split_sentences

        sentences = split_sentences(args.run, args.split, args.num or 10, args.seed)
        source = f"the {args.split} split of {args.run}"
    else:
        sentences = read_input(args.input)
        source = args.input or "standard input"
    if not sentences:
        raise UserError(f"{source} has no sentence; give one sentence per line")

    from biva_text.decode import encode_for_script, reconstruct, to_text

    model, tokenizer, opts = open_for_decoding(args)
    encoded = encode_for_script(tokenizer, sentences, model.cfg.max_tokens, source)
    pairs = []
    for start in range(0, len(encoded.kept), BATCH):
        batch = {k: v[start:start + BATCH].to(next(model.parameters()).device) for k, v in encoded.batch.items()}
        out = reconstruct(model, batch, opts, args.from_level, args.posterior_mean)
        if opts.n_best > 1:
            tokens, scores = out
            for original, texts, row in zip(encoded.kept[start:start + BATCH], to_text(tokenizer, tokens), scores.tolist()):
                pairs.append((original, texts[0]))
                print("\n".join([f"> {original}", *n_best_lines(texts, row, "< "), ""]))
        else:
            pairs += zip(encoded.kept[start:start + BATCH], to_text(tokenizer, out))
    if opts.n_best == 1:
        for original, rebuilt in pairs:
            print(f"> {original}\n< {rebuilt}\n")
    if encoded.skipped:
        print(f"reconstructed {len(encoded.kept)} sentences, skipped {len(encoded.skipped)} of {len(sentences)}",
              file=sys.stderr)
    return pairs


if __name__ == "__main__":
    run_cli(main)
