#!/usr/bin/env python
"""Train BIVA (or a baseline) on sentences.

    python scripts/train_text.py --dataset austen --output-dir runs/austen   # Jane Austen, offline, ~8 min on 2 CPUs
    accelerate launch scripts/train_text.py                       # BookCorpus, biva-lstm, the paper's recipe
    python scripts/train_text.py --train-files train.txt --valid-files valid.txt --test-files test.txt
    python scripts/train_text.py --model rnn-vae --kl-schedule warmup --kl-warmup-steps 20000
    python scripts/train_text.py --model hybrid-vae --aux-weight 0.2
    python scripts/train_text.py --preset tiny --train-files my.txt --max-steps 200

Defaults (preset paper): Adamax lr 2e-3, batch 512, 5 epochs, one sample, free bits on plateau with a
30-nat budget split over the 2L-1 = 13 latent groups; SentencePiece word tokenizer, 20,000 pieces,
sentences of at most 40 pieces. Without --train-files or --dataset the text is BookCorpus streamed
from the hub copy rojagtap/bookcorpus (its two plain-text files; download books_large_p1.txt and
books_large_p2.txt once and pass them with --train-files to work offline). --dataset austen reads
Jane Austen's novels shipped with the package (biva_text/corpora/) and, without --preset, trains the
quick preset (the small preset's narrow model, 3,500 steps: about 8 minutes on 2 CPU cores), with
1000 validation and 1000 test sentences. Without --valid-files / --test-files, seeded held-out splits
are carved from the training text (--split-seed). The tokenizer is trained once and stored in the run
directory (tokenizer.model); a sample of generated sentences is written to samples/step_N.txt at
every evaluation.

Under accelerate launch / torchrun, rank 0 prepares the data (tokenizer, token store) before the
processes connect and the other ranks wait for the finished store on disk, so no collective times
out however long the corpus takes (on several nodes the run and --cache-dir folders must be on a shared
filesystem); scripts/prepare_text.py does the same preparation beforehand, on every core, and this
script then reuses it. The run itself is assembled by biva_text.train.train_text.
"""
from __future__ import annotations

from biva_text.cli import add_text_data_flags, check_text_data_flags
from biva_text.names import DECODER_INITS, DECODER_INPUTS, KL_SCHEDULES, NON_AUTOREGRESSIVE, TEXT_MODELS, TEXT_PRESETS
from shared.cli import ArgumentParser, add_training_flags, fraction, nonneg_float, nonneg_int, positive_float
from shared.errors import run_cli


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_data_flags(p)
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=TEXT_MODELS, help="biva-lstm (default), biva (no autoregression), "
                                                        "lstm-lm, rnn-vae, hybrid-vae or hybrid-vae-conv "
                                                        "(baselines; -conv: no LSTM)")
    m.add_argument("--kl-schedule", choices=KL_SCHEDULES, help="free-bits (default for BIVA: the plateau schedule "
                                                               "of --free-bits-budget) or warmup (default for rnn-vae "
                                                               "and the hybrid VAEs)")
    m.add_argument("--word-dropout", type=fraction, help="training only: replace each decoder input token by UNK "
                                                         "with this probability (Bowman et al. 2015; default 0, "
                                                         "as in the paper)")
    m.add_argument("--kl-warmup-steps", type=nonneg_int, help="optimiser steps over which the KL weight rises "
                                                              "linearly from 0 to 1 (warmup; default: the preset's)")
    m.add_argument("--decoder-input", choices=DECODER_INPUTS,
                   help="how the LSTM reads the latents' features at each step, beside the token embedding: "
                        "concat (as they are; the default of rnn-vae and hybrid-vae), scaled (times a learned "
                        "gain; the default of biva-lstm, chosen by measurement, see docs/text.md), normalised "
                        "(layer norm over channels, then the gain) or none (not read at each step: needs "
                        "--decoder-attention or --decoder-init latents)")
    m.add_argument("--decoder-init", choices=DECODER_INITS,
                   help="the LSTM's initial state: zeros (default) or latents (a linear map of the features "
                        "averaged over the sentence)")
    m.add_argument("--decoder-attention", action="store_true", default=None,
                   help="the LSTM's output also attends over the latents' features of the whole sentence "
                        "(global attention, Luong et al. 2015), so it finds what they say by content, not "
                        "only at its own position (default off)")
    m.add_argument("--decoder-gain", type=positive_float,
                   help="initial value of the learned gain of --decoder-input scaled/normalised (default 4, ours)")
    m.add_argument("--aux-weight", type=nonneg_float,
                   help="hybrid-vae: weight alpha of the auxiliary reconstruction term in the training loss "
                        "(default 0.2; reported bounds never include it)")
    m.add_argument("--bow-weight", type=nonneg_float,
                   help="biva-lstm: weight of a bag-of-words term in the training loss, the sentence's words "
                        "predicted from the latents' features averaged over the sentence (ours, after Zhao et al. "
                        "2017; default 0 = off; reported bounds never include it)")
    add_training_flags(p, list(TEXT_PRESETS), modality="text")
    args = p.parse_args(argv)
    check_text_data_flags(p, args)
    if args.model == "lstm-lm" and (args.kl_schedule or args.kl_warmup_steps is not None):
        p.error("lstm-lm has no latent variables; drop --kl-schedule / --kl-warmup-steps")
    if args.model in NON_AUTOREGRESSIVE and args.word_dropout:
        p.error(f"{args.model} (no autoregression) has no decoder inputs to drop; drop --word-dropout")
    scaled_by_default = args.model in (None, "biva-lstm")  # biva-lstm's preset default is scaled
    no_gain = args.decoder_input in ("concat", "none") or (args.decoder_input is None and not scaled_by_default)
    if args.decoder_gain is not None and no_gain:
        p.error("--decoder-gain needs --decoder-input scaled or normalised")
    if args.aux_weight is not None and args.model != "hybrid-vae":
        p.error("--aux-weight is the hybrid-vae's auxiliary term; use it with --model hybrid-vae")
    if args.kl_warmup_steps is not None and args.kl_schedule == "free-bits":
        p.error("--kl-warmup-steps needs --kl-schedule warmup")
    return args


def main(argv=None) -> dict:
    from biva_text.train import train_text

    return train_text(parse_args(argv), argv, script=__file__)


if __name__ == "__main__":
    run_cli(main)
