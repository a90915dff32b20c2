"""Text data: tokenizer, reading and filters, seeded splits, the cached token store (docs/design.md §7).

All text is synthetic, written into tmp_path from a small word list with a seeded RNG.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from biva_text import data as text_data
from biva_text import sources as text_sources
from biva_text.data import (TextDataConfig, TextDataset, prepare_text_data, read_sentences,
                            split_hash)
from biva_text.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from shared.errors import UserError

WORDS = ("the a cat dog sat on mat ran quickly slowly house tree big small red blue and her his , . !"
         ).split()  # 22 words


def sentences(n: int, seed: int, lo: int = 3, hi: int = 8, words=WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def unique_sentences(n: int, seed: int, lo: int = 4, hi: int = 8) -> list[str]:
    rng, seen = random.Random(seed), {}
    while len(seen) < n:
        seen.setdefault(" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))), None)
    return list(seen)


def write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def quiet_prepare(cfg, run_dir, cache_dir, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vocabularies of toy corpora are small
        return prepare_text_data(cfg, run_dir, cache_dir=cache_dir, num_proc=2, **kw)


def decoded_rows(split, tokenizer: Tokenizer) -> list[str]:
    return tokenizer.decode(np.asarray(split.tokens).tolist())


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("model_type, vocab_size", [("word", 100), ("unigram", 400)])
def test_tokenizer_has_the_project_special_ids(tmp_path, model_type, vocab_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        path = train_tokenizer(sentences(300, 0), tmp_path / "tok", vocab_size=vocab_size, model_type=model_type)
    assert path == tmp_path / "tok.model" and path.is_file()
    tok = Tokenizer.load(path)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.model_type == model_type
    ids = tok.encode(["the cat sat on the mat ."])[0]
    assert ids and min(ids) > EOS_ID  # pieces only: no specials from encode


def test_word_tokenizer_round_trip_and_one_piece_per_word(tmp_path):
    corpus = sentences(300, 1)
    tok = Tokenizer.load(train_tokenizer(corpus, tmp_path / "tok", vocab_size=4 + len(WORDS)))
    assert tok.vocab_size == 4 + len(WORDS)
    probe = corpus[:50] + ["the  cat\tsat .", "  a dog  "]
    encoded = tok.encode(probe)
    assert [len(ids) for ids in encoded] == [len(s.split()) for s in probe]
    assert tok.decode(encoded) == [" ".join(s.split()) for s in probe]
    # A decoder's output: stop at EOS, ignore BOS and PAD; unknown words read as <unk>.
    assert tok.decode([[BOS_ID] + encoded[0] + [EOS_ID] + encoded[1] + [PAD_ID]]) == [corpus[0]]
    assert tok.decode(tok.encode(["the zebra sat"])) == ["the <unk> sat"]
    assert UNK_ID in tok.encode(["the zebra sat"])[0]


def test_unigram_round_trip_has_no_unknown(tmp_path):
    with pytest.warns(UserWarning, match="fewer than the 400 asked for"):
        tok = Tokenizer.load(train_tokenizer(sentences(300, 2), tmp_path / "tok", vocab_size=400, model_type="unigram"))
    probe = ["the zebra sat on the café mat", "quickly  slowly ."]
    encoded = tok.encode(probe)
    assert all(UNK_ID not in ids for ids in encoded)  # byte fallback covers unseen characters
    assert tok.decode(encoded) == [" ".join(s.split()) for s in probe]


def test_vocab_larger_than_corpus_warns_and_records_actual_size(tmp_path):
    train = write(tmp_path / "train.txt", sentences(300, 3))
    cfg = TextDataConfig(train_files=[train], vocab_size=1000, max_tokens=20)
    with pytest.warns(UserWarning, match="supports only 26 word pieces"):
        splits = prepare_text_data(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", num_proc=2)
    assert splits.stats["tokenizer"]["vocab_size_requested"] == 1000
    assert splits.stats["tokenizer"]["vocab_size"] == 4 + len(WORDS) == splits.load_tokenizer().vocab_size


# ---------------------------------------------------------------------------------------------
# Reading


def test_read_sentences_skips_and_counts_blank_and_non_utf8_lines(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\xef\xbb\xbffirst line\n\n   \n\t\r\n\xff\xfe broken \xc3\n  second line \r\nthird\n")
    counts = {}
    assert list(read_sentences([path], counts)) == ["first line", "second line", "third"]
    assert counts == {"lines": 7, "empty": 3, "undecodable": 1, "sentences": 3}


def test_read_counts_reach_the_stats(tmp_path):
    lines = sentences(200, 4) + ["", "   ", "\t"]
    path = tmp_path / "train.txt"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"caf\xe9 latin-1\n\xff\n")
    splits = quiet_prepare(TextDataConfig(train_files=[str(path)], vocab_size=50), tmp_path / "run", tmp_path / "c")
    assert splits.stats["read"]["train"] == {"lines": 205, "empty": 3, "undecodable": 2, "sentences": 200}
    assert sum(s["sentences"] for s in splits.stats["splits"].values()) == 200


def test_file_without_usable_sentence_is_a_user_error(tmp_path):
    bad = tmp_path / "blank.txt"
    bad.write_bytes(b"\n   \n\xff\xfe\n")
    with pytest.raises(UserError, match=r"blank\.txt has no usable sentence \(3 lines: 2 empty or blank, 1 not UTF-8\)"):
        list(read_sentences([bad]))
    good = write(tmp_path / "good.txt", sentences(100, 5))
    with pytest.raises(UserError, match="blank.txt has no usable sentence"):
        quiet_prepare(TextDataConfig(train_files=[good, str(bad)]), tmp_path / "run", tmp_path / "c")
    with pytest.raises(UserError, match="blank.txt has no usable sentence"):
        quiet_prepare(TextDataConfig(train_files=[good], test_files=[str(bad)]), tmp_path / "run2", tmp_path / "c")


def test_missing_file_is_a_user_error(tmp_path):
    good = write(tmp_path / "good.txt", sentences(100, 6))
    with pytest.raises(UserError, match="nope.txt does not exist"):
        quiet_prepare(TextDataConfig(train_files=[str(tmp_path / "nope.txt")]), tmp_path / "run", tmp_path / "c")
    with pytest.raises(UserError, match="nope.txt does not exist"):
        quiet_prepare(TextDataConfig(train_files=[good], valid_files=[str(tmp_path / "nope.txt")]),
                      tmp_path / "run", tmp_path / "c")
    assert not (tmp_path / "run" / "tokenizer.model").exists()  # failed before any work


def test_bad_settings_are_user_errors(tmp_path):
    good = write(tmp_path / "good.txt", sentences(100, 7))
    for bad in (dict(vocab_size=70000), dict(tokenizer="bpe"), dict(max_tokens=0), dict(dataset="files", train_files=[])):
        cfg = TextDataConfig(**{"train_files": [good], **bad})
        with pytest.raises(UserError):
            quiet_prepare(cfg, tmp_path / "run", tmp_path / "c")
    # Too small for a unigram model's characters and byte pieces: the trainer's error, in words.
    with pytest.raises(UserError, match="--vocab-size 60 is too small .* needs at least"):
        quiet_prepare(TextDataConfig(train_files=[good], tokenizer="unigram", vocab_size=60), tmp_path / "run", tmp_path / "c")
    assert not list((tmp_path / "run").iterdir())  # no model, no temporary files left


# ---------------------------------------------------------------------------------------------
# Filters and the token store


def test_length_and_oov_filters_with_exact_counts(tmp_path):
    rare = [f"rare{i}" for i in range(5)]  # once each in train: outside a 22-word vocabulary
    train = sentences(300, 8, hi=8) + sentences(7, 9, lo=11, hi=14) + [f"the {w} sat" for w in rare]
    test = sentences(20, 10) + ["the zebra sat", "a cat and a zebra", "zebra", "his zebra ran ."] \
        + [s + " zebra" for s in sentences(3, 11, lo=11, hi=12)]  # too long AND unknown: counted too long
    valid = sentences(10, 12)
    cfg = TextDataConfig(train_files=[write(tmp_path / "train.txt", train)],
                         valid_files=[write(tmp_path / "valid.txt", valid)],
                         test_files=[write(tmp_path / "test.txt", test)],
                         vocab_size=4 + len(WORDS), max_tokens=10)
    splits = prepare_text_data(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", num_proc=2)
    counts = splits.stats["splits"]
    assert {k: counts["train"][k] for k in ("sentences", "too_long", "oov", "kept")} == \
        {"sentences": 312, "too_long": 7, "oov": 5, "kept": 300}
    assert {k: counts["test"][k] for k in ("sentences", "too_long", "oov", "kept")} == \
        {"sentences": 27, "too_long": 3, "oov": 4, "kept": 20}
    assert counts["valid"]["kept"] == 10
    tok = splits.load_tokenizer()
    assert decoded_rows(splits.test, tok) == test[:20]  # kept in file order, intact
    assert decoded_rows(splits.valid, tok) == valid
    for name, kept in (("train", train[:300]), ("test", test[:20])):
        split = splits.split(name)
        tokens = np.asarray(split.tokens)
        assert tokens.dtype == np.uint16 and tokens.shape == (len(kept), cfg.max_tokens + 1)
        assert split.lengths.dtype == np.int32
        assert split.lengths.tolist() == [len(s.split()) + 1 for s in kept]
        for row, n in zip(tokens, split.lengths):
            assert row[n - 1] == EOS_ID and (row[n:] == PAD_ID).all() and (row[:n - 1] > EOS_ID).all()
        assert counts[name]["tokens"] == int(split.lengths.sum())


def test_unigram_pipeline_has_no_oov_and_limits_pieces(tmp_path):
    # 11 words but more than 12 pieces: the unseen word falls back to characters and bytes
    long_in_pieces = "the cat sat on the mat and his dog ran xylophonequagga"
    test = sentences(20, 13) + ["the zebra sat", "a quagga", long_in_pieces]
    cfg = TextDataConfig(train_files=[write(tmp_path / "train.txt", sentences(400, 14, hi=12))],
                         test_files=[write(tmp_path / "test.txt", test)],
                         tokenizer="unigram", vocab_size=400, max_tokens=12)
    splits = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache")
    tok = splits.load_tokenizer()
    assert tok.model_type == "unigram"
    assert all(s["oov"] == 0 for s in splits.stats["splits"].values())
    pieces = [len(ids) for ids in tok.encode(test)]
    kept = [s for s, n in zip(test, pieces) if n <= 12]
    assert splits.stats["splits"]["test"]["too_long"] == sum(n > 12 for n in pieces) > 0
    assert long_in_pieces not in kept and "a quagga" in kept
    assert decoded_rows(splits.test, tok) == kept


def test_token_store_is_reused_without_retokenising(tmp_path, monkeypatch):
    corpus = write(tmp_path / "train.txt", sentences(400, 15))
    cfg = TextDataConfig(train_files=[corpus], vocab_size=50, max_tokens=10)
    first = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache")
    assert first.stats["cache_hit"] is False and first.stats["tokenizer"]["trained_now"] is True
    model_bytes = (tmp_path / "run" / "tokenizer.model").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised or trained again")

    monkeypatch.setattr(Tokenizer, "encode", refuse)
    monkeypatch.setattr(text_data, "train_tokenizer", refuse)
    monkeypatch.setattr(text_sources, "read_sentences", refuse)
    second = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache")
    assert second.stats["cache_hit"] is True and second.stats["tokenizer"]["trained_now"] is False
    assert isinstance(second.train.tokens, np.memmap)
    for name in text_data.SPLITS:
        np.testing.assert_array_equal(first.split(name).tokens, second.split(name).tokens)
        np.testing.assert_array_equal(first.split(name).lengths, second.split(name).lengths)
    assert second.stats["splits"] == first.stats["splits"]
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == model_bytes
    # A new length limit is a new store: encoding is needed again.
    with pytest.raises(AssertionError, match="tokenised or trained again"):
        quiet_prepare(TextDataConfig(train_files=[corpus], vocab_size=50, max_tokens=11), tmp_path / "run", tmp_path / "cache")


def test_resumed_run_keeps_its_tokenizer_and_changed_data_is_re_encoded(tmp_path, monkeypatch):
    path = tmp_path / "train.txt"
    write(path, sentences(300, 16))
    cfg = TextDataConfig(train_files=[str(path)], vocab_size=50, max_tokens=10)
    first = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache")
    monkeypatch.setattr(text_data, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    write(path, sentences(300, 17))  # new data, same run directory: new store, same tokenizer
    second = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache")
    assert second.stats["cache_hit"] is False and second.stats["store"] != first.stats["store"]
    assert second.stats["tokenizer"]["trained_now"] is False


def test_run_directory_with_another_tokenizer_type_is_a_user_error(tmp_path):
    corpus = write(tmp_path / "train.txt", sentences(300, 18))
    quiet_prepare(TextDataConfig(train_files=[corpus], vocab_size=50), tmp_path / "run", tmp_path / "cache")
    with pytest.raises(UserError, match="is a word tokenizer but --tokenizer unigram"):
        quiet_prepare(TextDataConfig(train_files=[corpus], tokenizer="unigram", vocab_size=400),
                      tmp_path / "run", tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Splits


def all_rows(splits) -> dict[str, list[str]]:
    tok = splits.load_tokenizer()
    return {name: decoded_rows(splits.split(name), tok) for name in text_data.SPLITS}


def test_seeded_splits_are_reproducible_disjoint_and_sized(tmp_path):
    corpus = unique_sentences(600, 19)
    path = write(tmp_path / "train.txt", corpus)
    cfg = TextDataConfig(train_files=[path], vocab_size=50, max_tokens=20, test_size=25, valid_size=40)
    a = all_rows(quiet_prepare(cfg, tmp_path / "run_a", tmp_path / "cache_a"))
    b = all_rows(quiet_prepare(cfg, tmp_path / "run_b", tmp_path / "cache_b"))
    assert a == b
    assert (len(a["test"]), len(a["valid"]), len(a["train"])) == (25, 40, 535)
    sets = {name: set(rows) for name, rows in a.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["valid"]) and not (sets["valid"] & sets["test"])
    assert sets["train"] | sets["valid"] | sets["test"] == set(corpus)
    # The training split keeps file order; held-out sentences are spread over the corpus.
    assert a["train"] == [s for s in corpus if s in sets["train"]]
    assert max(corpus.index(s) for s in a["test"]) - min(corpus.index(s) for s in a["test"]) > 300
    other = all_rows(quiet_prepare(TextDataConfig(**{**cfg.__dict__, "split_seed": 1}), tmp_path / "run_c", tmp_path / "c"))
    assert set(other["test"]) != sets["test"] and len(other["test"]) == 25
    # Default sizes on a small corpus: a tenth each.
    small = all_rows(quiet_prepare(TextDataConfig(train_files=[path], vocab_size=50, max_tokens=20),
                                   tmp_path / "run_d", tmp_path / "cache_d"))
    assert (len(small["test"]), len(small["valid"])) == (60, 60)


def test_split_hash_is_fixed():
    # Pinned values: the carving must not change across machines or numpy versions.
    assert split_hash(0, np.arange(3)).tolist() == split_hash(0, np.array([0, 1, 2], dtype=np.uint64)).tolist()
    assert split_hash(0, np.arange(3)).tolist() != split_hash(1, np.arange(3)).tolist()
    assert split_hash(0, np.arange(2)).tolist() == [5197578548964807871, 258863698125685209]


# ---------------------------------------------------------------------------------------------
# Dataset


def test_text_dataset_items_and_batches(tmp_path):
    corpus = write(tmp_path / "train.txt", sentences(300, 20))
    splits = quiet_prepare(TextDataConfig(train_files=[corpus], vocab_size=50, max_tokens=10), tmp_path / "run", tmp_path / "c")
    dataset = TextDataset(splits.valid)
    assert len(dataset) == len(splits.valid) == splits.stats["splits"]["valid"]["kept"] > 0
    item = dataset[3]
    assert set(item) == {"index", "tokens", "length"} and item["index"] == 3
    assert item["tokens"].dtype == torch.long and item["tokens"].shape == (11,)
    n = item["length"]
    assert n == int(splits.valid.lengths[3]) and item["tokens"][n - 1] == EOS_ID
    assert (item["tokens"][n:] == PAD_ID).all() and (item["tokens"][:n] != PAD_ID).all()
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["tokens"].shape == (4, 11) and batch["length"].tolist() == splits.valid.lengths[:4].tolist()


# ---------------------------------------------------------------------------------------------
# Hub stream (no network: a local IterableDataset stands in for the hub copy)


def fake_hub(monkeypatch, lines: list[str], calls: list):
    import datasets

    def load_dataset(path, split=None, streaming=False, **kwargs):
        calls.append((path, split, streaming, kwargs))
        return datasets.IterableDataset.from_generator(lambda: ({"text": line} for line in lines))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("shared.hub.require_hub_dataset", lambda repo_id, fix: None)  # this hub answers


def test_hub_stream_is_read_once_and_carved_by_seeded_hash(tmp_path, monkeypatch):
    corpus = unique_sentences(3000, 21)
    lines = corpus[:1500] + ["", "   "] + corpus[1500:]
    calls = []
    fake_hub(monkeypatch, lines, calls)
    cfg = TextDataConfig(vocab_size=50, max_tokens=20, test_size=150, valid_size=300, max_sentences=3000)
    splits = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache")
    assert [c[:3] for c in calls] == [("rojagtap/bookcorpus", "train", True)]  # one stream for tokenizer + store
    stats = splits.stats
    assert stats["read"]["train"] == {"lines": 3002, "empty": 2, "undecodable": 0, "sentences": 3000}
    rows = all_rows(splits)
    assert sorted(rows["train"] + rows["valid"] + rows["test"]) == sorted(corpus)
    assert 100 < len(rows["test"]) < 200 and 230 < len(rows["valid"]) < 370
    assert not set(rows["test"]) & set(rows["valid"])
    # Reproducible, and a second run needs no network at all.
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("hub contacted again"))
    again = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache")
    assert again.stats["cache_hit"] and all_rows(again) == rows


def test_hub_stream_respects_max_sentences_and_counts_undecodable(tmp_path, monkeypatch):
    lines = sentences(500, 22) + ["caf\ufffd broken"] + sentences(500, 23)
    fake_hub(monkeypatch, lines, [])
    cfg = TextDataConfig(vocab_size=50, max_tokens=20, test_size=20, valid_size=20, max_sentences=700)
    stats = quiet_prepare(cfg, tmp_path / "run", tmp_path / "cache").stats
    assert stats["read"]["train"]["undecodable"] == 1
    assert sum(s["sentences"] for s in stats["splits"].values()) == stats["read"]["train"]["sentences"] == 700


def test_unreachable_hub_is_a_user_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'rojagtap/bookcorpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("shared.hub.require_hub_dataset", lambda repo_id, fix: None)  # the hub answered, the data not
    with pytest.raises(UserError) as err:
        quiet_prepare(TextDataConfig(), tmp_path / "run", tmp_path / "cache")
    assert str(err.value) == "could not fetch rojagtap/bookcorpus; download the text files and pass --train-files"
    assert not (tmp_path / "run" / "tokenizer.model").exists()
