#!/usr/bin/env python
"""Text throughput: training tokens/s and peak memory, L_K evaluation sentences/s, tokenisation sentences/s.

    python benchmarks/text_throughput.py                                   # paper-sized biva-lstm, batch 512, on cuda
    python benchmarks/text_throughput.py --mixed-precision bf16 --steps 50
    python benchmarks/text_throughput.py --device cpu --batch-size 8 --steps 2 --iw-samples 4   # a CPU smoke run

Training: the preset's model (default: the paper-sized biva-lstm, 20,000 pieces, T = 48) on random
token ids with random lengths (4 to max_tokens + 1 predicted tokens, EOS included), the engine's step:
its loss (shared.objective.training_loss, free-bits KL), gradient norm, Adamax, EMA update; one
optimiser step per batch; --warmup steps are run first and not timed. The LSTM runs to each batch's
longest sentence: random batches (the default) are the slow case; --length-buckets draws one random
length per batch instead, what the engine's length-bucketed training batches look like (same mean
length). Tokens
counted are predicted tokens (EOS included). Peak memory is torch.cuda.max_memory_allocated on a
GPU, the process's peak resident set size on a CPU. L_K: the importance-weighted bound with
--iw-samples samples, in chunks of --iw-chunk, on --iw-sentences sentences. Tokenisation: a
SentencePiece word model trained on generated sentences encodes --tok-sentences of them with all
CPU threads. bf16 autocast covers the forward passes (log-densities stay fp32). CUDA is
synchronised around every timed region. The last line of output is one JSON object with the results.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

from biva_text.names import TEXT_MODELS, TEXT_PRESETS
from shared.cli import ArgumentParser, nonneg_int, pick_device, positive_int
from shared.errors import run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=TEXT_PRESETS, default="paper", help="model sizes (default paper)")
    p.add_argument("--model", choices=TEXT_MODELS, default="biva-lstm", help="default biva-lstm")
    p.add_argument("--batch-size", type=positive_int, default=512, help="sentences per training step (default 512)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--length-buckets", action="store_true",
                   help="training batches of one random length each, as bucketed training draws them "
                        "(default: independent random lengths)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="autocast precision (default no)")
    p.add_argument("--iw-samples", type=positive_int, default=1000, help="K of the timed L_K (default 1000)")
    p.add_argument("--iw-chunk", type=positive_int, default=100, help="importance samples per forward pass (default 100)")
    p.add_argument("--iw-sentences", type=positive_int, default=32, help="sentences of the timed L_K (default 32)")
    p.add_argument("--iw-batch", type=positive_int, default=16, help="sentences per L_K batch (default 16)")
    p.add_argument("--tok-sentences", type=positive_int, default=100000, help="sentences to tokenise (default 100000)")
    p.add_argument("--vocab-size", type=positive_int, default=20000, help="pieces (default 20000)")
    p.add_argument("--max-tokens", type=positive_int, default=40, help="pieces per sentence (default 40)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads on a CPU (default: torch's)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    return p.parse_args(argv)


def random_batch(n: int, max_tokens: int, vocab: int, generator, device, offset: int = 0,
                 one_length: bool = False) -> dict:
    import torch

    from biva_text.tokenizer import EOS_ID, PAD_ID

    # Predicted tokens, EOS included; one_length: one length for the whole batch (a length bucket).
    lengths = torch.randint(4, max_tokens + 2, (1 if one_length else n,), generator=generator).expand(n).clone()
    tokens = torch.randint(4, vocab, (n, max_tokens + 1), generator=generator)
    positions = torch.arange(max_tokens + 1)[None, :]
    tokens = torch.where(positions < lengths[:, None] - 1, tokens, torch.full_like(tokens, PAD_ID))
    tokens[torch.arange(n), lengths - 1] = EOS_ID
    return {"index": (torch.arange(n) + offset).to(device), "tokens": tokens.to(device), "length": lengths.to(device)}


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def bench_training(args, model, train_cfg, device, autocast) -> dict:
    import torch

    from shared.distributions import TrainNoise
    from shared.ema import EMA
    from shared.objective import training_loss
    from shared.optim import grad_norm

    g = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adamax(model.parameters(), lr=train_cfg.lr)
    ema = EMA(model, train_cfg.ema_decay)
    lam = train_cfg.free_bits_budget / max(model.num_groups, 1)  # the schedule's first lambda
    noise = TrainNoise()
    model.train()
    steps_done = 0

    def step(batch):
        nonlocal steps_done
        with autocast():
            loss, _ = training_loss(model, batch, noise, lam)
        loss.backward()
        norm = float(grad_norm(model.parameters()))  # the skip guard's norm, as the engine takes it
        if math.isfinite(norm):
            optimizer.step()
            steps_done += 1
            ema.update(model, steps_done)
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    batches = [random_batch(args.batch_size, args.max_tokens, args.vocab_size, g, device, one_length=args.length_buckets)
               for _ in range(min(args.steps, 4))]
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = 0
    with Timer(device) as t:
        for i in range(args.steps):
            batch = batches[i % len(batches)]
            loss = step(batch)
            tokens += int(batch["length"].sum())
    if loss != loss:
        raise RuntimeError("the training loss became NaN")
    return {"train_tokens_per_s": tokens / t.seconds, "train_sentences_per_s": args.steps * args.batch_size / t.seconds,
            "train_step_ms": 1000 * t.seconds / args.steps, "peak_memory_mb": peak_memory_mb(device), "last_loss": loss}


def bench_iw(args, model, device, autocast) -> dict:
    import torch

    from shared.bounds import iw_bound

    if model.num_groups == 0:
        return {"iw_sentences_per_s": None}
    g = torch.Generator().manual_seed(args.seed + 1)
    model.eval()
    n = args.iw_sentences
    batches = [random_batch(min(args.iw_batch, n - s), args.max_tokens, args.vocab_size, g, device, offset=s)
               for s in range(0, n, args.iw_batch)]
    with torch.no_grad(), autocast():
        iw_bound(model, batches[0], min(args.iw_chunk, args.iw_samples), chunk_size=args.iw_chunk)  # warm-up
        with Timer(device) as t:
            values = [iw_bound(model, b, args.iw_samples, chunk_size=args.iw_chunk) for b in batches]
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise RuntimeError("L_K is not finite")
    return {"iw_sentences_per_s": n / t.seconds, "iw_seconds": t.seconds}


def bench_tokenizer(args) -> dict:
    from biva_text.tokenizer import Tokenizer, train_tokenizer

    rng = random.Random(args.seed)
    words = [f"w{i}" for i in range(args.vocab_size)]
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf-like, as in text

    def sentences(n):
        return [" ".join(rng.choices(words, weights, k=rng.randint(3, args.max_tokens))) for _ in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # generated text may not fill the vocabulary
            path = train_tokenizer(sentences(20000), Path(tmp) / "tok", vocab_size=args.vocab_size, model_type="word")
        tokenizer = Tokenizer.load(path)
        corpus = sentences(args.tok_sentences)
        tokenizer.encode(corpus[:1000])
        start = time.perf_counter()
        ids = tokenizer.encode(corpus)
        seconds = time.perf_counter() - start
    return {"tokenize_sentences_per_s": len(corpus) / seconds, "tokenize_pieces": sum(map(len, ids))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import contextlib
    import os

    import torch

    from biva_text.model import build_text_model, num_params
    from biva_text.presets import get_preset

    from shared.launch import keep_freed_cpu_memory

    device = torch.device(pick_device(args.device))
    heap_kept = device.type == "cpu" and keep_freed_cpu_memory()  # as the engine's Trainer does on a CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mixed_precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    torch.manual_seed(args.seed)
    preset = get_preset(args.preset, args.model, vocab_size=args.vocab_size, max_tokens=args.max_tokens)
    cfg = preset.model
    model = build_text_model(cfg).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    result = {"model": args.model, "preset": args.preset, "num_params": num_params(model), "seq_len": cfg.seq_len,
              "device": name, "batch_size": args.batch_size, "steps": args.steps, "length_buckets": args.length_buckets,
              "mixed_precision": args.mixed_precision, "keep_freed_cpu_memory": heap_kept,
              "iw_samples": args.iw_samples}
    print(f"{args.model} ({args.preset}), {result['num_params'] / 1e6:.2f}M parameters, T = {cfg.seq_len}, on {name}",
          file=sys.stderr)
    result.update(bench_training(args, model, preset.train, device, autocast))
    print(f"training: {result['train_tokens_per_s']:.0f} tokens/s ({result['train_step_ms']:.1f} ms per step of "
          f"{args.batch_size}), peak memory {result['peak_memory_mb']:.0f} MiB", file=sys.stderr)
    result.update(bench_iw(args, model, device, autocast))
    if result["iw_sentences_per_s"] is not None:
        print(f"L_{args.iw_samples}: {result['iw_sentences_per_s']:.2f} sentences/s", file=sys.stderr)
    result.update(bench_tokenizer(args))
    print(f"tokenisation: {result['tokenize_sentences_per_s']:.0f} sentences/s", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
