"""Preparing text outside the process group: a multi-process run whose preparation outlasts the
collective timeout still trains; scripts/prepare_text.py fills the cache train_text.py then reads
without tokenising; an interrupted preparation restarts at the unfinished stage."""
import subprocess

import pytest
from script_utils import ROOT, TORCHRUN, metrics, run_main, run_script, script_env, text_files, text_flags, torchrun_command

import biva_text.data as text_data
import biva_text.sources as text_sources
from biva_text.tokenizer import Tokenizer


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed next to python")
def test_two_processes_outlive_a_preparation_longer_than_the_collective_timeout(tmp_path):
    files = text_files(tmp_path / "text")
    out = tmp_path / "run"
    flags = [*text_flags(files, tmp_path / "cache"), "--output-dir", out, "--max-steps", 4, "--batch-size", 8,
             "--eval-every", 4, "--save-every", 4]
    # Rank 0's preparation sleeps 10 s; any collective waiting on it would time out after 5 s.
    env = script_env(BIVA_DIST_TIMEOUT_S=5, BIVA_PREPARE_DELAY_S=10)
    p = subprocess.run(torchrun_command("train_text.py", *flags), capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1: waiting for rank 0 to prepare the text data" in p.stderr
    assert "token store encoded now" in p.stderr  # rank 0 prepared it (the delay ran)
    assert [r["step"] for r in metrics(out) if r.get("split") == "valid"] == [4]


def refuse(*args, **kwargs):
    raise AssertionError("tokenised or trained again")


def test_prepare_then_train_reuses_tokenizer_and_store(tmp_path, capsys, monkeypatch):
    files = text_files(tmp_path / "text")
    data = text_flags(files, tmp_path / "cache")[2:]  # without --preset
    code, _, err = run_main("prepare_text", data, capsys)
    assert code == 0, err
    assert "tokenizer trained now" in err and "token store encoded now" in err
    monkeypatch.setattr(Tokenizer, "encode", refuse)
    monkeypatch.setattr(text_data, "train_tokenizer", refuse)
    monkeypatch.setattr(text_sources, "read_sentences", refuse)
    out = tmp_path / "run"
    code, _, err = run_main("train_text", [*text_flags(files, tmp_path / "cache"), "--output-dir", out,
                                           "--max-steps", 2, "--batch-size", 8, "--eval-every", 2], capsys)
    assert code == 0, err
    assert "tokenizer reused" in err and "token store reused" in err
    assert (out / "tokenizer.model").is_file()
    # A second preparation finds both stages done.
    code, _, err = run_main("prepare_text", data, capsys)
    assert code == 0 and "tokenizer reused" in err and "token store reused" in err


def test_interrupted_preparation_resumes_without_retraining_the_tokenizer(tmp_path, capsys, monkeypatch):
    files = text_files(tmp_path / "text")
    cache = tmp_path / "cache"
    data = text_flags(files, cache)[2:]
    p = run_script("prepare_text.py", *data, env=script_env(BIVA_PREPARE_KILL="encode"))
    assert p.returncode == -9, p.stderr[-2000:]  # killed as the encoding started
    assert len(list((cache / "tokenizers").glob("*.model"))) == 1
    assert not list(cache.glob("*/stats.json")) and list(cache.glob(".*.tmp-*"))  # the store is unfinished
    monkeypatch.setattr(text_data, "train_tokenizer", refuse)
    code, _, err = run_main("prepare_text", data, capsys)
    assert code == 0, err
    assert "tokenizer reused" in err and "token store encoded now" in err
    assert len(list(cache.glob("*/stats.json"))) == 1 and not list(cache.glob(".*.tmp-*"))  # the killed one's temp is gone
