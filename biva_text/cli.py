"""Decoding flags shared by the text samplers (CONTRACTS.md, Sampling flags). Torch-free."""
from __future__ import annotations

import argparse

from shared.cli import nonneg_int, open_fraction, positive_float, positive_int


def add_decoding_flags(p: argparse.ArgumentParser, default: str) -> None:
    """--temperature / --top-p (sampling), --greedy, --beam K, --latent-temperature, --seed, --device."""
    g = p.add_argument_group(f"decoding (default: {'sampling' if default == 'sample' else default})")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--sample", dest="method", action="store_const", const="sample",
                     help="draw each token from the softmax (with --temperature, --top-p)")
    how.add_argument("--greedy", dest="method", action="store_const", const="greedy", help="the most likely token at each step")
    how.add_argument("--beam", type=positive_int, metavar="K", help="beam search of width K")
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
    import torch

    from .decode import DecodeOptions
    from .report import load_text_run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _, model, tokenizer = load_text_run(args.run, device)
    opts = DecodeOptions(method=decoding_method(args), temperature=args.temperature, top_p=args.top_p,
                         beam=args.beam or 1, seed=args.seed).validate()
    return model, tokenizer, opts
