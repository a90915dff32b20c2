"""SentencePiece tokenizer for sentences (docs/design.md §7).

Two models:

* ``word`` (default): one piece per whitespace-separated word, as in the paper. BookCorpus is already
  lower-cased and tokenised, so this is the paper's word vocabulary; a word outside it encodes to
  ``UNK`` and the data pipeline drops the sentence.
* ``unigram``: subword pieces with byte fallback, so no sentence ever contains ``UNK``.

The special ids are fixed, ``pad=0, unk=1, bos=2, eos=3``: the token store pads with 0 and every
model and decoder relies on these numbers. Normalisation is ``identity`` (SentencePiece's default
NFKC would rewrite the text), so decoding gives back the whitespace-tokenised sentence.
"""
from __future__ import annotations

import itertools
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from shared.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("word", "unigram")
UNK_TEXT = "<unk>"  # what decode writes for an out-of-vocabulary word
WORD_START = "\u2581"  # SentencePiece's mark of a word's start: the word model's piece of "cat" is "▁cat"

# TrainerSpec.model_type enum in sentencepiece_model.proto
_PROTO_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def train_tokenizer(
    sentences: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int = 20000,
    model_type: str = "word",
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
) -> Path:
    """Train on at most ``max_sentences`` sentences; write ``<prefix>.model`` (and ``.vocab``).

    Warns when the corpus cannot fill ``vocab_size`` pieces (the model is then smaller: read the
    actual size from ``Tokenizer.load(path).vocab_size``).
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown tokenizer {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # The trainer consumes its whole iterator, so the bound must be on the iterator itself.
    sample = (_words(s) for s in itertools.islice(iter(sentences), max_sentences))
    options = dict(
        model_prefix=str(prefix),
        model_type=model_type,
        vocab_size=vocab_size,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        normalization_rule_name="identity",
        hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary, not a crash
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    if model_type == "word":
        # Below full coverage the trainer masks rare characters, and every word containing one
        # would become out-of-vocabulary however frequent it is.
        options.update(character_coverage=1.0)
    else:
        # Bytes for characters the sample never showed: unigram then has no UNK at all.
        options.update(byte_fallback=True)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sample, **options)
    except RuntimeError as err:
        message = str(err)
        needed = re.search(r"required_chars\. (\d+) vs (\d+)", message)
        if needed:
            raise UserError(
                f"--vocab-size {vocab_size} is too small for a {model_type} tokenizer of this corpus, "
                f"which needs at least {needed.group(2)} pieces (characters, specials and 256 bytes); "
                "pass a larger --vocab-size"
            ) from None
        if "empty" in message.lower() or "no sentence" in message.lower():
            raise UserError("the tokenizer got no sentence to train on; check the training text") from None
        raise
    path = prefix.with_name(prefix.name + ".model")
    actual = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    if actual < vocab_size:
        warnings.warn(
            f"the corpus supports only {actual} {model_type} pieces, fewer than the {vocab_size} asked "
            f"for; the tokenizer has {actual}",
            UserWarning,
            stacklevel=2,
        )
    return path


class Tokenizer:
    """A thin wrapper over ``sentencepiece.SentencePieceProcessor`` with the project's conventions.

    ``encode`` gives the pieces only (no BOS/EOS); ``decode`` stops at the first EOS and skips PAD
    and BOS, so it reads decoder output and token-store rows alike.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None,
                 model_type: str | None = None):
        self.processor = processor
        self.path = path
        self.model_type = model_type

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no tokenizer at {path}; train one first or point at a run directory that has tokenizer.model")
        data = path.read_bytes()
        processor = spm.SentencePieceProcessor()
        try:
            processor.load_from_serialized_proto(data)
        except (RuntimeError, OSError):
            raise UserError(f"{path} is not a SentencePiece model; delete it to train a new tokenizer") from None
        specials = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise UserError(
                f"{path} has special ids pad/unk/bos/eos = {specials}, expected (0, 1, 2, 3); "
                "train the tokenizer with biva_text.tokenizer.train_tokenizer"
            )
        return cls(processor, path, _model_type_from_proto(data))

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    def id_to_piece(self, i: int) -> str:
        return self.processor.id_to_piece(i)

    def encode(self, sentences: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        if isinstance(sentences, str):
            raise TypeError("Tokenizer.encode takes a list of sentences, not one string")
        return self.processor.encode([_words(s) for s in sentences], out_type=int, num_threads=num_threads or -1)

    def encode_words(self, sentences: Sequence[str]) -> list[list[int]]:
        """``encode``, except that with the word model each whitespace-separated word is one id, looked up
        in the vocabulary, and each word outside it is its own ``UNK``: SentencePiece's encode merges a run
        of unknown words into one ``UNK`` piece, so that piece i would no longer be word i. For sentences
        from users (reconstruction, prompts); the token store keeps ``encode``, whose sentences with an
        unknown word are dropped anyway (the paper's filter)."""
        if isinstance(sentences, str):
            raise TypeError("Tokenizer.encode_words takes a list of sentences, not one string")
        if self.model_type != "word":
            return self.encode(sentences)
        lookup = self.processor.piece_to_id
        return [[lookup(WORD_START + word) for word in sentence.split()] for sentence in sentences]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self._decode_one(list(map(int, row))) for row in ids]

    def _decode_one(self, row: list[int]) -> str:
        if EOS_ID in row:
            row = row[: row.index(EOS_ID)]
        row = [i for i in row if i not in (PAD_ID, BOS_ID)]
        # SentencePiece renders UNK as " ⁇ " with stray spaces; decode the runs between UNKs
        # and join them with a readable marker instead.
        runs, run = [], []
        for i in row:
            if i == UNK_ID:
                runs.extend([run, None])
                run = []
            else:
                run.append(i)
        runs.append(run)
        words = []
        for part in runs:
            words.append(UNK_TEXT if part is None else self.processor.decode(part))
        return " ".join(" ".join(words).split())


_OTHER_WHITESPACE = re.compile(r"[^\S ]")


def _words(sentence: str) -> str:
    """SentencePiece splits on spaces only (and itself collapses runs of them): turn tabs and other
    whitespace into spaces so a "word" means the same as ``str.split``."""
    return " ".join(sentence.split()) if _OTHER_WHITESPACE.search(sentence) else sentence


def _model_type_from_proto(data: bytes) -> str:
    """Read ``trainer_spec.model_type`` from a serialized ModelProto (no protobuf dependency)."""
    trainer_spec = _proto_field(data, 2)
    if trainer_spec is None:
        return "unigram"
    value = _proto_field(trainer_spec, 3)
    return _PROTO_MODEL_TYPES.get(value if isinstance(value, int) else 1, "unigram")


def _proto_field(data: bytes, number: int) -> bytes | int | None:
    """The first field ``number`` of a protobuf message: an int (varint) or bytes (length-delimited)."""

    def varint(pos: int) -> tuple[int, int]:
        result = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result, pos

    pos = 0
    while pos < len(data):
        key, pos = varint(pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = varint(pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            return None
        if field == number:
            return value
    return None
