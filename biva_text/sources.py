"""Where sentences come from: local files, a hub stream, or a corpus shipped with the package.

* Local files (``--train-files``, optionally ``--valid-files`` / ``--test-files``): UTF-8, one sentence
  per line, decoded line by line; empty or blank lines and lines that are not UTF-8 are skipped and
  counted, never a crash.
* A hub dataset (``--dataset``, default ``bookcorpus`` = ``rojagtap/bookcorpus``, the two original
  plain-text BookCorpus files read by ``datasets``' plain ``text`` builder): streamed once; any hub
  id whose rows have a ``text`` column works the same way.
* A bundled corpus (``--dataset austen``): ``corpora/austen.txt.xz`` beside this module, Jane Austen's
  six novels tokenised like BookCorpus (corpora/README.md), read offline and counted like a file.

Corpora of known length (files, bundled) carve their held-out splits as a seeded permutation
(splits.CarvedSplits); a stream by a hash threshold (splits.stream_codes).
"""
from __future__ import annotations

import itertools
import lzma
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from shared.errors import UserError
from shared.checkpoints import file_sha256

from .names import BUNDLED_DATASETS, HUB_ALIASES, HUB_FIX
from .splits import SPLIT_CODE, CarvedSplits, HELDOUT_CAP, stream_codes


CORPORA = Path(__file__).resolve().parent / "corpora"
BUNDLED_FILES = {"austen": CORPORA / "austen.txt.xz"}
assert set(BUNDLED_FILES) == set(BUNDLED_DATASETS)
# Lines in the hub copies we know: the held-out fraction of a stream is size / this.
HUB_LINES = {"rojagtap/bookcorpus": 74_004_228}
# Plain-text hub copies: read by the `text` builder, which accepts `encoding_errors`.
_PLAIN_TEXT_HUB = {"rojagtap/bookcorpus"}
UNKNOWN_STREAM_FRACTION = 0.01
CHUNK = 8192  # sentences per encode batch


# --------------------------------------------------------------------------------------------
# Reading lines


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
        check_file(path)
    return _read_lines(paths, _counts(counts), progress)


def _counts(counts: dict | None) -> dict:
    counts = counts if counts is not None else {}
    for key, zero in new_read_counts().items():
        counts.setdefault(key, zero)
    return counts


def check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"text file {path} does not exist; pass existing files to --train-files/--valid-files/--test-files")
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass text files (one sentence per line), not folders")
    with open(path, "rb") as f:
        if b"\x00" in f.read(8192):  # NUL bytes: binary data, not text in any common encoding
            raise UserError(f"{path} holds binary data, not text; pass UTF-8 text files with one sentence per line")


def _usable(raw_lines: Iterable[bytes], counts: dict) -> Iterator[str]:
    """The usable lines of one file's raw lines, stripped and counted."""
    for number, raw in enumerate(raw_lines):
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


def _read_lines(paths: list[Path], counts: dict, progress: bool) -> Iterator[str]:
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading text", disable=None if progress else True,
              leave=False) as bar:
        for path in paths:
            before = dict(counts)
            try:
                handle = open(path, "rb")
            except OSError as err:
                raise UserError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
            with handle:
                def raw_lines():
                    unreported = 0
                    for raw in handle:
                        unreported += len(raw)
                        if unreported > 1 << 20:
                            bar.update(unreported)
                            unreported = 0
                        yield raw
                    bar.update(unreported)

                yield from _usable(raw_lines(), counts)
            if counts["sentences"] == before["sentences"]:
                lines, empty, undecodable = (counts[k] - before[k] for k in ("lines", "empty", "undecodable"))
                raise UserError(
                    f"{path} has no usable sentence ({lines} lines: {empty} empty or blank, "
                    f"{undecodable} not UTF-8); expected UTF-8 text with one sentence per line"
                )


def bundled_corpus(name: str) -> Path:
    """The xz-compressed file of a corpus shipped with the package (``--dataset austen``)."""
    path = BUNDLED_FILES[name]
    if not path.is_file():
        raise UserError(f"the bundled corpus {path} is missing from this installation; reinstall biva "
                        f"(pip install .) or rebuild it: python benchmarks/real_text.py --write-corpus {path}")
    return path


def read_bundled(name: str, counts: dict | None = None) -> Iterator[str]:
    """Usable lines of a bundled corpus, in order, counted like a file's."""
    counts = _counts(counts)
    with lzma.open(bundled_corpus(name), "rb") as f:
        yield from _usable(f, counts)


# --------------------------------------------------------------------------------------------
# Sources: the training corpus (files, bundled, or a hub stream) plus optional held-out files


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def file_key(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


class Source(ABC):
    """Usable sentences of the training corpus, their split codes, and the held-out files; ``cfg`` is the
    run's ``data.TextDataConfig``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.heldout_files = {"valid": [Path(p) for p in cfg.valid_files], "test": [Path(p) for p in cfg.test_files]}
        for paths in self.heldout_files.values():
            for path in paths:
                check_file(path)
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
        return {name: [file_key(p) for p in paths] for name, paths in self.heldout_files.items()}

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
                for sentences in batched(read_sentences(paths, progress=False), CHUNK):
                    yield np.full(len(sentences), SPLIT_CODE[name], dtype=np.uint8), sentences


class _CountedSource(Source):
    """A training corpus read twice: once to count it (and fix the carved splits), once to encode it."""

    num_sentences = 0
    carved: CarvedSplits

    @abstractmethod
    def _sentences(self, counts: dict | None = None, progress: bool = True) -> Iterator[str]:
        """Every usable sentence of the training corpus, in order (a fresh pass)."""
        ...

    def _train_sentences(self, counts: dict | None = None, progress: bool = True) -> Iterator[str]:
        return itertools.islice(self._sentences(counts, progress), self.cfg.max_sentences)

    def plan(self) -> None:
        counts = new_read_counts()
        n = sum(1 for _ in self._train_sentences(counts))
        self.read_stats["train"] = counts
        self._count_heldout_files()
        self.num_sentences = n
        sizes = {name: getattr(self.cfg, f"{name}_size") if self._carved(name) else 0 for name in ("test", "valid")}
        self.carved = CarvedSplits(self.cfg.split_seed, n, sizes)
        self.split_rule = self.carved.rule

    def train_chunks(self) -> Iterator[list[str]]:
        return batched(self._train_sentences(progress=False), CHUNK)

    def split_codes(self, start: int, count: int) -> np.ndarray:
        return self.carved.codes(start, count)

    def tokenizer_sample(self, limit: int) -> Iterator[str]:
        stride = max(1, (self.num_sentences - self.carved.held_out) // limit)  # spread the sample over the corpus
        train_seen, start = 0, 0
        for sentences in self.train_chunks():
            codes = self.split_codes(start, len(sentences))
            start += len(sentences)
            for code, sentence in zip(codes, sentences):
                if code == SPLIT_CODE["train"]:
                    if train_seen % stride == 0:
                        yield sentence
                    train_seen += 1

    def expected_sentences(self) -> int:
        return self.num_sentences + sum(c["sentences"] for k, c in self.read_stats.items() if k != "train")


class FileSource(_CountedSource):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.train_files = [Path(p) for p in cfg.train_files]
        for path in self.train_files:
            check_file(path)

    def describe(self) -> dict:
        return {"kind": "files", "train": [file_key(p) for p in self.train_files], **self._describe_files()}

    def _sentences(self, counts: dict | None = None, progress: bool = True) -> Iterator[str]:
        return read_sentences(self.train_files, counts, progress)


class BundledSource(_CountedSource):
    """A corpus shipped with the package, identified by its content (not its installed path)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.name = cfg.dataset
        self.path = bundled_corpus(self.name)
        self._sha256: str | None = None

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return {"kind": "bundled", "name": self.name, "sha256": self._sha256, **self._describe_files()}

    def _sentences(self, counts: dict | None = None, progress: bool = True) -> Iterator[str]:
        return read_bundled(self.name, counts)


class HubSource(Source):
    """A hub dataset streamed once; the chunks read while sampling for the tokenizer are kept and
    replayed, so training the tokenizer does not download the start of the corpus twice."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.hub_id = HUB_ALIASES.get(cfg.dataset, cfg.dataset)
        self._stream: Iterator[list[str]] | None = None
        self._replay: list[list[str]] = []
        self._counts = new_read_counts()

    def describe(self) -> dict:
        return {"kind": "hub", "id": self.hub_id, "max_sentences": self.cfg.max_sentences, **self._describe_files()}

    def plan(self) -> None:
        self._count_heldout_files()
        lines = HUB_LINES.get(self.hub_id)
        if self.cfg.max_sentences is not None:
            lines = min(lines or self.cfg.max_sentences, self.cfg.max_sentences)
        self.fractions = {}
        for name in ("test", "valid"):
            if not self._carved(name):
                self.fractions[name] = 0.0
            elif lines is None:
                self.fractions[name] = UNKNOWN_STREAM_FRACTION
            else:
                self.fractions[name] = min(getattr(self.cfg, f"{name}_size") / lines, HELDOUT_CAP)
        if lines is None and any(self._carved(n) for n in ("test", "valid")):
            warnings.warn(f"the length of {self.hub_id} is unknown, so {UNKNOWN_STREAM_FRACTION:.0%} of it is held out "
                          "for each carved split; pass --max-sentences or --valid-files/--test-files to control this",
                          UserWarning, stacklevel=3)
        self.expected = lines
        self.split_rule = {"rule": "seeded splitmix64 hash of the sentence index below a fraction",
                           "seed": self.cfg.split_seed, "fractions": self.fractions}

    def split_codes(self, start: int, count: int) -> np.ndarray:
        return stream_codes(self.cfg.split_seed, self.fractions, start, count)

    def _open(self) -> Iterator[list[str]]:
        try:
            from shared.hub import require_hub_dataset

            require_hub_dataset(self.hub_id, HUB_FIX)  # offline: fail now, not after half a minute of retries
            from datasets import load_dataset

            kwargs = {"encoding_errors": "replace"} if self.hub_id in _PLAIN_TEXT_HUB else {}
            dataset = load_dataset(self.hub_id, split="train", streaming=True, **kwargs)
            batches = iter(dataset.iter(batch_size=CHUNK))
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
                if code == SPLIT_CODE["train"]:
                    yield sentence
                    taken += 1
                    if taken == limit:
                        return

    def expected_sentences(self) -> int | None:
        return self.expected


def make_source(cfg) -> Source:
    if cfg.train_files:
        return FileSource(cfg)
    if cfg.dataset in BUNDLED_FILES:
        return BundledSource(cfg)
    return HubSource(cfg)
