"""A text training run from parsed flags (scripts/train_text.py is its command line): the preset, the
data (prepared on rank 0 before the processes connect, the other ranks waiting for the finished
store on disk), the run directory, the model, and the engine's Trainer.

Preparing BookCorpus takes far longer than a collective's timeout, so it happens before the process
group forms: a file barrier (data.wait_for_text_data), no collective.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from shared.errors import UserError

from .names import DATASET_PRESET, DEFAULT_DATASET, HUB_ALIASES, HUB_FIX

SAMPLES_PER_EVAL = 20  # prior samples written to samples/step_N.txt at every evaluation
DECODER_VIEW = ("decoder_input", "decoder_init", "decoder_gain", "decoder_attention")  # how the LSTM reads z
TOKENIZER_FIELDS = ("tokenizer", "vocab_size", "max_tokens", "tokenizer_sample")  # what the tokenizer is
MODEL_FLAGS = ("model", "kl_schedule", "kl_warmup_steps", "word_dropout", *DECODER_VIEW, "aux_weight", "bow_weight")
DEFAULT_PRESET = "paper"  # the paper's recipe, on BookCorpus


def choose_preset(args: argparse.Namespace) -> tuple[str, str | None]:
    """The preset of a new run and why: --preset, else the one a bundled --dataset picks (a CPU-sized
    one, as image size picks an image preset), else the paper's."""
    if args.preset:
        return args.preset, None
    if not args.train_files and args.dataset in DATASET_PRESET:
        return DATASET_PRESET[args.dataset], f"--dataset {args.dataset}"
    return DEFAULT_PRESET, None


def fine_tuning_defaults(args: argparse.Namespace, source) -> None:
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


def model_preset(args: argparse.Namespace, preset_name: str, vocab_size: int, max_tokens: int):
    """The preset for the flags' model, with the model flags applied and validated (TextModelConfig.validate:
    the one place model settings are checked)."""
    from .presets import get_preset

    preset = get_preset(preset_name, args.model or "biva-lstm", vocab_size=vocab_size, max_tokens=max_tokens,
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
    m.validate()
    return preset


def train_text(args: argparse.Namespace, argv: list[str] | None = None, script: str | None = None) -> dict:
    """Train the run the parsed flags ask for; returns the engine's final summary. ``argv`` and ``script``
    make the resume command printed when the run is stopped."""
    from shared.train import init_source

    source = init_source(args, "text")
    if source is not None:
        fine_tuning_defaults(args, source)
    preset_name, chosen_by = choose_preset(args)
    if not args.resume and any(getattr(args, name) is not None for name in MODEL_FLAGS):
        # The model flags, checked before any data is read (a preset alone is valid: no torch import yet).
        model_preset(args, preset_name, args.vocab_size or 20000, args.max_tokens or 40)
    # A new run on hub text trains its tokenizer on it first thing: check the hub before reading anything.
    from .cli import data_config, is_hub_dataset, print_data_stats

    fresh = not args.resume and not (args.output_dir and (args.output_dir / "tokenizer.model").exists())
    if fresh and is_hub_dataset(args):
        from shared.hub import require_hub_dataset

        dataset = args.dataset or DEFAULT_DATASET
        require_hub_dataset(HUB_ALIASES.get(dataset, dataset), HUB_FIX)
    from shared.cli import default_output_dir, training_overrides
    from shared.config import RunConfig, from_dict, replace, to_dict
    from shared.engine import Trainer
    from shared.launch import default_resume_command, launched_rank, process_state
    from shared.run_dir import check_output_dir, read_run_config, write_run_config
    from shared.train import check_init_reset, check_same_model, init_summary, open_run, start_weights

    from .data import TextDataConfig, TextDataset, prepare_text_data, wait_for_text_data
    from .decode import DecodeOptions, sample_prior, to_text
    from .model import TextModelConfig, build_text_model, num_params
    from .presets import get_preset

    if args.output_dir is None:
        args.output_dir = default_output_dir(preset_name)
    out = check_output_dir(args.output_dir, args.resume)
    main_rank = launched_rank() == 0
    if chosen_by and main_rank and not args.resume:
        print(f"{preset_name} preset, chosen for {chosen_by}: {get_preset(preset_name).description} "
              f"(--preset picks another)", file=sys.stderr)
    cache_dir = str(args.cache_dir) if args.cache_dir else None
    if args.resume:
        saved = read_run_config(out, "text")
        data_cfg = from_dict(TextDataConfig, saved.data, "config.json data")
        cache_dir = cache_dir or saved.extra.get("cache_dir")  # the token store the run was trained from
    else:
        data_cfg = data_config(args)
    flags = {"model": args.model, "kl_schedule": args.kl_schedule, "kl_warmup_steps": args.kl_warmup_steps,
             "word_dropout": args.word_dropout, "decoder_input": args.decoder_input,
             "decoder_init": args.decoder_init, "decoder_gain": args.decoder_gain,
             "decoder_attention": args.decoder_attention, "aux_weight": args.aux_weight,
             "bow_weight": args.bow_weight, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
             "max_tokens": args.max_tokens,
             "dataset": data_cfg.dataset if (args.dataset or args.train_files) else None,
             "train_files": [str(p) for p in args.train_files] if args.train_files else None}

    def model_config(vocab_size: int):
        return model_preset(args, preset_name, vocab_size, data_cfg.max_tokens)

    if source is not None:  # before anything is written: the tokenizer copy below is the first write
        check_same_model(source, to_dict(model_config(source.config.model["vocab_size"]).model))
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
                      resume_command=default_resume_command(script, argv))
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
    return summary
