"""The corpus shipped with the package (``--dataset austen``): the file itself, its source (read offline,
carved like files, counted and filtered like every source), the flags that pick it, and a run on it."""
from __future__ import annotations

import json
import lzma
import tomllib
import warnings

import numpy as np
import pytest
from script_utils import ROOT
from script_utils import run_main as run_script

from biva_text.cli import add_text_data_flags, check_text_data_flags, data_config
from biva_text.data import TextDataConfig, prepare_text_data
from biva_text.sources import BUNDLED_FILES, BundledSource, read_bundled
from biva_text.splits import SPLITS
from biva_text.tokenizer import Tokenizer
from shared.cli import ArgumentParser
from shared.checkpoints import file_sha256

CORPUS = BUNDLED_FILES["austen"]
FIRST = "the family of dashwood had long been settled in sussex ."


def test_the_bundled_corpus_is_small_complete_and_packaged():
    assert CORPUS.parent == ROOT / "biva_text" / "corpora" and (CORPUS.parent / "README.md").is_file()
    assert CORPUS.stat().st_size < 2 * 2**20  # ~1 MB of xz
    lines = lzma.decompress(CORPUS.read_bytes()).decode("utf-8").splitlines()
    counts = {}
    sentences = list(read_bundled("austen", counts))
    assert sentences == lines and len(sentences) == 31438 and sentences[0] == FIRST
    assert counts == {"lines": 31438, "empty": 0, "undecodable": 0, "sentences": 31438}
    assert all(s == " ".join(s.split()) and s == s.lower() for s in sentences[:2000])  # tokenised like BookCorpus
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "corpora/*" in package_data["biva_text"]  # a wheel carries it


def parse(*argv):
    p = ArgumentParser()
    add_text_data_flags(p)
    p.add_argument("--split-seed", type=int)
    args = p.parse_args([str(a) for a in argv])
    check_text_data_flags(p, args)
    return args


def test_dataset_austen_flags_carve_1000_sentences_and_pick_the_quick_preset(tmp_path, capsys):
    from biva_text.train import choose_preset

    cfg = data_config(parse("--dataset", "austen", "--split-seed", 3))
    assert (cfg.dataset, cfg.valid_size, cfg.test_size, cfg.split_seed, cfg.train_files) == ("austen", 1000, 1000, 3, [])
    cfg = data_config(parse("--dataset", "austen", "--valid-size", 50))
    assert (cfg.valid_size, cfg.test_size) == (50, 1000)
    assert data_config(parse()).valid_size == 10000 == TextDataConfig().valid_size  # BookCorpus: unchanged
    args = parse("--dataset", "austen")
    args.preset = None
    assert choose_preset(args) == ("quick", "--dataset austen")
    args.preset = "tiny"
    assert choose_preset(args) == ("tiny", None)
    args = parse()
    args.preset = None
    assert choose_preset(args) == ("paper", None)  # the paper's recipe stays the default
    train = tmp_path / "t.txt"
    train.write_text("a b\n")
    with pytest.raises(SystemExit):
        parse("--dataset", "austen", "--train-files", train)
    assert "pass one of them" in capsys.readouterr().err


def test_austen_source_reads_offline_and_carves_disjoint_counted_splits(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked"))
    cfg = TextDataConfig(dataset="austen", max_sentences=3000, valid_size=200, test_size=200, split_seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 3000 sentences hold fewer words than asked
        splits = prepare_text_data(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", num_proc=2)
    stats = splits.stats
    assert stats["source"] == {"kind": "bundled", "name": "austen", "sha256": file_sha256(CORPUS),
                               "valid": [], "test": []}
    assert stats["read"]["train"] == {"lines": 3000, "empty": 0, "undecodable": 0, "sentences": 3000}
    assert stats["split_rule"]["carved"] == {"test": 200, "valid": 200} and stats["split_rule"]["seed"] == 5
    counted = stats["splits"]
    assert [counted[s]["sentences"] for s in ("train", "valid", "test")] == [2600, 200, 200]
    for name in SPLITS:
        c = counted[name]
        assert c["kept"] + c["too_long"] + c["oov"] == c["sentences"] and c["kept"] == len(splits.split(name)) > 0
    # Every training word is in the vocabulary (the corpus holds fewer than the 20,000 asked); 40 pieces at most.
    assert counted["train"]["oov"] == 0 and counted["train"]["too_long"] > 0 and counted["test"]["oov"] > 0

    source = BundledSource(cfg)
    source.plan()
    index = source.carved.index
    assert len(index["test"]) == len(index["valid"]) == 200 and not set(index["test"]) & set(index["valid"])
    corpus = list(read_bundled("austen"))[:3000]
    tokenizer = Tokenizer.load(tmp_path / "run" / "tokenizer.model")
    vocab = {tokenizer.id_to_piece(i)[1:] for i in range(4, tokenizer.vocab_size)}

    def kept(positions):
        return [corpus[i] for i in positions if len(corpus[i].split()) <= 40 and set(corpus[i].split()) <= vocab]

    held = set(index["test"]) | set(index["valid"])
    expected = {"test": kept(index["test"]), "valid": kept(index["valid"]),
                "train": kept(i for i in range(3000) if i not in held)}
    for name in SPLITS:  # each split is exactly its carved sentences, in corpus order, after the filters
        assert tokenizer.decode(np.asarray(splits.split(name).tokens).tolist()) == expected[name], name
    # Another split seed carves other sentences.
    other = BundledSource(TextDataConfig(dataset="austen", max_sentences=3000, valid_size=200, test_size=200))
    other.plan()
    assert set(other.carved.index["test"]) != set(index["test"])


def test_train_text_on_austen_picks_the_quick_preset_and_reconstructs_its_test_split(tmp_path, capsys):
    out = tmp_path / "austen"
    data = ["--dataset", "austen", "--max-sentences", 1500, "--valid-size", 60, "--test-size", 60, "--vocab-size",
            2000, "--cache-dir", tmp_path / "cache"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        code, _, err = run_script("prepare_text", data, capsys)
        assert code == 0 and "token store encoded now" in err, err
        code, _, err = run_script("train_text", [*data, "--max-steps", 1, "--eval-every", 1, "--output-dir", out],
                                  capsys)
    assert code == 0, err
    assert err.splitlines()[0].startswith("quick preset, chosen for --dataset austen: ")
    assert "tokenizer reused" in err and "token store reused" in err  # what prepare_text.py made
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "quick" and config["data"]["dataset"] == "austen"
    assert config["extra"]["data_stats"]["splits"]["test"]["sentences"] == 60
    code, text, err = run_script("reconstruct_text", ["--run", out, "--split", "test", "--num", 3, "--device", "cpu"],
                                 capsys)
    assert code == 0, err
    inputs = [line[2:] for line in text.splitlines() if line.startswith("> ")]
    corpus = set(read_bundled("austen"))
    assert len(inputs) == 3 and all(s in corpus for s in inputs)
