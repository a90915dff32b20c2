"""Real English sentences, offline: Jane Austen's six novels, tokenised like BookCorpus.

Where the text comes from
    Debian's package ``r-cran-janeaustenr`` (bookworm: 1.0.0-1; CRAN package ``janeaustenr`` by
    Julia Silge, MIT licence) holds the Project Gutenberg texts, public domain, of *Sense and
    Sensibility*, *Pride and Prejudice*, *Mansfield Park*, *Emma*, *Northanger Abbey* and
    *Persuasion*: one R character vector of text lines per novel (73,422 lines), stored in R's
    lazy-load database ``usr/lib/R/site-library/janeaustenr/data/Rdata.rdb`` with its index
    ``Rdata.rdx``. This module reads that database directly (a small reader of R's serialization
    format below), so R itself is not needed.

How to install it
    Installing the package pulls in all of R (hundreds of packages); unpacking it is enough::

        apt-get update
        apt-get download r-cran-janeaustenr
        dpkg-deb -x r-cran-janeaustenr_*.deb ~/.cache/biva/janeaustenr

    or run this script with ``--fetch``, which does exactly that. ``apt-get install
    r-cran-janeaustenr`` works too (the files then lie under ``/``). Other places: ``--root DIR``
    or ``$JANEAUSTENR_ROOT``, the directory the package was unpacked into.

What comes out
    31,438 sentences: paragraphs are rebuilt from the wrapped lines, titles and chapter headings
    dropped, Gutenberg's ``_italics_`` marks removed, then the text is split into sentences at
    ``. ! ?`` (not after Mr., Mrs., Dr., St. and the like), lower-cased and tokenised the way
    BookCorpus is: spaces around punctuation, ``--`` dashes and quotes, contractions split
    (``do n't``, ``emma 's``, ``i 'll``).

    python benchmarks/real_text.py --fetch --write-corpus biva_text/corpora/austen.txt.xz
    python benchmarks/real_text.py OUT_DIR [--valid-size 1000] [--test-size 1000] [--seed 0]

The first writes every sentence, one per line in reading order, xz-compressed: the corpus shipped
with the package (``--dataset austen``; biva_text/corpora/README.md). The second writes
``OUT_DIR/{train,valid,test}.txt`` (a seeded random split), ready for ``--train-files OUT_DIR/train.txt
--valid-files OUT_DIR/valid.txt --test-files OUT_DIR/test.txt``; its sentences come from the bundled
corpus, the same text, unless ``--root`` or ``--fetch`` asks for the Debian package itself.
"""
from __future__ import annotations

import argparse
import gzip
import lzma
import os
import random
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from shared.errors import UserError, run_cli

NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
DATA = Path("usr/lib/R/site-library/janeaustenr/data")
DEFAULT_ROOT = Path.home() / ".cache" / "biva" / "janeaustenr"
INSTALL_HINT = ("run `apt-get update && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb "
                f"{DEFAULT_ROOT}` (or this script with --fetch), or pass --root")

# ---------------------------------------------------------------------------------------------
# R's serialization format (enough for the package's data: vectors, lists, attributes)

_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
_SINGLETONS = {242, 241, 251, 253}  # empty env, base env, missing arg, global env


class _RReader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        if self.take(2) != b"X\n":
            raise ValueError("not R XDR serialization")
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            self.take(self.int())  # native encoding name

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NIL or kind in _SINGLETONS:
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if kind == _CHAR:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", "replace")
        if kind == _LIST:  # pairlist: (tag, value) pairs
            if has_attr:
                self.item()  # a pairlist node's own attributes: not needed here
            tag = self.item() if has_tag else None
            head = (tag[1] if tag else None, self.item())
            tail = self.item()
            return [head] + (tail or [])
        if kind in (_STR, _VEC):
            value = [self.item() for _ in range(self.int())]
        elif kind in (_INT, _LGL):
            n = self.int()
            value = list(struct.unpack(f">{n}i", self.take(4 * n)))
        elif kind == _REAL:
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        if has_attr:
            return _RObject(value, dict(self.item()))
        return value


class _RObject(list):
    """A vector with R attributes (names, class, ...)."""

    def __init__(self, value, attributes: dict):
        super().__init__(value)
        self.attributes = attributes


def read_lazyload(rdb: Path) -> dict[str, object]:
    """Every object of an R lazy-load database (``X.rdb`` with its index ``X.rdx``)."""
    index = _RReader(gzip.decompress(rdb.with_suffix(".rdx").read_bytes())).item()
    fields = dict(zip(index.attributes["names"], index))
    variables = fields["variables"]
    blob = rdb.read_bytes()
    objects = {}
    for name, (offset, length) in zip(variables.attributes["names"], variables):
        chunk = blob[offset:offset + length]
        # each entry: 4-byte big-endian uncompressed length, then a zlib stream
        objects[name] = _RReader(zlib.decompress(chunk[4:])).item()
    return objects


# ---------------------------------------------------------------------------------------------
# Text → sentences, BookCorpus style


def find_data(root: str | Path | None = None) -> Path:
    candidates = [Path(root)] if root else [Path(p) for p in (os.environ.get("JANEAUSTENR_ROOT"),) if p] + [DEFAULT_ROOT, Path("/")]
    for candidate in candidates:
        rdb = candidate / DATA / "Rdata.rdb"
        if rdb.is_file():
            return rdb
    raise UserError(f"Jane Austen's novels (Debian package r-cran-janeaustenr) were not found under "
                    f"{', '.join(map(str, candidates))}; {INSTALL_HINT}")


def fetch(root: Path = DEFAULT_ROOT) -> Path:
    """``apt-get download`` the package and unpack it under ``root`` (no R, no root rights needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return find_data(root)


def novel_lines(root: str | Path | None = None) -> dict[str, list[str]]:
    objects = read_lazyload(find_data(root))
    return {name: [line or "" for line in objects[name]] for name in NOVELS}


_HEADING = re.compile(r"^(chapter|volume)\b|^(by )?jane austen\b|^by$|^\(\d{4}\)$|^the end$|^finis$", re.IGNORECASE)


def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs, without titles and chapter headings."""
    found, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
            continue
        if current:
            text = " ".join(current)
            if not _HEADING.search(text) and re.search(r"[a-z]", text):
                found.append(text)
            current = []
    return found


ABBREVIATIONS = {"mr.", "mrs.", "dr.", "st.", "messrs.", "col.", "capt.", "esq.", "rev.", "sir.", "no.", "viz.", "etc."}
_SENTENCE_END = re.compile(r"""(?<=[.!?])["')\]]*\s+(?=["'(\[]?[A-Z0-9])""")


def split_sentences(paragraph: str) -> list[str]:
    text = re.sub(r"\s+", " ", paragraph.replace("_", "").replace("*", "")).strip()
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        last_word = text[:match.start()].rsplit(" ", 1)[-1].lower().lstrip("\"'(")
        if last_word in ABBREVIATIONS or re.fullmatch(r"[a-z]\.", last_word):  # Mr. / initials
            continue
        end = match.start() + len(match.group().rstrip())
        pieces.append(text[start:end].strip())
        start = match.end()
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def tokenize(sentence: str) -> str:
    """Lower-case, BookCorpus-style tokens separated by single spaces."""
    text = sentence.lower().replace("£", " £ ")
    text = re.sub(r"--+", " -- ", text)
    text = re.sub(r"([,;:!?\"()\[\]&])", r" \1 ", text)
    text = re.sub(r"(^|\s)'(?=\S)", r"\1' ", text)  # opening single quote
    text = re.sub(r"(?<=\S)'(?=\s|$)", r" '", text)  # closing single quote
    text = re.sub(r"(\w)n't\b", r"\1 n't", text)  # only apostrophes inside words are left
    text = re.sub(r"(\w)'(s|ll|re|ve|m|d)\b", r"\1 '\2", text)
    tokens = []
    for token in text.split():
        if len(token) > 1 and token.endswith(".") and token not in ABBREVIATIONS and not re.fullmatch(r"([a-z]\.)+", token):
            tokens.extend([token.rstrip("."), "." * (len(token) - len(token.rstrip(".")))])
        else:
            tokens.append(token)
    return " ".join(tokens)


def load_sentences(root: str | Path | None = None) -> list[str]:
    """All sentences of the six novels, in reading order, tokenised like BookCorpus."""
    sentences = []
    for lines in novel_lines(root).values():
        for paragraph in paragraphs(lines):
            for sentence in split_sentences(paragraph):
                tokens = tokenize(sentence)
                if len(tokens.split()) >= 2:
                    sentences.append(tokens)
    return sentences


def write_corpus(path: Path, sentences: list[str]) -> int:
    """Every sentence, one per line, xz-compressed (deterministic: the same sentences give the same bytes)."""
    data = "".join(s + "\n" for s in sentences).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                   preset=9 | lzma.PRESET_EXTREME))
    return path.stat().st_size


def bundled_sentences() -> list[str]:
    """The same sentences from the corpus shipped with the package (no Debian package needed)."""
    from biva_text.sources import read_bundled

    return list(read_bundled("austen"))


def write_splits(out_dir: Path, sentences: list[str], valid_size: int, test_size: int, seed: int) -> dict[str, int]:
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    held = {"test": sorted(order[:test_size]), "valid": sorted(order[test_size:test_size + valid_size])}
    held_out = set(held["test"]) | set(held["valid"])
    splits = {"train": [i for i in range(len(sentences)) if i not in held_out], **held}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, index in splits.items():
        (out_dir / f"{name}.txt").write_text("".join(sentences[i] + "\n" for i in index), encoding="utf-8")
    return {name: len(index) for name, index in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, nargs="?", help="where train.txt, valid.txt and test.txt go")
    parser.add_argument("--write-corpus", type=Path, metavar="PATH",
                        help="write every sentence, xz-compressed, to PATH (rebuilds biva_text/corpora/austen.txt.xz "
                             "from the Debian package)")
    parser.add_argument("--root", type=Path, default=None, help="directory r-cran-janeaustenr was unpacked into")
    parser.add_argument("--fetch", action="store_true", help=f"apt-get download and unpack the package into {DEFAULT_ROOT}")
    parser.add_argument("--valid-size", type=int, default=1000, help="validation sentences (default 1000)")
    parser.add_argument("--test-size", type=int, default=1000, help="test sentences (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    args = parser.parse_args()
    if args.out_dir is None and args.write_corpus is None:
        parser.error("give OUT_DIR (the splits) or --write-corpus PATH (the bundled corpus), or both")
    if args.fetch and args.root is None:
        fetch()
    from_package = args.write_corpus is not None or args.root is not None or args.fetch
    sentences = load_sentences(args.root) if from_package else bundled_sentences()
    if args.write_corpus is not None:
        size = write_corpus(args.write_corpus, sentences)
        print(f"{len(sentences)} sentences -> {args.write_corpus} ({size:,} bytes, xz)")
    if args.out_dir is None:
        return
    if args.valid_size + args.test_size >= len(sentences):
        raise UserError(f"only {len(sentences)} sentences; ask for fewer with --valid-size/--test-size")
    counts = write_splits(args.out_dir, sentences, args.valid_size, args.test_size, args.seed)
    print(f"{len(sentences)} sentences -> {args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
