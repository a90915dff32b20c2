#!/usr/bin/env python
"""This project's training step against reference implementations, side by side on one CPU, in one run.

    python benchmarks/cpu_speed.py --reference-python /tmp/ref/bin/python          # ~10 minutes on 2 cores
    python benchmarks/cpu_speed.py --rounds 1 --steps 2                              # a quick look

Each entry is a separate process with the same thread count (--threads, default 2), timed on the same
synthetic shapes; the entries run in turn, --rounds times (interleaved, so a slow minute on a shared
machine hits every entry alike), and the median of the rounds is reported.

binary images, batch 48: benchmarks/image_throughput.py --preset binary (the engine's step: loss,
    backward, the gradient norm, Adamax, EMA) as the preset trains by default on a CPU (model and
    optimiser's step compiled by inductor; the compiling first step is not timed) in fp32 and in bf16
    autocast (log-densities stay fp32), and in fp32 eager (--no-compile), against
    the official BIVA PyTorch code (benchmarks/reference_biva.py, run by --reference-python: a Python
    with biva-pytorch installed; see that script's docstring; without those rows are skipped), in fp32
    (the row every ratio is taken against, as in docs/benchmarks.md's table) and under bf16 autocast (like for like
    with this project's bf16 row; the official code has no such option, the benchmark wraps its step).
text, vocabulary 20,000, batch 64, random lengths of 4 to 41 predicted tokens (mean ~23):
    benchmarks/text_throughput.py (paper-sized biva-lstm) with batches shaped like length-bucketed
    ones (--length-buckets) and with plain random batches, in fp32 and bf16, against a textbook padded
    LSTM-VAE of 53.8M parameters (benchmarks/reference_lstm_vae.py), the stand-in for the
    reference row.
The last line of output is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from shared.cli import ArgumentParser, positive_int
from shared.errors import run_cli

HERE = Path(__file__).resolve().parent


def entries(args) -> list[tuple[str, str, list[str], str]]:
    """(name, unit, command, JSON key of the figure)."""
    py, t, s = sys.executable, str(args.threads), str(args.steps)
    image = [py, str(HERE / "image_throughput.py"), "--preset", "binary", "--device", "cpu", "--threads", t,
             "--batch-size", "48", "--steps", s, "--warmup", "2", "--iw-samples", "0"]
    text = [py, str(HERE / "text_throughput.py"), "--device", "cpu", "--threads", t, "--batch-size", "64",
            "--steps", s, "--warmup", "1", "--iw-samples", "1", "--iw-sentences", "1", "--iw-batch", "1",
            "--tok-sentences", "10"]
    out = [("binary images: this project, fp32 (the preset's default: compiled)", "images/s", image,
            "train_images_per_s"),
           ("binary images: this project, bf16 (compiled)", "images/s", image + ["--mixed-precision", "bf16"],
            "train_images_per_s"),
           ("binary images: this project, fp32, eager (--no-compile)", "images/s", image + ["--no-compile"],
            "train_images_per_s")]
    if args.reference_python:
        reference = [str(args.reference_python), str(HERE / "reference_biva.py"), "--threads", t, "--steps", s,
                     "--warmup", "2"]
        out.append(("binary images: official BIVA code (reference)", "images/s", reference, "train_images_per_s"))
        out.append(("binary images: official BIVA code under bf16 autocast", "images/s",
                    reference + ["--mixed-precision", "bf16"], "train_images_per_s"))
    out += [("text: this project, fp32, bucketed batches", "tokens/s", text + ["--length-buckets"], "train_tokens_per_s"),
            ("text: this project, bf16, bucketed batches", "tokens/s",
             text + ["--length-buckets", "--mixed-precision", "bf16"], "train_tokens_per_s"),
            ("text: this project, fp32, random batches", "tokens/s", text, "train_tokens_per_s"),
            ("text: padded LSTM-VAE 53.8M (reference)", "tokens/s",
             [py, str(HERE / "reference_lstm_vae.py"), "--device", "cpu", "--threads", t, "--batch-size", "64",
              "--steps", s, "--warmup", "1"], "train_tokens_per_s")]
    if not args.bf16_anyway:
        from shared.launch import native_cpu_bf16

        if not native_cpu_bf16():
            skipped = [name for name, *_ in out if "bf16" in name]
            print(f"this CPU has no bf16 kernels (no AVX512, AVX512-BF16 or AMX): skipped, as many times slower "
                  f"than fp32 here: {'; '.join(skipped)} (--bf16-anyway runs them)", file=sys.stderr)
            out = [e for e in out if e[0] not in skipped]
    return out


def run_one(command: list[str], key: str) -> float:
    p = subprocess.run(command, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{p.stderr[-2000:]}")
    return float(json.loads(p.stdout.strip().splitlines()[-1])[key])


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-python", type=Path, help="a Python with biva-pytorch installed (the reference BIVA row)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads of every entry (default 2)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per entry and round (default 5)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--bf16-anyway", action="store_true",
                   help="run the bf16 rows also on a CPU without bf16 kernels (skipped there by default: the binary "
                        "step measured 8.4x slower than fp32 on an AVX2 CPU)")
    args = p.parse_args(argv)
    todo = entries(args)
    figures = {name: [] for name, *_ in todo}
    for r in range(args.rounds):
        for name, unit, command, key in todo:
            figures[name].append(run_one(command, key))
            print(f"round {r + 1}/{args.rounds}: {name}: {figures[name][-1]:.1f} {unit}", file=sys.stderr, flush=True)
    medians = {name: statistics.median(v) for name, v in figures.items()}
    refs = {"images/s": "binary images: official BIVA code (reference)", "tokens/s": "text: padded LSTM-VAE 53.8M (reference)"}
    print(f"\n| work | {args.threads} threads, median of {args.rounds} | rounds | vs reference |\n|---|---|---|---|")
    for name, unit, _, _ in todo:
        ref = medians.get(refs[unit])
        ratio = f"{medians[name] / ref:.2f}x" if ref else "–"
        print(f"| {name} | {medians[name]:.1f} {unit} | {', '.join(f'{v:.1f}' for v in figures[name])} | {ratio} |")
    result = {"benchmark": "cpu_speed", "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "figures": figures, "medians": medians}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
