#!/usr/bin/env python
"""Train BIVA (or a baseline) on sentences.

    accelerate launch scripts/train_text.py                       # BookCorpus, biva-lstm, the paper's recipe
    python scripts/train_text.py --train-files train.txt --valid-files valid.txt --test-files test.txt
    python scripts/train_text.py --model rnn-vae --kl-schedule warmup --kl-warmup-steps 20000
    python scripts/train_text.py --model hybrid-vae --aux-weight 0.2
    python scripts/train_text.py --preset tiny --train-files my.txt --max-steps 200

Defaults (preset paper): Adamax lr 2e-3, batch 512, 5 epochs, one sample, free bits on plateau with a
30-nat budget split over the 2L-1 = 13 latent groups; SentencePiece word tokenizer, 20,000 pieces,
sentences of at most 40 pieces. Without --train-files the text is BookCorpus streamed from the hub
copy rojagtap/bookcorpus (its two plain-text files; download books_large_p1.txt and
books_large_p2.txt once and pass them with --train-files to work offline). Without --valid-files /
--test-files, seeded held-out splits are carved from the training text. The tokenizer is trained
once and stored in the run directory (tokenizer.model); a sample of generated sentences is written
to samples/step_N.txt at every evaluation.

Under accelerate launch / torchrun, rank 0 prepares the data (tokenizer, token store) before the
processes connect and the other ranks wait for the finished store on disk, so no collective times
out however long the corpus takes (on several nodes the run and --cache-dir folders must be on a shared
filesystem); scripts/prepare_text.py does the same preparation beforehand, on every core, and this
script then reuses it.
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biva_text.cli import add_text_data_flags, check_text_data_flags, data_config, print_data_stats  # noqa: E402
from biva_text.names import DECODER_INITS, DECODER_INPUTS, KL_SCHEDULES, NON_AUTOREGRESSIVE, TEXT_MODELS, TEXT_PRESETS  # noqa: E402
from shared.cli import ArgumentParser, add_training_flags, fraction, nonneg_float, nonneg_int, positive_float  # noqa: E402
from shared.errors import UserError, run_cli  # noqa: E402

SAMPLES_PER_EVAL = 20
DECODER_VIEW = ("decoder_input", "decoder_init", "decoder_gain", "decoder_attention")  # how the LSTM reads z


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
                        "gain; the default of biva-lstm, chosen by measurement, see the README), normalised "
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
    if args.word_dropout is not None and args.word_dropout >= 1:
        p.error("--word-dropout must be below 1 (1 would hide every input word)")
    if args.model in NON_AUTOREGRESSIVE and args.word_dropout:
        p.error(f"{args.model} (no autoregression) has no decoder inputs to drop; drop --word-dropout")
    view = [f for f in DECODER_VIEW if getattr(args, f) is not None]
    if view and args.model in ("lstm-lm",) + NON_AUTOREGRESSIVE:
        p.error(f"{args.model} has no LSTM reading latents; drop --{view[0].replace('_', '-')}")
    if args.decoder_input == "none" and not args.decoder_attention and args.decoder_init != "latents":
        p.error("--decoder-input none leaves the LSTM blind to the latents; add --decoder-attention or "
                "--decoder-init latents")
    scaled_by_default = args.model in (None, "biva-lstm")  # biva-lstm's preset default is scaled
    no_gain = args.decoder_input in ("concat", "none") or (args.decoder_input is None and not scaled_by_default)
    if args.decoder_gain is not None and no_gain:
        p.error("--decoder-gain needs --decoder-input scaled or normalised")
    if args.aux_weight is not None and args.model != "hybrid-vae":
        p.error("--aux-weight is the hybrid-vae's auxiliary term; use it with --model hybrid-vae")
    if args.bow_weight and args.model not in (None, "biva-lstm"):
        p.error("--bow-weight is biva-lstm's bag-of-words term; use it with --model biva-lstm")
    if args.kl_warmup_steps is not None and args.kl_schedule == "free-bits":
        p.error("--kl-warmup-steps needs --kl-schedule warmup")
    return args


TOKENIZER_FIELDS = ("tokenizer", "vocab_size", "max_tokens", "tokenizer_sample")  # what the tokenizer is


def fine_tuning_defaults(args, source) -> None:
    """--init-from: the source's model and tokenizer (its tokenizer.model is copied: a piece id must mean
    the same word to the weights), unless a flag says otherwise; a different tokenizer is an error."""
    if not (source.path / "tokenizer.model").is_file():
        raise UserError(f"--init-from {source.record['run']} has no tokenizer.model; pass a text run directory "
                        f"or a folder written by scripts/export.py")
    args.model = args.model or source.config.model["model"]
    for name in TOKENIZER_FIELDS:
        given, theirs = getattr(args, name), source.config.data.get(name)
        if given is not None and given != theirs and name != "tokenizer_sample":
            raise UserError(f"--{name.replace('_', '-')} {given} differs from the --init-from run's {theirs} "
                            f"(a fine-tuning run keeps its tokenizer); drop the flag")
        setattr(args, name, theirs)


def attach_kl_warmup(trainer, steps: int) -> None:
    """KL weight min(1, step / steps) for the update after ``step`` optimiser steps, set from the
    trainer's step count after every optimiser step (exact on resume; skipped updates do not count)."""
    model = trainer.raw_model

    def weight(step: int) -> float:
        return 1.0 if steps <= 0 else min(1.0, step / steps)

    model.set_kl_weight(weight(trainer.state.step))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under Accelerate's wrapper
    optimizer.register_step_post_hook(lambda opt, a, kw: model.set_kl_weight(weight(trainer.state.step + 1)))


def main(argv=None) -> None:
    from shared.train import init_source

    args = parse_args(argv)
    source = init_source(args, "text")
    if source is not None:
        fine_tuning_defaults(args, source)
    # A new run on hub text trains its tokenizer on it first thing: check the hub before importing torch.
    fresh = not args.resume and not (args.output_dir and (args.output_dir / "tokenizer.model").exists())
    if fresh and not args.train_files and args.dataset != "files":
        from biva_text.names import DEFAULT_DATASET, HUB_ALIASES, HUB_FIX
        from shared.hub import require_hub_dataset

        dataset = args.dataset or DEFAULT_DATASET
        require_hub_dataset(HUB_ALIASES.get(dataset, dataset), HUB_FIX)
    # Heavy imports only after the flags are known to be good.
    from biva_text.data import TextDataConfig, TextDataset, prepare_text_data, wait_for_text_data
    from biva_text.decode import DecodeOptions, sample_prior, to_text
    from biva_text.model import TextModelConfig, build_text_model, num_params
    from biva_text.presets import get_preset
    from shared.cli import default_output_dir, training_overrides
    from shared.config import RunConfig, from_dict, replace, to_dict
    from shared.engine import Trainer, default_resume_command, launched_rank, process_state
    from shared.run_dir import check_output_dir, read_run_config, write_run_config
    from shared.train import check_init_reset, check_same_model, init_summary, open_run, start_weights

    preset_name = args.preset or "paper"
    if args.output_dir is None:
        args.output_dir = default_output_dir(preset_name)
    out = check_output_dir(args.output_dir, args.resume)
    cache_dir = str(args.cache_dir) if args.cache_dir else None
    if args.resume:
        saved = read_run_config(out, "text")
        data_cfg = from_dict(TextDataConfig, saved.data, "config.json data")
        cache_dir = cache_dir or saved.extra.get("cache_dir")  # the token store the run was trained from
    else:
        data_cfg = data_config(args)
    model_name = args.model or "biva-lstm"
    flags = {"model": args.model, "kl_schedule": args.kl_schedule, "kl_warmup_steps": args.kl_warmup_steps,
             "word_dropout": args.word_dropout, "decoder_input": args.decoder_input,
             "decoder_init": args.decoder_init, "decoder_gain": args.decoder_gain,
             "decoder_attention": args.decoder_attention, "aux_weight": args.aux_weight,
             "bow_weight": args.bow_weight, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
             "max_tokens": args.max_tokens,
             "dataset": data_cfg.dataset if (args.dataset or args.train_files) else None,
             "train_files": [str(p) for p in args.train_files] if args.train_files else None}

    def model_config(vocab_size: int):
        preset = get_preset(preset_name, model_name, vocab_size=vocab_size, max_tokens=data_cfg.max_tokens,
                            kl_schedule=args.kl_schedule, kl_warmup_steps=args.kl_warmup_steps)
        m = preset.model
        if args.word_dropout is not None:
            m.word_dropout = args.word_dropout
        for name in DECODER_VIEW:
            if getattr(args, name) is not None:
                setattr(m, name, getattr(args, name))
        if args.aux_weight is not None:
            m.hybrid.aux_weight = args.aux_weight
        if args.bow_weight is not None:
            m.bow_weight = args.bow_weight
        return preset

    if source is not None:  # before anything is written: the tokenizer copy below is the first write
        check_same_model(source, to_dict(model_config(source.config.model["vocab_size"]).model))
    # Preparing BookCorpus takes far longer than a collective's timeout, so it happens before the process
    # group forms: rank 0 prepares, the other ranks wait for the finished store on disk (a file barrier).
    main_rank = launched_rank() == 0
    had_tokenizer = (out / "tokenizer.model").exists()
    had_dir = out.exists()
    try:
        if source is not None and not had_tokenizer and main_rank:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.path / "tokenizer.model", out / "tokenizer.model")
        if not main_rank:
            wait_for_text_data(data_cfg, out, cache_dir, say=lambda: print(
                f"rank {launched_rank()}: waiting for rank 0 to prepare the text data", file=sys.stderr))
        splits = prepare_text_data(data_cfg, out, cache_dir=cache_dir)
    except BaseException:
        if main_rank and not args.resume and not had_tokenizer:  # leave no half-made run behind
            for suffix in (".model", ".vocab"):
                (out / f"tokenizer{suffix}").unlink(missing_ok=True)
            if not had_dir and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    state = process_state()  # not PartialState(): CPU processes under torchrun must join
    vocab_size = splits.load_tokenizer().vocab_size

    def fresh_run() -> RunConfig:
        preset = model_config(vocab_size)
        train = replace(preset.train, "training flags", split_seed=data_cfg.split_seed, **training_overrides(args))
        m = preset.model
        effective = {"model": m.model, "kl_schedule": m.kl_schedule, "kl_warmup_steps": m.kl_warmup_steps,
                     "word_dropout": m.word_dropout, "decoder_input": m.decoder_input,
                     "decoder_init": m.decoder_init, "decoder_gain": m.decoder_gain,
                     "decoder_attention": m.decoder_attention,
                     "aux_weight": m.hybrid.aux_weight if m.hybrid else None, "bow_weight": m.bow_weight,
                     "tokenizer": data_cfg.tokenizer, "vocab_size": data_cfg.vocab_size,
                     "max_tokens": data_cfg.max_tokens, "dataset": data_cfg.dataset,
                     "train_files": data_cfg.train_files or None}
        data_stats = {k: splits.stats[k] for k in ("splits", "tokenizer", "read", "max_tokens") if k in splits.stats}
        return RunConfig(modality="text", preset=preset_name, model=to_dict(m), data=to_dict(data_cfg),
                         train=train, extra={"flags": effective, "data_stats": data_stats, "cache_dir": cache_dir})

    run, out = open_run(args, "text", fresh_run, flags, source)
    model_cfg = from_dict(TextModelConfig, run.model, "config.json model").validate()
    if model_cfg.vocab_size != vocab_size:
        raise UserError(f"the run's model has {model_cfg.vocab_size} pieces but {out / 'tokenizer.model'} has "
                        f"{vocab_size}; keep the run's own tokenizer")
    check_init_reset(run, lambda: build_text_model(model_cfg))  # before config.json marks the run as started
    if state.is_main_process and not args.resume:
        write_run_config(out, run)
    state.wait_for_everyone()

    tokenizer = splits.load_tokenizer()

    def on_evaluate(ema_model, step, run_dir):
        tokens = sample_prior(ema_model, SAMPLES_PER_EVAL, DecodeOptions(method="sample", seed=0))
        path = Path(run_dir) / "samples" / f"step_{step}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        sentences = to_text(tokenizer, tokens)
        path.write_text("\n".join(sentences) + "\n")
        return {"samples": sentences}  # for the trackers (--report-to)

    trainer = Trainer(run, lambda: build_text_model(model_cfg), TextDataset(splits.train), TextDataset(splits.valid),
                      out, resume=args.resume, on_evaluate=on_evaluate, init_weights=start_weights(run, out, args.resume),
                      resume_command=default_resume_command(__file__, argv))
    if model_cfg.kl_schedule == "warmup":
        attach_kl_warmup(trainer, model_cfg.kl_warmup_steps)
    if state.is_main_process:
        print_data_stats(splits.stats)
        schedule = {"free-bits": f"free bits, budget {run.train.free_bits_budget:g} nats over "
                                 f"{trainer.raw_model.num_groups} groups",
                    "warmup": f"KL warm-up over {model_cfg.kl_warmup_steps} steps",
                    None: "no latent variables"}[model_cfg.kl_schedule]
        print(f"{run.preset} preset, {model_cfg.model}, {num_params(trainer.raw_model) / 1e6:.2f}M parameters, "
              f"T = {model_cfg.seq_len}, {schedule}; {len(splits.train)} train / {len(splits.valid)} valid "
              f"sentences -> {out}", file=sys.stderr)
        if run.init_from is not None:
            print(init_summary(run.init_from), file=sys.stderr)
    summary = trainer.fit()
    if state.is_main_process:
        v = summary["valid"]
        ppl = math.exp(v["nats_per_dim"])  # exp(sum of -ELBO / sum of tokens)
        print(f"step {summary['step']}: valid ELBO {v['elbo']:.3f} nats per sentence, KL {v['kl']:.3f}, "
              f"perplexity <= {ppl:.2f}; run directory {out}")


if __name__ == "__main__":
    run_cli(main)
