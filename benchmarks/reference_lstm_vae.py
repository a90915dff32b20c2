#!/usr/bin/env python
"""A textbook LSTM-VAE (Bowman et al. 2016) in plain PyTorch: the reference row of text_throughput.py.

    python benchmarks/reference_lstm_vae.py --device cpu --threads 2 --batch-size 64 --steps 3 --warmup 1

A stand-in for a straightforward implementation, timed on the same random batches as
text_throughput.py (lengths 4 to max_tokens + 1 predicted tokens, EOS included): separate encoder and
decoder embeddings (512), one-layer LSTM encoder and decoder (1024 units), a 32-dim Gaussian latent
that sets the decoder's initial state and is fed at every step, an untied 1024 -> vocab output layer
(about 53.8M parameters at 20,000 pieces). Like a naive implementation it pads every sentence to
--seq-len positions and runs both LSTMs and the softmax over all of them (padding masked in the loss).
Adamax lr 2e-3, analytic KL. Tokens counted are predicted tokens (EOS included). The last line of
output is one JSON object with the results.
"""
from __future__ import annotations

import argparse
import json
import sys

from shared.cli import ArgumentParser, nonneg_int, pick_device, positive_int
from shared.errors import run_cli
from text_throughput import Timer, peak_memory_mb, random_batch  # a sibling: run as a script, benchmarks/ is on sys.path


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=positive_int, default=64, help="sentences per training step (default 64)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed training steps (default 20)")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--vocab-size", type=positive_int, default=20000, help="pieces (default 20000)")
    p.add_argument("--max-tokens", type=positive_int, default=40, help="pieces per sentence (default 40)")
    p.add_argument("--seq-len", type=positive_int, default=48, help="padded positions every sentence is run over (default 48)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads on a CPU (default: torch's)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    args = p.parse_args(argv)
    if args.seq_len < args.max_tokens + 1:
        p.error(f"--seq-len must be at least --max-tokens + 1 = {args.max_tokens + 1}")
    return args


def build_reference(vocab: int, emb: int = 512, hidden: int = 1024, latent: int = 32):
    import torch
    from torch import nn

    class LSTMVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc_emb, self.dec_emb = nn.Embedding(vocab, emb), nn.Embedding(vocab, emb)
            self.encoder = nn.LSTM(emb, hidden, batch_first=True)
            self.q = nn.Linear(hidden, 2 * latent)
            self.z_to_h = nn.Linear(latent, hidden)
            self.decoder = nn.LSTM(emb + latent, hidden, batch_first=True)
            self.out = nn.Linear(hidden, vocab)

        def loss(self, tokens, lengths, bos: int, pad: int):
            B, T = tokens.shape
            h, _ = self.encoder(self.enc_emb(tokens))  # (B, T, H), every padded position
            mu, log_var = self.q(h[torch.arange(B), lengths - 1]).chunk(2, dim=1)
            z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
            prev = torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)
            x = torch.cat([self.dec_emb(prev), z[:, None].expand(B, T, z.shape[1])], dim=2)
            h0 = torch.tanh(self.z_to_h(z))[None]
            out, _ = self.decoder(x, (h0, torch.zeros_like(h0)))
            logits = self.out(out)  # (B, T, V): the softmax over every padded position
            nll = nn.functional.cross_entropy(logits.reshape(B * T, -1), tokens.reshape(-1), ignore_index=pad,
                                              reduction="none").view(B, T).sum(1)
            kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1)
            return (nll + kl).mean()

    return LSTMVAE()


def main(argv=None) -> dict:
    args = parse_args(argv)
    import os

    import torch

    from biva_text.tokenizer import BOS_ID, PAD_ID

    device = torch.device(pick_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_reference(args.vocab_size).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"reference LSTM-VAE, {params / 1e6:.2f}M parameters, T = {args.seq_len}, on {name}", file=sys.stderr)
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(args.seed)  # the same batches as text_throughput.py with this seed
    batches = [random_batch(args.batch_size, args.max_tokens, args.vocab_size, g, device) for _ in range(min(args.steps, 4))]
    for b in batches:
        b["tokens"] = torch.nn.functional.pad(b["tokens"], (0, args.seq_len - b["tokens"].shape[1]), value=PAD_ID)

    def step(batch):
        loss = model.loss(batch["tokens"], batch["length"], BOS_ID, PAD_ID)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    tokens = 0
    with Timer(device) as t:
        for i in range(args.steps):
            loss = step(batches[i % len(batches)])
            tokens += int(batches[i % len(batches)]["length"].sum())
    result = {"model": "reference-lstm-vae", "num_params": params, "seq_len": args.seq_len, "device": name,
              "batch_size": args.batch_size, "steps": args.steps, "train_tokens_per_s": tokens / t.seconds,
              "train_step_ms": 1000 * t.seconds / args.steps, "peak_memory_mb": peak_memory_mb(device), "last_loss": loss}
    print(f"training: {result['train_tokens_per_s']:.0f} tokens/s ({result['train_step_ms']:.1f} ms per step of "
          f"{args.batch_size})", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main)
