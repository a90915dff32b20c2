#!/usr/bin/env python
"""Sample sentences from a text run's prior: z ~ p(z), then the decoder.

    python scripts/sample_text.py --run RUN --num 20
    python scripts/sample_text.py --run RUN --num 10 --temperature 0.8 --top-p 0.9 --latent-temperature 0.7
    python scripts/sample_text.py --run RUN --greedy          # or --beam 5

Sampling (the default) draws each token from the softmax at --temperature, restricted to the top-p
nucleus; --greedy and --beam K decode the most likely continuation given the sampled latents.
--latent-temperature scales every prior standard deviation. Sample i is the same for any --num
with the same --seed. The LSTM LM (lstm-lm) samples without latents.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biva_text.cli import add_decoding_flags, open_for_decoding  # noqa: E402
from shared.cli import ArgumentParser, positive_int  # noqa: E402
from shared.errors import run_cli  # noqa: E402
from shared.run_dir import resolve_run  # noqa: E402


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory (--output-dir of train_text.py), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("--num", type=positive_int, default=20, help="sentences to draw (default 20)")
    p.add_argument("--output", type=Path, help="also write the sentences to this file, one per line")
    add_decoding_flags(p, "sample")
    args = p.parse_args(argv)
    args.run = resolve_run(args.run)
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)

    from biva_text.decode import sample_prior, to_text

    model, tokenizer, opts = open_for_decoding(args)
    sentences = []
    for start in range(0, args.num, 256):  # bounded memory for a large --num; draws are keyed per sentence
        tokens = sample_prior(model, min(256, args.num - start), opts, args.latent_temperature, start=start)
        sentences += to_text(tokenizer, tokens)
    print("\n".join(sentences))
    if args.output:
        args.output.write_text("\n".join(sentences) + "\n")
    return sentences


if __name__ == "__main__":
    run_cli(main)
