"""Sentence data for the text BIVA (docs/design.md §7): the data config, and its assembly into token splits.

The parts: ``sources`` (files, hub streams, the bundled Austen corpus: reading, counting), ``splits``
(the seeded train/valid/test carving), ``tokenizer`` (SentencePiece) and ``token_store`` (the
cached, memory-mapped uint16 arrays and their fingerprints). Here: ``TextDataConfig``,
``prepare_text_data`` (the two stages, tokenizer then store), the barrier other processes wait on,
and the torch dataset over a split.

Splits
    Without ``--test-files`` / ``--valid-files``, ``test_size`` then ``valid_size`` sentences are
    carved from the training corpus, each at most a tenth of it (``splits.HELDOUT_CAP``), by a
    seeded hash of the sentence's index. Held-out sentences go through the same filters as the
    training ones, so the final counts in ``stats["splits"]`` are a little lower than the targets.

Tokenizer
    Trained on a bounded sample of the training split (every k-th training sentence of a corpus of
    known length, the first ones of a stream), stored as ``<run_dir>/tokenizer.model`` and reused when
    it is there, so a resumed run never retrains it. A copy under ``<cache_dir>/tokenizers/`` (keyed by
    the data source, tokenizer settings and split rule) lets a new run on the same data, or
    ``scripts/prepare_text.py`` before it, share the tokenizer and hence the token store. When several
    processes share the run directory, one prepares and the others ``wait_for_text_data``.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from shared.errors import UserError
from shared.checkpoints import file_sha256

from .names import DEFAULT_DATASET, HUB_ALIASES, HUB_FIX  # noqa: F401  (HUB_ALIASES: scripts/export.py)
from .sources import Source, make_source, new_read_counts, read_sentences  # noqa: F401
from .splits import SPLITS, split_hash  # noqa: F401
from .token_store import (TokenArray, build_store, cached_tokenizer_path, copy_atomic, default_cache_dir,  # noqa: F401
                          load_store, store_fingerprint)
from .tokenizer import MODEL_TYPES, Tokenizer, train_tokenizer


@dataclass
class TextDataConfig:
    dataset: str = DEFAULT_DATASET  # hub id (or alias) read as plain text, a bundled corpus ("austen"); "files" when train_files is given
    train_files: list[str] = field(default_factory=list)  # local text files, one sentence per line
    valid_files: list[str] = field(default_factory=list)
    test_files: list[str] = field(default_factory=list)
    max_tokens: int = 40  # pieces, without begin/end markers
    test_size: int = 10000  # held-out sentences carved (seeded) when no test file is given
    valid_size: int = 10000  # likewise for validation; both capped at a tenth of the corpus
    split_seed: int = 0
    tokenizer: str = "word"  # "word" | "unigram"
    vocab_size: int = 20000
    tokenizer_sample: int = 2_000_000  # sentences used to train the tokenizer
    max_sentences: int | None = None  # optional cap on the training corpus read (quick runs)


@dataclass
class TextSplits:
    train: TokenArray
    valid: TokenArray
    test: TokenArray
    tokenizer_path: Path
    stats: dict  # JSON-able: every filter counted, per split; see prepare_text_data

    def split(self, name: str) -> TokenArray:
        return getattr(self, name)

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)


class TextDataset(torch.utils.data.Dataset):
    """Items ``{"index": i, "tokens": LongTensor (max_tokens + 1,), "length": int}``."""

    def __init__(self, split: TokenArray):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    @property
    def lengths(self) -> np.ndarray:
        """Predicted tokens per sentence (N,): what the engine's length buckets sort by."""
        return np.asarray(self.split.lengths)

    def __getitem__(self, i: int) -> dict:
        tokens = torch.from_numpy(np.asarray(self.split.tokens[i], dtype=np.int64))
        return {"index": int(i), "tokens": tokens, "length": int(self.split.lengths[i])}


def validate_text_config(cfg: TextDataConfig) -> None:
    """Reject impossible settings with a ``UserError`` before anything is read."""
    if cfg.tokenizer not in MODEL_TYPES:
        raise UserError(f"--tokenizer must be one of {', '.join(MODEL_TYPES)}, got {cfg.tokenizer!r}")
    if not 5 <= cfg.vocab_size <= 65536:
        raise UserError(f"--vocab-size must be between 5 and 65536 (ids are stored as uint16), got {cfg.vocab_size}")
    if cfg.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {cfg.max_tokens}")
    for name in ("test_size", "valid_size", "tokenizer_sample"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_sentences is not None and cfg.max_sentences < 1:
        raise UserError(f"--max-sentences must be at least 1, got {cfg.max_sentences}")
    if cfg.dataset == "files" and not cfg.train_files:
        raise UserError("--dataset files needs --train-files (text files, one sentence per line)")


def prepare_text_data(cfg: TextDataConfig, run_dir: str | Path | None, cache_dir: str | Path | None = None,
                      num_proc: int | None = None) -> TextSplits:
    """Read, split, train or reuse ``<run_dir>/tokenizer.model``, and encode into the cached store.

    Two stages, each finished atomically and skipped when already done (so an interrupted
    preparation restarts at the stage it was in): the tokenizer (kept in the run directory and in
    ``<cache_dir>/tokenizers/``, whence a new run on the same data copies it) and the token store.
    ``run_dir`` None (scripts/prepare_text.py) fills the cache only.

    ``stats`` holds ``read`` (per source: lines, empty, undecodable, sentences), ``splits`` (per
    split: sentences, too_long, oov, kept, tokens), ``split_rule``, ``tokenizer`` (type, asked and
    actual vocabulary size, sample size when trained now), ``max_tokens``, ``store`` and
    ``cache_hit``. ``num_proc`` is the number of encoding threads (default: all CPUs).
    """
    validate_text_config(cfg)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    num_threads = num_proc or os.cpu_count() or 1
    source = make_source(cfg)
    shared_tokenizer = cached_tokenizer_path(cfg, source.describe(), cache_root)
    if run_dir is None:
        tokenizer_path = shared_tokenizer
    else:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_path = run_dir / "tokenizer.model"

    planned = False
    sample_size = None
    if not tokenizer_path.exists() and shared_tokenizer.exists():
        copy_atomic(shared_tokenizer, tokenizer_path)
    if not tokenizer_path.exists():
        source.plan()
        planned = True
        sample_size = _train_run_tokenizer(source, cfg, tokenizer_path, num_threads)
    if not shared_tokenizer.exists():
        copy_atomic(tokenizer_path, shared_tokenizer)
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.model_type != cfg.tokenizer:
        raise UserError(f"{tokenizer_path} is a {tokenizer.model_type} tokenizer but --tokenizer {cfg.tokenizer} was asked; "
                        "use the run's own setting or a new --output-dir")
    fingerprint = store_fingerprint(cfg, source.describe(), file_sha256(tokenizer_path))
    store = cache_root / fingerprint
    tokenizer_stats = {"model_type": tokenizer.model_type, "vocab_size_requested": cfg.vocab_size,
                       "vocab_size": tokenizer.vocab_size, "sample_sentences": sample_size,
                       "trained_now": sample_size is not None}

    if not (store / "stats.json").exists():
        if not planned:
            source.plan()
        build_store(source, tokenizer, cfg, store, num_threads, tokenizer_stats)
        cache_hit = False
    else:
        cache_hit = True
    stats = json.loads((store / "stats.json").read_text())
    stats.update(cache_hit=cache_hit, store=str(store), tokenizer_path=str(tokenizer_path))
    stats["tokenizer"].update(sample_sentences=sample_size, trained_now=sample_size is not None)
    arrays = load_store(store)
    return TextSplits(train=arrays["train"], valid=arrays["valid"], test=arrays["test"],
                      tokenizer_path=tokenizer_path, stats=stats)


def text_data_ready(cfg: TextDataConfig, run_dir: str | Path, cache_dir: str | Path | None = None) -> bool:
    """Whether ``prepare_text_data`` would find both stages done (the token store's completion marker,
    ``stats.json``, is in place), without reading any text."""
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = make_source(cfg)
    tokenizer = Path(run_dir) / "tokenizer.model"
    if not tokenizer.exists():
        tokenizer = cached_tokenizer_path(cfg, source.describe(), cache_root)
        if not tokenizer.exists():
            return False
    store = cache_root / store_fingerprint(cfg, source.describe(), file_sha256(tokenizer))
    return (store / "stats.json").exists()


def wait_for_text_data(cfg: TextDataConfig, run_dir: str | Path, cache_dir: str | Path | None = None,
                       poll_s: float = 1.0, say=None) -> None:
    """Block until another process has prepared the data (a file barrier: no collective, so no
    timeout however long BookCorpus takes; the launcher stops this process if that one fails)."""
    if text_data_ready(cfg, run_dir, cache_dir):
        return
    if say is not None:
        say()
    while not text_data_ready(cfg, run_dir, cache_dir):
        time.sleep(poll_s)


def _train_run_tokenizer(source: Source, cfg: TextDataConfig, tokenizer_path: Path, num_threads: int) -> int:
    taken = 0

    def counted() -> Iterator[str]:
        nonlocal taken
        for sentence in source.tokenizer_sample(cfg.tokenizer_sample):
            taken += 1
            yield sentence

    prefix = tokenizer_path.parent / f".tokenizer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model = train_tokenizer(counted(), prefix, vocab_size=cfg.vocab_size, model_type=cfg.tokenizer,
                                max_sentences=cfg.tokenizer_sample, num_threads=num_threads)
        os.replace(model, tokenizer_path)
        os.replace(prefix.with_name(prefix.name + ".vocab"), tokenizer_path.with_suffix(".vocab"))
    finally:
        for suffix in (".model", ".vocab"):
            prefix.with_name(prefix.name + suffix).unlink(missing_ok=True)
    return taken
