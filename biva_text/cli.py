"""Flags shared by the text scripts: the data flags (train_text.py, prepare_text.py) and the decoding
flags of the samplers (docs/reference.md, Sampling flags). Torch-free."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import nonneg_float, nonneg_int, open_fraction, pick_device, positive_float, positive_int

from .names import BUNDLED_DATASETS, DATASET_HELDOUT_SIZE, TOKENIZERS


def add_text_data_flags(p: argparse.ArgumentParser) -> None:
    """What text to read and how to tokenise it; the same flags wherever the data is prepared."""
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="austen: Jane Austen's six novels, 31,438 sentences shipped with the package "
                                     "(offline; picks the quick preset and 1000 held-out sentences per split unless "
                                     "--preset, --valid-size or --test-size say otherwise); or a hub dataset read as "
                                     "plain text, one sentence per row (default bookcorpus = rojagtap/bookcorpus, the "
                                     "paper's corpus)")
    d.add_argument("--train-files", nargs="+", type=Path, metavar="FILE",
                   help="local UTF-8 text files, one sentence per line (instead of the hub dataset)")
    d.add_argument("--valid-files", nargs="+", type=Path, metavar="FILE", help="validation sentences (default: carved from the training text)")
    d.add_argument("--test-files", nargs="+", type=Path, metavar="FILE", help="test sentences (default: carved from the training text)")
    d.add_argument("--valid-size", type=positive_int, help="validation sentences to carve (default 10000, at most a "
                                                           "tenth; 1000 for --dataset austen)")
    d.add_argument("--test-size", type=positive_int, help="test sentences to carve (default 10000, at most a tenth; "
                                                          "1000 for --dataset austen)")
    d.add_argument("--max-sentences", type=positive_int, help="read at most this many training sentences (quick runs; default: all)")
    d.add_argument("--tokenizer", choices=TOKENIZERS, help="SentencePiece model: word (the paper's, sentences with "
                                                           "out-of-vocabulary words are dropped) or unigram (default word)")
    d.add_argument("--vocab-size", type=positive_int, help="pieces, specials included (default 20000)")
    d.add_argument("--max-tokens", type=positive_int, help="longest sentence kept, in pieces without EOS (default 40)")
    d.add_argument("--tokenizer-sample", type=positive_int, help="sentences the tokenizer is trained on (default 2000000)")
    d.add_argument("--cache-dir", type=Path, help="token store cache (default ~/.cache/biva/text)")


def check_text_data_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("train_files", "valid_files", "test_files"):
        for path in getattr(args, name) or []:
            if not path.is_file():
                p.error(f"--{name.replace('_', '-')} {path} is not a file")
    if args.train_files and args.dataset:
        p.error("--dataset and --train-files both name the training text; pass one of them")
    if args.vocab_size is not None and not 5 <= args.vocab_size <= 65536:
        p.error(f"--vocab-size must be between 5 and 65536, got {args.vocab_size}")


def is_hub_dataset(args: argparse.Namespace) -> bool:
    """Whether the flags name hub text (BookCorpus by default), which a new run must reach first."""
    return not args.train_files and args.dataset not in ("files", *BUNDLED_DATASETS)


def data_config(args):
    from biva_text.data import TextDataConfig

    cfg = TextDataConfig(split_seed=args.split_seed or 0)
    if args.train_files:
        cfg.dataset = "files"
        cfg.train_files = [str(p) for p in args.train_files]
    elif args.dataset:
        cfg.dataset = args.dataset
    cfg.valid_files = [str(p) for p in args.valid_files or []]
    cfg.test_files = [str(p) for p in args.test_files or []]
    if cfg.dataset in DATASET_HELDOUT_SIZE:  # a small bundled corpus: its own held-out sizes
        cfg.valid_size = cfg.test_size = DATASET_HELDOUT_SIZE[cfg.dataset]
    for name in ("valid_size", "test_size", "max_sentences", "tokenizer", "vocab_size", "max_tokens", "tokenizer_sample"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    return cfg


def print_data_stats(stats: dict, file=None) -> None:
    file = file or sys.stderr
    tok = stats["tokenizer"]
    print(f"tokenizer: {tok['model_type']}, {tok['vocab_size']} pieces (asked {tok['vocab_size_requested']}); "
          f"sentences of at most {stats['max_tokens']} pieces", file=file)
    for name, c in stats["splits"].items():
        print(f"  {name:5s}: {c['kept']} sentences kept of {c['sentences']} ({c['too_long']} too long, "
              f"{c['oov']} with out-of-vocabulary words), {c['tokens']} tokens", file=file)
    print(f"tokenizer {'trained now' if tok['trained_now'] else 'reused'} ({stats['tokenizer_path']}); token store "
          f"{'reused' if stats['cache_hit'] else 'encoded now'} ({stats['store']})", file=file)


def add_decoding_flags(p: argparse.ArgumentParser, default: str) -> None:
    """--temperature / --top-p (sampling), --greedy, --beam K, --latent-temperature, --seed, --device."""
    g = p.add_argument_group(f"decoding (default: {'sampling' if default == 'sample' else default})")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--sample", dest="method", action="store_const", const="sample",
                     help="draw each token from the softmax (with --temperature, --top-p)")
    how.add_argument("--greedy", dest="method", action="store_const", const="greedy", help="the most likely token at each step")
    how.add_argument("--beam", type=positive_int, metavar="K", help="beam search of width K, hypotheses ranked by "
                                                                    "GNMT's length-normalised log-probability")
    g.add_argument("--length-penalty", type=nonneg_float, default=0.6, metavar="ALPHA",
                   help="beam search ranks log p(y) / ((5 + |y|) / 6) ** ALPHA, |y| = generated tokens with EOS "
                        "(Wu et al. 2016; default 0.6; 0 = total log-probability, which favours short sentences)")
    g.add_argument("--n-best", type=positive_int, default=1, metavar="K",
                   help="print the K best beam hypotheses per sentence with their normalised scores in nats "
                        "(needs --beam of at least K; default 1)")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="token softmax temperature when sampling (default 1)")
    g.add_argument("--top-p", type=open_fraction, default=1.0,
                   help="sample from the smallest set of tokens with this much probability (default 1: all)")
    g.add_argument("--latent-temperature", type=positive_float, default=1.0,
                   help="multiplies every prior standard deviation of the latents (default 1)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed of latent and token draws (default 0)")
    g.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(method=None, default_method=default)


def decoding_method(args: argparse.Namespace) -> str:
    if args.beam is not None:
        return "beam"
    return args.method or args.default_method


def open_for_decoding(args: argparse.Namespace):
    """(model, tokenizer, DecodeOptions) for a text sampler's parsed flags; imports torch."""
    from .decode import DecodeOptions
    from .report import load_text_run

    device = pick_device(args.device)
    _, model, tokenizer = load_text_run(args.run, device)
    opts = DecodeOptions(method=decoding_method(args), temperature=args.temperature, top_p=args.top_p,
                         beam=args.beam or 1, seed=args.seed, length_penalty=args.length_penalty,
                         n_best=args.n_best).validate()
    return model, tokenizer, opts


def check_n_best(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.n_best > 1 and (args.beam or 0) < args.n_best:
        p.error(f"--n-best {args.n_best} needs --beam K with K >= {args.n_best}")


def n_best_lines(sentences: list[str], scores, prefix: str = "") -> list[str]:
    """One line per hypothesis: its length-normalised score (nats) and the sentence."""
    return [f"{prefix}{float(score):9.3f}  {sentence}" for sentence, score in zip(sentences, scores)]


def levels_arg(text: str) -> list[tuple[int | None, int | None]]:
    """--levels: comma-separated levels or inclusive ranges, open at either end: "7", "3,4", "5..7",
    "5.." (5 to the top), "..2", "1,5..". Checked against the model once it is loaded."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("..")
        try:
            bounds = (int(lo) if lo else None, int(hi) if hi else None) if sep else (int(part),) * 2
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {part!r}; expected levels like 7, 3,4, 5..7 or 5..") from None
        if sep and lo == hi == "" or any(b is not None and b < 1 for b in bounds):
            raise argparse.ArgumentTypeError(f"cannot read {part!r}; levels are numbered from 1 (the lowest)")
        ranges.append(bounds)
    return ranges


def resolve_levels(ranges: list[tuple[int | None, int | None]], num_levels: int) -> list[int]:
    """The levels named by ``levels_arg``'s ranges, for a model of ``num_levels`` levels."""
    from shared.errors import UserError

    chosen = set()
    for lo, hi in ranges:
        lo, hi = lo or 1, hi or num_levels
        if hi > num_levels or lo > hi:
            raise UserError(f"--levels {lo}..{hi} is outside this model's levels 1..{num_levels}")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


def read_input(path: Path | None) -> list[str]:
    """Non-blank lines of a UTF-8 file (or standard input), stripped."""
    from shared.errors import UserError

    if path is None:
        text = sys.stdin.read()
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; give one sentence per line in UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
