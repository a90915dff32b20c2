#!/usr/bin/env python
"""Evaluate a text run: the paper's Table 7 row and the importance-weighted bound.

    python scripts/report_text.py --run runs/paper-20250101-120000
    python scripts/report_text.py --run RUN --split valid --iw-samples 100 --max-sentences 2000 --json out.json

Prints num_params, -log p(x) <= -L_1 (nats per sentence), KL and perplexity (the paper's Table 7
columns), then -L_K with K = --iw-samples and its perplexity, active units and the mutual
information I(x; z) (He et al. 2019, minibatches of 64), and whether the latents carry the sentence:
the reconstruction gain log p(x | z ~ q(z|x)) - log p(x | z ~ p(z)) (nats; 0 when the decoder ignores
z) and the clipped unigram overlap of greedy reconstructions with their input against other sentences
of the split (report keys reconstruction_gain, unigram_overlap {own, other, ratio}; z ~ q(z|x)), and the
same for greedy reconstructions from the posterior means (unigram_overlap_mean). Perplexity = exp(sum NLL / sum tokens),
tokens counting every predicted token including end-of-sentence. Writes report-<split>.json in the
run directory (./NAME for a hub id or a read-only run) (and to --json) and a bar plot of KL per latent group, kl-per-group-<split>.png.
The data are the run's own (saved data config and tokenizer; the token cache makes this cheap).
"""
from __future__ import annotations

import math
from pathlib import Path

from shared.cli import ArgumentParser, nonneg_int, pick_device, positive_int
from shared.errors import UserError, run_cli
from shared.run_dir import output_dir, resolve_run


def parse_args(argv=None):
    import argparse

    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run directory (--output-dir of train_text.py), a folder of scripts/export.py, or a hub id owner/name")
    p.add_argument("--split", choices=["test", "valid", "train"], default="test", help="split to evaluate (default test)")
    p.add_argument("--iw-samples", type=positive_int, default=1000,
                   help="K of the importance-weighted bound L_K (default 1000; 1 gives the ELBO again)")
    p.add_argument("--iw-chunk", type=positive_int,
                   help="importance samples per forward pass; memory grows with it, not with K (default: as many "
                        "as fit in half the free GPU memory; on a CPU about 512 sentences per pass)")
    p.add_argument("--max-sentences", type=positive_int,
                   help="evaluate N sentences of the split, a random draw seeded by --seed (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sentences per evaluation batch (default 64)")
    p.add_argument("--mi-batches", type=nonneg_int, help="minibatches of 64 for the mutual information (default: all)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the evaluation noise and of the --max-sentences draw (default 0)")
    p.add_argument("--json", type=Path, help="also write the report JSON here")
    p.add_argument("--cache-dir", type=Path, help="token store cache (default: the run's, or ~/.cache/biva/text)")
    for name in ("train", "valid", "test"):
        p.add_argument(f"--{name}-files", nargs="+", type=Path, metavar="FILE",
                       help=f"the run's {name} text where it is on this machine, instead of the paths config.json "
                            f"records (the same text: its split sizes must match the run's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    args = p.parse_args(argv)
    args.run = resolve_run(args.run)
    if args.json is not None and args.json.is_dir():
        p.error(f"--json {args.json} is a directory; give a file name")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from biva_text.report import MI_BATCH, load_text_run, load_text_split, plot_kl_per_group, table_row, text_report
    from biva_text.data import TextDataset
    from shared.config import write_json_atomic
    from shared.checkpoints import run_step

    device = pick_device(args.device)
    run, model, _ = load_text_run(args.run, device)
    moved = {f"{name}_files": [str(f) for f in getattr(args, f"{name}_files")]
             for name in ("train", "valid", "test") if getattr(args, f"{name}_files")}
    split = load_text_split(run, args.run, args.split, args.cache_dir, moved)
    if len(split) == 0:
        raise UserError(f"the {args.split} split of {args.run} is empty; choose another --split")
    report = {"run": str(args.run), "model": model.cfg.model, "preset": run.preset, "split": args.split,
              "step": run_step(args.run), "seed": args.seed,
              "weights": "ema"}  # model.safetensors: the EMA weights of the checkpoint at "step"
    report.update(text_report(model, TextDataset(split), iw_samples=args.iw_samples, batch_size=args.batch_size,
                              seed=args.seed, max_examples=args.max_sentences, mi_batches=args.mi_batches,
                              iw_chunk=args.iw_chunk, device=torch.device(device)))
    out = output_dir(args.run)  # the run itself, or ./NAME for a hub or read-only one
    write_json_atomic(out / f"report-{args.split}.json", report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, report)
    if report["kl_per_group"]:
        plot_kl_per_group(report, out / f"kl-per-group-{args.split}.png",
                          f"{report['model']}: KL per group ({args.split})")

    print(f"{report['model']} ({args.run}), {args.split} split: {report['num_sentences']} sentences, "
          f"{report['num_tokens']} tokens (EOS included), step {report['step']}")
    print("| model | params | -log p(x) | KL | PPL |\n|---|---|---|---|---|")
    print(table_row(report))
    if report["likelihood_exact"]:
        print(f"exact likelihood (no latent variables): nll {report['nll']:.3f} nats, ppl {report['ppl']:.2f}")
    else:
        au = report["active_units"]
        print(f"L_{report['iw_samples']}: nll <= {report['nll_iw']:.3f} nats per sentence, ppl <= {report['ppl']:.2f}; "
              f"active units {au['total']} ({', '.join(map(str, au['per_group']))}); "
              f"mutual information {report['mutual_info']:.3f} nats (a minibatch estimate: at most "
              f"log {MI_BATCH} = {math.log(MI_BATCH):.2f} nats)")
        u = report["unigram_overlap"]
        print(f"latents in use: reconstruction gain log p(x|z~q) - log p(x|z~p) = {report['reconstruction_gain']:.2f} "
              f"nats; greedy reconstructions share {u['own']:.1%} of their words with their input, "
              f"{u['other']:.1%} with other sentences" + (f" ({u['ratio']:.2f}x)" if u["ratio"] else ""))
        m = report["unigram_overlap_mean"]
        print(f"from the posterior means instead of z ~ q: {m['own']:.1%} with their input, {m['other']:.1%} with "
              f"other sentences" + (f" ({m['ratio']:.2f}x)" if m["ratio"] else ""))
    t = report["teacher_forced_accuracy"]
    if t is not None:
        print(f"teacher-forced next-word accuracy, all words / outside the {t['frequent']} most frequent: "
              f"z ~ q {t['posterior']['all']:.1%} / {t['posterior']['rare']:.1%}, "
              f"z ~ p {t['prior']['all']:.1%} / {t['prior']['rare']:.1%}")
        ratio = [t[k]["overlap"]["ratio"] for k in ("posterior", "prior")]
        if None not in ratio and report["unigram_overlap"] is not None:  # the LM: no z, no greedy figure
            print(f"the teacher-forced most likely words, read as a sentence, share {ratio[0]:.2f}x as many words "
                  f"with their input as with other sentences (z ~ p {ratio[1]:.2f}x; greedy decoding's figure above)")
    print(f"wrote {out / f'report-{args.split}.json'}" + (f" and {args.json}" if args.json else ""))
    return report


if __name__ == "__main__":
    run_cli(main)
