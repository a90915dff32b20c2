#!/usr/bin/env python
"""Prepare a text corpus once, before training: train the tokenizer and encode the token store.

    python scripts/prepare_text.py                                   # BookCorpus, the paper's settings
    python scripts/prepare_text.py --dataset austen                  # Jane Austen's novels, bundled (offline)
    python scripts/prepare_text.py --train-files train.txt --valid-files valid.txt --test-files test.txt
    accelerate launch scripts/train_text.py                          # then reads what was prepared

One process on every core (--num-threads), with progress bars on a terminal. It takes the same data
flags as train_text.py and writes the same cache (--cache-dir, default ~/.cache/biva/text): the
tokenizer under tokenizers/, keyed by the data and tokenizer settings, and the token store under a
fingerprint of the data, the tokenizer and --max-tokens. A run of train_text.py with the same data
flags copies that tokenizer into its run directory and memory-maps the store, so it neither trains
the tokenizer nor tokenises again.

Resumable: the two stages (tokenizer, token store) each finish atomically; stopped midway, the same
command starts again at the unfinished stage (a finished tokenizer is not retrained). Running it is
optional: train_text.py prepares the data itself when it is missing (on rank 0 before the processes
connect, the other ranks waiting for the finished store on disk), but on a multi-GPU node the GPUs
then sit idle while one process reads the corpus.
"""
from __future__ import annotations

import sys
import time

from biva_text.cli import add_text_data_flags, check_text_data_flags, data_config, is_hub_dataset, print_data_stats
from shared.cli import ArgumentParser, nonneg_int, positive_int
from shared.errors import run_cli


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_data_flags(p)
    p.add_argument("--split-seed", type=nonneg_int, help="seed of the train/validation/test carving (default 0; "
                                                         "pass the same to train_text.py)")
    p.add_argument("--num-threads", type=positive_int, help="tokenizer training and encoding threads (default: all CPUs)")
    args = p.parse_args(argv)
    check_text_data_flags(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if is_hub_dataset(args):
        from biva_text.names import DEFAULT_DATASET, HUB_ALIASES, HUB_FIX
        from shared.hub import require_hub_dataset

        dataset = args.dataset or DEFAULT_DATASET
        require_hub_dataset(HUB_ALIASES.get(dataset, dataset), HUB_FIX)
    from biva_text.data import prepare_text_data

    started = time.monotonic()
    splits = prepare_text_data(data_config(args), None, cache_dir=args.cache_dir, num_proc=args.num_threads)
    print_data_stats(splits.stats)
    print(f"prepared in {time.monotonic() - started:.0f} s; train_text.py with the same data flags reuses "
          f"{splits.stats['store']}", file=sys.stderr)
    return splits.stats


if __name__ == "__main__":
    run_cli(main)
