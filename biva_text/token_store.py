"""The cached token store: every split encoded once into memory-mapped uint16 arrays.

Each split is encoded (SentencePiece's multi-threaded batch encode) into
``<cache_dir>/<fingerprint>/{split}_tokens.npy``, ``uint16 (N, max_tokens + 1)``, each row the pieces,
EOS, then PAD (0), plus ``{split}_lengths.npy`` (``int32``, pieces + 1) and ``stats.json``. The
fingerprint covers the data source (file paths, sizes and modification times, the hub id, or a
bundled corpus's hash), the tokenizer file's hash, ``max_tokens`` and the split settings; a second
run with the same inputs memory-maps the arrays without reading or tokenising any text. The default
cache directory is ``$XDG_CACHE_HOME/biva/text`` (``~/.cache/biva/text``).

Filters, in this order, each counted per split: more than ``max_tokens`` pieces (``too_long``; pieces
without begin/end markers), then with the ``word`` model a word outside the vocabulary (``oov``, as in
the paper; the ``unigram`` model has byte fallback and so no OOV).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from shared.debug_hooks import prepare_hook
from shared.errors import UserError

from .splits import SPLIT_CODE, SPLITS
from .tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer


STORE_FORMAT = 1


@dataclass
class TokenArray:
    """One split: ``tokens`` uint16 (N, max_tokens + 1), memory-mapped; ``lengths`` int32 (N,)."""

    tokens: np.ndarray  # each row = pieces + EOS, then PAD (0)
    lengths: np.ndarray  # number of predicted tokens = pieces + 1 (the EOS)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(np.asarray(self.lengths, dtype=np.int64).sum())

    # A pickled np.memmap is a full in-memory copy; send the file names to DataLoader workers instead.
    def __getstate__(self) -> dict:
        files = [getattr(a, "filename", None) for a in (self.tokens, self.lengths)]
        if all(files):
            return {"files": files}
        return {"tokens": np.asarray(self.tokens), "lengths": np.asarray(self.lengths)}

    def __setstate__(self, state: dict) -> None:
        if "files" in state:
            self.tokens, self.lengths = (load_npy(Path(f)) for f in state["files"])
        else:
            self.tokens, self.lengths = state["tokens"], state["lengths"]


class NpyRowWriter:
    """Streams rows into a ``.npy`` whose length is known only at the end: a fixed 128-byte header
    is written first and rewritten with the row count on ``close``."""

    HEADER_BYTES = 128

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype):
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.rows = 0
        self.file = open(path, "wb")
        self.file.write(self._header())

    def _header(self) -> bytes:
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {(self.rows, *self.row_shape)!r}, }}"
        prefix = np.lib.format.magic(1, 0) + struct.pack("<H", self.HEADER_BYTES - 10)
        return prefix + text.ljust(self.HEADER_BYTES - 11).encode("latin1") + b"\n"

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        assert rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
        self.file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(self._header())
        self.file.close()


def encode_store(source, tokenizer: Tokenizer, max_tokens: int, out: Path, num_threads: int) -> dict:
    """Encode every split of ``source`` (a ``sources.Source``) into ``out``; returns the per-split filter counts."""
    width = max_tokens + 1
    writers = {name: (NpyRowWriter(out / f"{name}_tokens.npy", (width,), np.uint16),
                      NpyRowWriter(out / f"{name}_lengths.npy", (), np.int32)) for name in SPLITS}
    counts = {name: {"sentences": 0, "too_long": 0, "oov": 0, "kept": 0, "tokens": 0} for name in SPLITS}
    by_code = [counts[name] for name in SPLITS]
    bar = tqdm(total=source.expected_sentences(), unit=" sentences", unit_scale=True, desc="tokenising", leave=False,
               disable=None)
    try:
        for codes, sentences in source.chunks():
            encoded = tokenizer.encode(sentences, num_threads=num_threads)
            rows = np.full((len(sentences), width), PAD_ID, dtype=np.uint16)
            lengths = np.zeros(len(sentences), dtype=np.int32)
            keep = np.zeros(len(sentences), dtype=bool)
            for j, pieces in enumerate(encoded):
                split_counts = by_code[codes[j]]
                split_counts["sentences"] += 1
                if len(pieces) > max_tokens:
                    split_counts["too_long"] += 1
                elif UNK_ID in pieces:  # only the word model has UNK (unigram falls back to bytes)
                    split_counts["oov"] += 1
                else:
                    rows[j, :len(pieces)] = pieces
                    rows[j, len(pieces)] = EOS_ID
                    lengths[j] = len(pieces) + 1
                    keep[j] = True
            for name in SPLITS:
                selected = keep & (codes == SPLIT_CODE[name])
                writers[name][0].append(rows[selected])
                writers[name][1].append(lengths[selected])
                counts[name]["kept"] += int(selected.sum())
                counts[name]["tokens"] += int(lengths[selected].sum())
            bar.update(len(sentences))
    finally:
        bar.close()
        for pair in writers.values():
            for writer in pair:
                writer.close()
    return counts


def load_npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r") if path.stat().st_size > NpyRowWriter.HEADER_BYTES else np.load(path)


def load_store(store: Path) -> dict[str, TokenArray]:
    return {name: TokenArray(load_npy(store / f"{name}_tokens.npy"), load_npy(store / f"{name}_lengths.npy"))
            for name in SPLITS}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "biva" / "text"


def _split_key(cfg) -> dict:
    return {"seed": cfg.split_seed, "test_size": cfg.test_size, "valid_size": cfg.valid_size,
            "max_sentences": cfg.max_sentences}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def store_fingerprint(cfg, source_description: dict, tokenizer_sha256: str) -> str:
    return _digest({"format": STORE_FORMAT, "source": source_description, "tokenizer_sha256": tokenizer_sha256,
                    "max_tokens": cfg.max_tokens, "split": _split_key(cfg)})


def cached_tokenizer_path(cfg, source_description: dict, cache_root: Path) -> Path:
    """Where the tokenizer trained on this data with these settings is kept, so that every run on the
    same data (and scripts/prepare_text.py before them) shares one tokenizer and so one token store.
    The sample depends on the split rule (only training sentences are used), not on max_tokens."""
    key = _digest({"format": STORE_FORMAT, "source": source_description, "tokenizer": cfg.tokenizer,
                   "vocab_size": cfg.vocab_size, "tokenizer_sample": cfg.tokenizer_sample, "split": _split_key(cfg)})
    return cache_root / "tokenizers" / f"{key}.model"


def copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_tmp(store: Path) -> None:
    """Temporary folders of this store left by a killed preparation on this machine (its pid is gone)."""
    for tmp in store.parent.glob(f".{store.name}.tmp-*"):
        pid = tmp.name.split("-")[-2]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass


def build_store(source, tokenizer: Tokenizer, cfg, store: Path, num_threads: int,
                tokenizer_stats: dict) -> None:
    """Encode into a temporary folder beside ``store``, check no split is empty, then move it in place
    (``stats.json`` last inside it: the completion marker)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(store)
    tmp = store.parent / f".{store.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        prepare_hook("encode")
        split_counts = encode_store(source, tokenizer, cfg.max_tokens, tmp, num_threads)
        for name in SPLITS:
            if split_counts[name]["kept"] == 0:
                c = split_counts[name]
                raise UserError(
                    f"the {name} split is empty after filtering ({c['sentences']} sentences: {c['too_long']} longer than "
                    f"{cfg.max_tokens} pieces, {c['oov']} with out-of-vocabulary words); "
                    "give more text or raise --max-tokens or --vocab-size"
                )
        stats = {
            "format": STORE_FORMAT,
            "source": source.describe(),
            "read": source.read_stats,
            "split_rule": source.split_rule,
            "splits": split_counts,
            "max_tokens": cfg.max_tokens,
            "tokenizer": tokenizer_stats,
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        try:
            os.replace(tmp, store)
        except OSError:
            if not (store / "stats.json").exists():  # not another process finishing first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
