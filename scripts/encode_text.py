#!/usr/bin/env python
"""Encode sentences to a text run's latent space: every group's posterior mean and scale.

    python scripts/encode_text.py --run RUN --input sentences.txt --out latents.safetensors
    echo "the cat sat on the mat ." | python scripts/encode_text.py --run RUN --out latents.safetensors

One sentence per line, tokenised like the training text; words outside a word tokenizer's
vocabulary read as <unk> (named in one warning line on stderr), sentences with more pieces than the
model reads are skipped and counted on stderr. The safetensors file holds, for every latent group,
``level{i}.{kind}.mean`` and ``level{i}.{kind}.scale`` (fp32, one row per sentence): the mean and
standard deviation of q(z | x) with the group's parents at their posterior means (no sampling, the
quantities active units are measured on). kind is top (level L), bu or td (levels below; LVAE
ladders have td only); a ladder group is (N, C_i, T_i), the RNN-VAE's one group (N, C). The
metadata holds ``sentences`` (a JSON list, row order), ``groups`` (JSON) and ``run``. Read it with
safetensors.torch.load_file and safetensors.safe_open(...).metadata().
"""
from __future__ import annotations

import sys
from pathlib import Path

from biva_text.cli import read_input
from shared.cli import ArgumentParser, pick_device, positive_int
from shared.errors import UserError, run_cli
from shared.run_dir import resolve_run


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory (--output-dir of train_text.py), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("--input", type=Path, help="text file, one sentence per line (default: standard input)")
    p.add_argument("--out", type=Path, required=True, help="the safetensors file to write")
    p.add_argument("--batch-size", type=positive_int, default=256, help="sentences per forward pass (default 256)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args = p.parse_args(argv)
    if args.input is not None and not args.input.is_file():
        p.error(f"--input {args.input} is not a file")
    if args.out.is_dir():
        p.error(f"--out {args.out} is a directory; give a file name such as latents.safetensors")
    args.run = resolve_run(args.run)
    return args


def group_key(info: dict) -> str:
    return f"level{info['level']}.{info['kind']}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    sentences = read_input(args.input)
    source = args.input or "standard input"
    if not sentences:
        raise UserError(f"{source} has no sentence; give one sentence per line")

    import json

    import torch
    from safetensors.torch import save_file

    from biva_text.decode import encode_for_script, posterior_stats
    from biva_text.report import load_text_run

    device = pick_device(args.device)
    _, model, tokenizer = load_text_run(args.run, device)
    if model.num_groups == 0:
        raise UserError("an LSTM language model (lstm-lm) has no latent variables to encode to; "
                        "use a run of biva-lstm, biva or rnn-vae")
    encoded = encode_for_script(tokenizer, sentences, model.cfg.max_tokens, source)
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    with torch.no_grad():
        for start in range(0, len(encoded.kept), args.batch_size):
            batch = {k: v[start:start + args.batch_size].to(device) for k, v in encoded.batch.items()}
            parts.append([(m.float().cpu(), s.float().cpu()) for m, s in posterior_stats(model, batch)])
    tensors = {}
    for g, info in enumerate(model.group_info):
        tensors[f"{group_key(info)}.mean"] = torch.cat([p[g][0] for p in parts]).contiguous()
        tensors[f"{group_key(info)}.scale"] = torch.cat([p[g][1] for p in parts]).contiguous()
    metadata = {"sentences": json.dumps(encoded.kept), "groups": json.dumps(model.group_info), "run": str(args.run)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {len(tensors) // 2} groups x {len(encoded.kept)} sentences to {args.out}"
          + (f" (skipped {len(encoded.skipped)})" if encoded.skipped else ""), file=sys.stderr)
    return tensors


if __name__ == "__main__":
    run_cli(main)
