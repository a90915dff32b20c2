"""Sharing a trained run: scripts/export.py writes a self-contained model folder (weights, config,
tokenizer, reports, model card) that every --run script loads like the run itself, giving the same
numbers; a hub repository id resolves through the local hub cache, and offline it fails at once with
one line. Tiny runs, in-process, offline."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import warnings

import pytest
from script_utils import (image_folder, load_script, run_main as cli, script_command, script_env, snapshot, text_files,
                          text_flags)

from shared.errors import UserError

IMAGE_FILES = {"config.json", "model.safetensors", "README.md", "report-test.json"}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-image")
    run = root / "run"
    load_script("train_image").main(list(map(str, [
        "--data-dir", image_folder(root / "data"), "--cache-dir", root / "cache", "--preset", "tiny",
        "--output-dir", run, "--max-steps", 4, "--batch-size", 8, "--eval-every", 4, "--save-every", 4])))
    report = load_script("report_image").main(["--run", str(run), "--iw-samples", "3", "--iw-chunk", "3"])
    return run, report


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-text")
    run = root / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the toy corpus cannot fill the vocabulary
        load_script("train_text").main(list(map(str, [
            *text_flags(text_files(root / "data", n_train=120), root / "cache"), "--output-dir", run,
            "--max-steps", 4, "--batch-size", 8, "--eval-every", 4, "--save-every", 4])))
    report = load_script("report_text").main(["--run", str(run), "--iw-samples", "3", "--mi-batches", "1"])
    return run, report


def figures(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "run"}  # "run" is where it was read from


def test_exported_image_folder_samples_and_reports_like_its_run(image_run, tmp_path, capsys):
    run, report = image_run
    dest = tmp_path / "biva-tiny"
    code, out, err = cli("export", ["--run", run, "--to", dest], capsys)
    assert code == 0, err
    assert {p.name for p in dest.iterdir()} == IMAGE_FILES  # no checkpoints, metrics or samples
    assert json.loads((dest / "report-test.json").read_text()) == report

    card = (dest / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: biva" in front and "- biva\n- vae\n" in front
    for key, spec in (("bits_per_dim_elbo", ".4f"), ("bits_per_dim_iw", ".4f"), ("nats_elbo", ".3f"),
                      ("nats_iw", ".3f")):
        assert format(report[key], spec) in card
    assert f"{report['num_params']:,}" in card and "| test | 4 |" in card and "--run " in card

    for where in (run, dest):
        load_script("sample_image").main(["--run", str(where), "--num", "6", "--seed", "5",
                                          "--out", str(tmp_path / f"{where.name}.png")])
    assert (tmp_path / "run.png").read_bytes() == (tmp_path / "biva-tiny.png").read_bytes()
    again = load_script("report_image").main(["--run", str(dest), "--iw-samples", "3", "--iw-chunk", "3"])
    assert figures(again) == figures(report)  # step included: the export records it
    assert again["step"] == 4

    # On another machine the recorded image folder is missing: the report asks for --data-dir, then works.
    config = json.loads((dest / "config.json").read_text())
    data_dir = config["data"]["data_dir"]
    config["data"]["data_dir"] = "elsewhere/data"
    (dest / "config.json").write_text(json.dumps(config))
    code, out, err = cli("report_image", ["--run", dest, "--iw-samples", 3], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data-dir" in err
    moved = load_script("report_image").main(["--run", str(dest), "--iw-samples", "3", "--iw-chunk", "3",
                                              "--data-dir", data_dir])
    assert figures(moved) == figures(report)


def test_exported_text_folder_samples_and_reports_like_its_run(text_run, tmp_path, capsys):
    run, report = text_run
    dest = tmp_path / "text-export"
    code, out, err = cli("export", ["--run", run, "--to", dest], capsys)
    assert code == 0, err
    assert {p.name for p in dest.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model",
                                                "README.md", "report-test.json"}
    card = (dest / "README.md").read_text()
    for key, spec in (("nll_elbo", ".3f"), ("nll_iw", ".3f"), ("kl", ".3f"), ("ppl_elbo", ".2f"), ("ppl", ".2f")):
        assert format(report[key], spec) in card
    assert "text-generation" in card

    sample = load_script("sample_text")
    assert sample.main(["--run", str(dest), "--num", "5", "--seed", "2"]) == \
        sample.main(["--run", str(run), "--num", "5", "--seed", "2"])
    again = load_script("report_text").main(["--run", str(dest), "--iw-samples", "3", "--mi-batches", "1"])
    assert figures(again) == figures(report)


def test_a_hub_id_loads_from_the_hub_cache_and_writes_beside_the_caller(image_run, tmp_path, monkeypatch, capsys):
    """--run owner/name offline: the snapshot in the hub cache is used read-only; outputs go to ./name."""
    from huggingface_hub import constants

    run, report = image_run
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--biva-tiny"
    assert cli("export", ["--run", run, "--to", repo / "snapshots" / sha], capsys)[0] == 0
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    before = snapshot(cache)

    again = load_script("report_image").main(["--run", "someone/biva-tiny", "--iw-samples", "3", "--iw-chunk", "3"])
    assert figures(again) == figures(report)
    assert json.loads((tmp_path / "biva-tiny" / "report-test.json").read_text()) == again
    load_script("sample_image").main(["--run", "someone/biva-tiny", "--num", "4"])
    assert (tmp_path / "biva-tiny" / "samples" / "samples.png").is_file()
    assert snapshot(cache) == before  # nothing written into the cache


def test_export_refuses_a_non_run_and_an_existing_folder_with_one_line(image_run, tmp_path, capsys):
    run, _ = image_run
    (tmp_path / "empty").mkdir()
    code, out, err = cli("export", ["--run", tmp_path / "empty", "--to", tmp_path / "out"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "config.json" in err
    assert not (tmp_path / "out").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, out, err = cli("export", ["--run", run, "--to", taken], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert snapshot(taken) == {"notes.txt": b"mine"}
    assert cli("export", ["--run", run, "--to", taken, "--overwrite"], capsys)[0] == 0
    assert {p.name for p in taken.iterdir()} == IMAGE_FILES


def test_a_failed_export_leaves_nothing_behind(image_run, tmp_path, monkeypatch, capsys):
    run, _ = image_run
    calls = []

    def failing_copy(src, dst, *a, **k):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *a, **k)

    real_copy = shutil.copyfile
    monkeypatch.setattr(shutil, "copyfile", failing_copy)
    with pytest.raises(OSError):
        load_script("export").main(["--run", str(run), "--to", str(tmp_path / "out")])
    assert len(calls) == 2 and os.listdir(tmp_path) == []


def test_push_to_hub_offline_is_refused_before_anything_is_written(image_run, tmp_path, capsys):
    run, _ = image_run
    code, out, err = cli("export", ["--run", run, "--to", tmp_path / "out", "--push-to-hub", "someone/biva"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_hub_id_offline_fails_in_under_5_seconds_with_one_line():
    started = time.monotonic()
    p = subprocess.run(script_command("sample_text.py", "--run", "nobody/no-such-biva"), capture_output=True,
                       text=True, env=script_env(HF_HUB_OFFLINE=1), timeout=60)
    took = time.monotonic() - started
    assert p.returncode == 2 and took < 5, (p.returncode, took, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "nobody/no-such-biva" in p.stderr and "HF_HUB_OFFLINE" in p.stderr


@pytest.mark.slow
def test_an_unresponsive_hub_fails_within_its_metadata_timeout(monkeypatch):
    """An endpoint that accepts connections and never answers: huggingface_hub alone waits forever."""
    from huggingface_hub import constants

    from shared.run_dir import resolve_run

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        started = time.monotonic()
        with pytest.raises(UserError, match="nobody/biva-x"):
            resolve_run("nobody/biva-x")
    assert time.monotonic() - started < 10


def test_a_path_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    from shared.run_dir import resolve_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert resolve_run("owner/name").resolve() == tmp_path / "owner" / "name"  # the local folder wins
    for text in ("./runs/missing", str(tmp_path / "runs" / "missing"), "runs/missing/"):
        with pytest.raises(UserError, match="is not a directory"):
            resolve_run(text)
