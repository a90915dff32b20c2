"""Sentence data for the text BIVA: reading, splits, tokenizer and the cached token store (DESIGN.md §7).

Sources
    * ``dataset="bookcorpus"`` (default) streams BookCorpus with ``datasets`` from the hub copy
      ``rojagtap/bookcorpus``: the two original plain-text files ``books_large_p1.txt`` and
      ``books_large_p2.txt`` (74,004,228 lines, one lower-cased, tokenised sentence per line), which
      ``load_dataset`` reads with its plain ``text`` builder (a single ``text`` column). The old
      ``bookcorpus`` loading script no longer runs in current ``datasets``. Any other hub id whose
      rows have a ``text`` column works the same way.
    * Local files: ``--train-files`` (and optionally ``--valid-files`` / ``--test-files``), UTF-8,
      one sentence per line. Offline, download those two BookCorpus files once and pass them with
      ``--train-files``. Lines are decoded one by one: empty or blank lines and lines that are not
      UTF-8 are skipped and counted, never a crash.

Splits
    Without ``--test-files`` / ``--valid-files``, ``test_size`` then ``valid_size`` sentences are
    carved from the training corpus, each at most a tenth of it. The rule is a seeded 64-bit hash of
    the sentence's index (its position among the corpus's usable lines), so it is reproducible and
    independent of the tokenizer: for files the held-out sentences are the ones with the smallest
    hashes (a seeded permutation, exact sizes); for a hub stream, whose length is not known in
    advance, a sentence is held out when its hash falls below ``test_size / expected size`` (sizes
    within a few percent of the target). Held-out sentences go through the same filters as the
    training ones, so the final counts in ``stats["splits"]`` are a little lower than the targets.

Filters, in this order, each counted per split: more than ``max_tokens`` pieces (``too_long``;
pieces without begin/end markers), then with the ``word`` model a word outside the vocabulary
(``oov``, as in the paper; the ``unigram`` model has byte fallback and so no OOV).

Tokenizer
    Trained on a bounded sample of the training split (every k-th training sentence for files, the
    first ones of a stream), stored as ``<run_dir>/tokenizer.model`` and reused when it is there, so
    a resumed run never retrains it. A copy under ``<cache_dir>/tokenizers/`` (keyed by the data
    source, tokenizer settings and split rule) lets a new run on the same data, or
    ``scripts/prepare_text.py`` before it, share the tokenizer and hence the token store. When several
    processes share the run directory, one prepares and the others ``wait_for_text_data``.

Token store
    Each split is encoded once (SentencePiece's multi-threaded batch encode) into
    ``<cache_dir>/<fingerprint>/{split}_tokens.npy``, ``uint16 (N, max_tokens + 1)``, each row the
    pieces, EOS, then PAD (0), plus ``{split}_lengths.npy`` (``int32``, pieces + 1) and
    ``stats.json``. The fingerprint covers the data source (file paths, sizes and modification
    times, or the hub id), the tokenizer file's hash, ``max_tokens`` and the split settings; a
    second run with the same inputs memory-maps the arrays without reading or tokenising any text.
    The default cache directory is ``$XDG_CACHE_HOME/biva/text`` (``~/.cache/biva/text``).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import struct
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from shared.debug_hooks import prepare_hook
from shared.errors import UserError
from shared.run_dir import file_sha256

from .names import DEFAULT_DATASET, HUB_ALIASES, HUB_FIX
from .tokenizer import EOS_ID, MODEL_TYPES, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

SPLITS = ("train", "valid", "test")
_CODE = {name: code for code, name in enumerate(SPLITS)}  # split of a sentence, as uint8
# Lines in the hub copies we know: the held-out fraction of a stream is size / this.
_HUB_LINES = {"rojagtap/bookcorpus": 74_004_228}
# Plain-text hub copies: read by the `text` builder, which accepts `encoding_errors`.
_PLAIN_TEXT_HUB = {"rojagtap/bookcorpus"}
_UNKNOWN_STREAM_FRACTION = 0.01
_HELDOUT_CAP = 0.1  # carve at most a tenth of a small corpus for each held-out split
_CHUNK = 8192  # sentences per encode batch
_STORE_FORMAT = 1


@dataclass
class TextDataConfig:
    dataset: str = DEFAULT_DATASET  # hub id (or alias) read as plain text; "files" when train_files is given
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
            self.tokens, self.lengths = (_load_npy(Path(f)) for f in state["files"])
        else:
            self.tokens, self.lengths = state["tokens"], state["lengths"]


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


# --------------------------------------------------------------------------------------------
# Reading


def new_read_counts() -> dict:
    return {"lines": 0, "empty": 0, "undecodable": 0, "sentences": 0}


def read_sentences(paths: str | Path | Iterable[str | Path], counts: dict | None = None,
                   progress: bool = True) -> Iterator[str]:
    """Usable lines of ``paths``, stripped; empty/blank and non-UTF-8 lines are skipped and counted.

    ``counts`` (optional, updated in place) gets ``lines``, ``empty``, ``undecodable`` and
    ``sentences``. A missing file, or one without a single usable line, is a ``UserError``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    for path in paths:
        _check_file(path)
    counts = counts if counts is not None else {}
    for key, zero in new_read_counts().items():
        counts.setdefault(key, zero)
    return _read_lines(paths, counts, progress)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"text file {path} does not exist; pass existing files to --train-files/--valid-files/--test-files")
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass text files (one sentence per line), not folders")
    with open(path, "rb") as f:
        if b"\x00" in f.read(8192):  # NUL bytes: binary data, not text in any common encoding
            raise UserError(f"{path} holds binary data, not text; pass UTF-8 text files with one sentence per line")


def _read_lines(paths: list[Path], counts: dict, progress: bool) -> Iterator[str]:
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading text", disable=None if progress else True,
              leave=False) as bar:
        for path in paths:
            before = dict(counts)
            unreported = 0
            try:
                handle = open(path, "rb")
            except OSError as err:
                raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
            with handle:
                for number, raw in enumerate(handle):
                    unreported += len(raw)
                    if unreported > 1 << 20:
                        bar.update(unreported)
                        unreported = 0
                    counts["lines"] += 1
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        counts["undecodable"] += 1
                        continue
                    if number == 0:
                        line = line.lstrip("\ufeff")  # byte-order mark
                    line = line.strip()
                    if not line:
                        counts["empty"] += 1
                        continue
                    counts["sentences"] += 1
                    yield line
            bar.update(unreported)
            if counts["sentences"] == before["sentences"]:
                lines, empty, undecodable = (counts[k] - before[k] for k in ("lines", "empty", "undecodable"))
                raise UserError(
                    f"{path} has no usable sentence ({lines} lines: {empty} empty or blank, "
                    f"{undecodable} not UTF-8); expected UTF-8 text with one sentence per line"
                )


# --------------------------------------------------------------------------------------------
# Seeded split rule


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_hash(seed: int, index: np.ndarray) -> np.ndarray:
    """A seeded 64-bit hash of sentence indices: the same on every machine and numpy version."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) * golden + golden)
        return _mix64(np.asarray(index, dtype=np.uint64) * golden ^ key)


def _smallest_hashes(seed: int, n: int, k: int) -> np.ndarray:
    """Indices in ``range(n)`` of the ``k`` smallest hashes, in hash order: the first ``k`` entries
    of a seeded permutation, found in chunks so ``n`` can be tens of millions."""
    best_idx = np.zeros(0, dtype=np.int64)
    best_hash = np.zeros(0, dtype=np.uint64)
    if k == 0:
        return best_idx
    for start in range(0, n, 1 << 22):
        idx = np.arange(start, min(n, start + (1 << 22)), dtype=np.int64)
        idx = np.concatenate([best_idx, idx])
        hashes = np.concatenate([best_hash, split_hash(seed, idx[len(best_idx):])])
        if len(idx) > k:
            keep = np.argpartition(hashes, k - 1)[:k]
            idx, hashes = idx[keep], hashes[keep]
        best_idx, best_hash = idx, hashes
    order = np.argsort(best_hash, kind="stable")
    return best_idx[order]


# --------------------------------------------------------------------------------------------
# Sources: the training corpus (files or a hub stream) plus optional held-out files


class _Source(ABC):
    """Usable sentences of the training corpus, their split codes, and the held-out files."""

    def __init__(self, cfg: TextDataConfig):
        self.cfg = cfg
        self.heldout_files = {"valid": [Path(p) for p in cfg.valid_files], "test": [Path(p) for p in cfg.test_files]}
        for paths in self.heldout_files.values():
            for path in paths:
                _check_file(path)
        self.read_stats: dict[str, dict] = {}
        self.split_rule: dict = {}

    @abstractmethod
    def describe(self) -> dict:
        """What identifies the data in the store's fingerprint (no reading)."""
        ...

    @abstractmethod
    def plan(self) -> None:
        """Count what must be counted and fix the split rule."""
        ...

    @abstractmethod
    def train_chunks(self) -> Iterator[list[str]]:
        """Usable sentences of the training corpus, in order, in chunks (a fresh pass)."""
        ...

    @abstractmethod
    def split_codes(self, start: int, count: int) -> np.ndarray:
        """Split codes (uint8) of training-corpus sentences ``start .. start + count - 1``."""
        ...

    @abstractmethod
    def tokenizer_sample(self, limit: int) -> Iterator[str]:
        ...

    @abstractmethod
    def expected_sentences(self) -> int | None:
        ...

    def _carved(self, name: str) -> bool:
        return not self.heldout_files[name]

    def _describe_files(self) -> dict:
        return {name: [_file_key(p) for p in paths] for name, paths in self.heldout_files.items()}

    def _count_heldout_files(self) -> None:
        for name, paths in self.heldout_files.items():
            if paths:
                counts = new_read_counts()
                for _ in read_sentences(paths, counts):
                    pass
                self.read_stats[name] = counts

    def chunks(self) -> Iterator[tuple[np.ndarray, list[str]]]:
        """(split codes uint8, sentences) for every sentence of every split."""
        start = 0
        for sentences in self.train_chunks():
            yield self.split_codes(start, len(sentences)), sentences
            start += len(sentences)
        for name, paths in self.heldout_files.items():
            if paths:
                for sentences in _batched(read_sentences(paths, progress=False), _CHUNK):
                    yield np.full(len(sentences), _CODE[name], dtype=np.uint8), sentences


def _file_key(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class _FileSource(_Source):
    def __init__(self, cfg: TextDataConfig):
        super().__init__(cfg)
        self.train_files = [Path(p) for p in cfg.train_files]
        for path in self.train_files:
            _check_file(path)
        self.num_sentences = 0

    def describe(self) -> dict:
        return {"kind": "files", "train": [_file_key(p) for p in self.train_files], **self._describe_files()}

    def _train_sentences(self, counts: dict | None = None, progress: bool = True) -> Iterator[str]:
        return itertools.islice(read_sentences(self.train_files, counts, progress), self.cfg.max_sentences)

    def plan(self) -> None:
        counts = new_read_counts()
        n = sum(1 for _ in self._train_sentences(counts))
        self.read_stats["train"] = counts
        self._count_heldout_files()
        self.num_sentences = n
        sizes = {name: min(getattr(self.cfg, f"{name}_size"), max(1, int(n * _HELDOUT_CAP))) if self._carved(name) else 0
                 for name in ("test", "valid")}
        if n - sizes["test"] - sizes["valid"] < 1:
            raise UserError(f"the training text has only {n} usable sentences, too few to carve held-out splits; "
                            "add sentences or pass --valid-files and --test-files")
        order = _smallest_hashes(self.cfg.split_seed, n, sizes["test"] + sizes["valid"])
        self.heldout_index = {"test": np.sort(order[:sizes["test"]]), "valid": np.sort(order[sizes["test"]:])}
        self.split_rule = {"rule": "seeded permutation of sentence indices (smallest splitmix64 hashes)",
                           "seed": self.cfg.split_seed, "carved": sizes}

    def train_chunks(self) -> Iterator[list[str]]:
        return _batched(self._train_sentences(progress=False), _CHUNK)

    def split_codes(self, start: int, count: int) -> np.ndarray:
        codes = np.full(count, _CODE["train"], dtype=np.uint8)
        for name, index in self.heldout_index.items():
            lo, hi = np.searchsorted(index, [start, start + count])
            codes[index[lo:hi] - start] = _CODE[name]
        return codes

    def tokenizer_sample(self, limit: int) -> Iterator[str]:
        held_out = sum(len(v) for v in self.heldout_index.values())
        stride = max(1, (self.num_sentences - held_out) // limit)  # spread the sample over the corpus
        train_seen = 0
        for start, sentences in _enumerate_chunks(self.train_chunks()):
            codes = self.split_codes(start, len(sentences))
            for code, sentence in zip(codes, sentences):
                if code == _CODE["train"]:
                    if train_seen % stride == 0:
                        yield sentence
                    train_seen += 1

    def expected_sentences(self) -> int:
        return self.num_sentences + sum(c["sentences"] for k, c in self.read_stats.items() if k != "train")


def _enumerate_chunks(chunks: Iterable[list[str]]) -> Iterator[tuple[int, list[str]]]:
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


class _HubSource(_Source):
    """A hub dataset streamed once; the chunks read while sampling for the tokenizer are kept and
    replayed, so training the tokenizer does not download the start of the corpus twice."""

    def __init__(self, cfg: TextDataConfig):
        super().__init__(cfg)
        self.hub_id = HUB_ALIASES.get(cfg.dataset, cfg.dataset)
        self._stream: Iterator[list[str]] | None = None
        self._replay: list[list[str]] = []
        self._counts = new_read_counts()

    def describe(self) -> dict:
        return {"kind": "hub", "id": self.hub_id, "max_sentences": self.cfg.max_sentences, **self._describe_files()}

    def plan(self) -> None:
        self._count_heldout_files()
        lines = _HUB_LINES.get(self.hub_id)
        if self.cfg.max_sentences is not None:
            lines = min(lines or self.cfg.max_sentences, self.cfg.max_sentences)
        self.fractions = {}
        for name in ("test", "valid"):
            if not self._carved(name):
                self.fractions[name] = 0.0
            elif lines is None:
                self.fractions[name] = _UNKNOWN_STREAM_FRACTION
            else:
                self.fractions[name] = min(getattr(self.cfg, f"{name}_size") / lines, _HELDOUT_CAP)
        if lines is None and any(self._carved(n) for n in ("test", "valid")):
            warnings.warn(f"the length of {self.hub_id} is unknown, so {_UNKNOWN_STREAM_FRACTION:.0%} of it is held out "
                          "for each carved split; pass --max-sentences or --valid-files/--test-files to control this",
                          UserWarning, stacklevel=3)
        self.expected = lines
        self.split_rule = {"rule": "seeded splitmix64 hash of the sentence index below a fraction",
                           "seed": self.cfg.split_seed, "fractions": self.fractions}

    def split_codes(self, start: int, count: int) -> np.ndarray:
        # top 53 bits of the hash as a uniform number in [0, 1)
        u = (split_hash(self.cfg.split_seed, np.arange(start, start + count)) >> np.uint64(11)).astype(np.float64) / 2.0**53
        codes = np.full(count, _CODE["train"], dtype=np.uint8)
        codes[u < self.fractions["test"]] = _CODE["test"]
        codes[(u >= self.fractions["test"]) & (u < self.fractions["test"] + self.fractions["valid"])] = _CODE["valid"]
        return codes

    def _open(self) -> Iterator[list[str]]:
        try:
            from shared.hub import require_hub_dataset

            require_hub_dataset(self.hub_id, HUB_FIX)  # offline: fail now, not after half a minute of retries
            from datasets import load_dataset

            kwargs = {"encoding_errors": "replace"} if self.hub_id in _PLAIN_TEXT_HUB else {}
            dataset = load_dataset(self.hub_id, split="train", streaming=True, **kwargs)
            batches = iter(dataset.iter(batch_size=_CHUNK))
            first = next(batches, None)
        except UserError:
            raise
        except Exception:  # the hub, the network or the dataset's files: all the same advice
            raise self._fetch_error() from None
        if first is None:
            raise UserError(f"{self.hub_id} has no rows; pass --train-files with your own text")
        if "text" not in first:
            raise UserError(f"{self.hub_id} has no 'text' column (it has {', '.join(first)}); "
                            "use a plain-text dataset or pass --train-files")
        return self._lines(itertools.chain([first], batches))

    def _fetch_error(self) -> UserError:
        return UserError(f"could not fetch {self.hub_id}; {HUB_FIX}")

    def _lines(self, batches: Iterator[dict]) -> Iterator[list[str]]:
        counts, left = self._counts, self.cfg.max_sentences
        bar = tqdm(total=self.expected, unit=" lines", unit_scale=True, desc=f"streaming {self.hub_id}", leave=False,
                   disable=None)
        try:
            while True:
                try:
                    batch = next(batches, None)
                except Exception:
                    raise self._fetch_error() from None
                if batch is None:
                    return
                sentences = []
                for line in batch["text"]:
                    counts["lines"] += 1
                    line = (line or "").strip()
                    if not line:
                        counts["empty"] += 1
                    elif "\ufffd" in line:  # bytes the text builder could not decode
                        counts["undecodable"] += 1
                    else:
                        sentences.append(line)
                if left is not None:
                    sentences = sentences[:left]
                    left -= len(sentences)
                counts["sentences"] += len(sentences)
                bar.update(len(batch["text"]))
                if sentences:
                    yield sentences
                if left == 0:
                    return
        finally:
            bar.close()
            self.read_stats["train"] = dict(counts)

    def train_chunks(self) -> Iterator[list[str]]:
        stream = self._stream if self._stream is not None else self._open()
        self._stream = None
        replay, self._replay = self._replay, []
        yield from replay
        yield from stream

    def tokenizer_sample(self, limit: int) -> Iterator[str]:
        self._stream = self._open()
        start, taken = 0, 0
        for sentences in self._stream:
            self._replay.append(sentences)
            codes = self.split_codes(start, len(sentences))
            start += len(sentences)
            for code, sentence in zip(codes, sentences):
                if code == _CODE["train"]:
                    yield sentence
                    taken += 1
                    if taken == limit:
                        return

    def expected_sentences(self) -> int | None:
        return self.expected


# --------------------------------------------------------------------------------------------
# Token store


class _NpyRowWriter:
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


def _encode_store(source: _Source, tokenizer: Tokenizer, max_tokens: int, out: Path, num_threads: int) -> dict:
    """Encode every split into ``out``; returns the per-split filter counts."""
    width = max_tokens + 1
    writers = {name: (_NpyRowWriter(out / f"{name}_tokens.npy", (width,), np.uint16),
                      _NpyRowWriter(out / f"{name}_lengths.npy", (), np.int32)) for name in SPLITS}
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
                selected = keep & (codes == _CODE[name])
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


def _load_npy(path: Path) -> np.ndarray:
    array = np.load(path, mmap_mode="r") if path.stat().st_size > _NpyRowWriter.HEADER_BYTES else np.load(path)
    return array


def _load_store(store: Path) -> dict[str, TokenArray]:
    return {name: TokenArray(_load_npy(store / f"{name}_tokens.npy"), _load_npy(store / f"{name}_lengths.npy"))
            for name in SPLITS}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "biva" / "text"


def _split_key(cfg: TextDataConfig) -> dict:
    return {"seed": cfg.split_seed, "test_size": cfg.test_size, "valid_size": cfg.valid_size,
            "max_sentences": cfg.max_sentences}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def store_fingerprint(cfg: TextDataConfig, source_description: dict, tokenizer_sha256: str) -> str:
    return _digest({"format": _STORE_FORMAT, "source": source_description, "tokenizer_sha256": tokenizer_sha256,
                    "max_tokens": cfg.max_tokens, "split": _split_key(cfg)})


def cached_tokenizer_path(cfg: TextDataConfig, source_description: dict, cache_root: Path) -> Path:
    """Where the tokenizer trained on this data with these settings is kept, so that every run on the
    same data (and scripts/prepare_text.py before them) shares one tokenizer and so one token store.
    The sample depends on the split rule (only training sentences are used), not on max_tokens."""
    key = _digest({"format": _STORE_FORMAT, "source": source_description, "tokenizer": cfg.tokenizer,
                   "vocab_size": cfg.vocab_size, "tokenizer_sample": cfg.tokenizer_sample, "split": _split_key(cfg)})
    return cache_root / "tokenizers" / f"{key}.model"


# --------------------------------------------------------------------------------------------
# Entry point


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


def _make_source(cfg: TextDataConfig) -> _Source:
    return _FileSource(cfg) if cfg.train_files else _HubSource(cfg)


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
    source = _make_source(cfg)
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
        _copy_atomic(shared_tokenizer, tokenizer_path)
    if not tokenizer_path.exists():
        source.plan()
        planned = True
        sample_size = _train_run_tokenizer(source, cfg, tokenizer_path, num_threads)
    if not shared_tokenizer.exists():
        _copy_atomic(tokenizer_path, shared_tokenizer)
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
        _build_store(source, tokenizer, cfg, store, num_threads, tokenizer_stats)
        cache_hit = False
    else:
        cache_hit = True
    stats = json.loads((store / "stats.json").read_text())
    stats.update(cache_hit=cache_hit, store=str(store), tokenizer_path=str(tokenizer_path))
    stats["tokenizer"].update(sample_sentences=sample_size, trained_now=sample_size is not None)
    arrays = _load_store(store)
    return TextSplits(train=arrays["train"], valid=arrays["valid"], test=arrays["test"],
                      tokenizer_path=tokenizer_path, stats=stats)


def text_data_ready(cfg: TextDataConfig, run_dir: str | Path, cache_dir: str | Path | None = None) -> bool:
    """Whether ``prepare_text_data`` would find both stages done (the token store's completion marker,
    ``stats.json``, is in place), without reading any text."""
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = _make_source(cfg)
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


def _copy_atomic(src: Path, dst: Path) -> None:
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


def _train_run_tokenizer(source: _Source, cfg: TextDataConfig, tokenizer_path: Path, num_threads: int) -> int:
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


def _build_store(source: _Source, tokenizer: Tokenizer, cfg: TextDataConfig, store: Path, num_threads: int,
                 tokenizer_stats: dict) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(store)
    tmp = store.parent / f".{store.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        prepare_hook("encode")
        split_counts = _encode_store(source, tokenizer, cfg.max_tokens, tmp, num_threads)
        for name in SPLITS:
            if split_counts[name]["kept"] == 0:
                c = split_counts[name]
                raise UserError(
                    f"the {name} split is empty after filtering ({c['sentences']} sentences: {c['too_long']} longer than "
                    f"{cfg.max_tokens} pieces, {c['oov']} with out-of-vocabulary words); "
                    "give more text or raise --max-tokens or --vocab-size"
                )
        stats = {
            "format": _STORE_FORMAT,
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
