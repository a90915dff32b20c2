#!/usr/bin/env python
"""Sample sentences from a text run's prior: z ~ p(z), then the decoder.

    python scripts/sample_text.py --run RUN --num 20
    python scripts/sample_text.py --run RUN --num 10 --temperature 0.8 --top-p 0.9 --latent-temperature 0.7
    python scripts/sample_text.py --run RUN --greedy          # or --beam 5
    python scripts/sample_text.py --run RUN --prompt "the old man" --num 5
    python scripts/sample_text.py --run RUN --beam 8 --n-best 3 --num 2

Sampling (the default) draws each token from the softmax at --temperature, restricted to the top-p
nucleus; --greedy and --beam K decode the most likely continuation given the sampled latents.
--latent-temperature scales every prior standard deviation. Sample i is the same for any --num
with the same --seed. The LSTM LM (lstm-lm) samples without latents.

--prompt continues a prefix: z is drawn from the prior as usual, the prompt's pieces are fed
through the decoder as if it had written them, and decoding continues after them (each sentence
printed starts with the prompt; words outside the vocabulary read as <unk>, with a warning). --beam
ranks hypotheses by GNMT's length-normalised log-probability (--length-penalty); --n-best K prints
the K best per sentence with that score (nats, continuation only), best first.
"""
from __future__ import annotations

from pathlib import Path

from biva_text.cli import add_decoding_flags, check_n_best, n_best_lines, open_for_decoding
from shared.cli import ArgumentParser, positive_int
from shared.errors import UserError, run_cli
from shared.run_dir import resolve_run


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory (--output-dir of train_text.py), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("--num", type=positive_int, default=20, help="sentences to draw (default 20)")
    p.add_argument("--output", type=Path, help="also write the sentences to this file, one per line")
    p.add_argument("--prompt", help="text every sentence starts with, tokenised like the training text (default: none)")
    add_decoding_flags(p, "sample")
    args = p.parse_args(argv)
    check_n_best(p, args)
    args.run = resolve_run(args.run)
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)

    from biva_text.decode import encode_sentences, sample_prior, to_text, warn_unknown

    model, tokenizer, opts = open_for_decoding(args)
    prefix = None
    if args.prompt is not None:
        encoded = encode_sentences(tokenizer, [args.prompt], model.cfg.max_tokens)
        if encoded.skipped:
            raise UserError(f"cannot use --prompt {args.prompt!r}: {encoded.skipped[0][1]}; give a shorter prompt")
        warn_unknown(encoded)
        prefix = encoded.batch["tokens"][0, :int(encoded.batch["length"][0]) - 1].tolist()  # without EOS
    sentences, lines = [], []
    for start in range(0, args.num, 256):  # bounded memory for a large --num; draws are keyed per sentence
        out = sample_prior(model, min(256, args.num - start), opts, args.latent_temperature, start=start, prefix=prefix)
        if opts.n_best > 1:
            tokens, scores = out
            for texts, row in zip(to_text(tokenizer, tokens), scores.tolist()):
                sentences.append(texts[0])
                lines += n_best_lines(texts, row) + [""]
        else:
            sentences += to_text(tokenizer, out)
    print("\n".join(lines or sentences))
    if args.output:
        args.output.write_text("\n".join(sentences) + "\n")
    return sentences


if __name__ == "__main__":
    run_cli(main)
