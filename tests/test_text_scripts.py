"""Every text script end to end on the ``tiny`` preset, in-process (``main(argv)``), on synthetic
sentences from a small grammar written to tmp files. Tiny runs are trained once per module."""
from __future__ import annotations

import json
import math
import shlex
import shutil
import random
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from script_utils import load_script as script
from script_utils import run_main as run_script

from shared.config import RunConfig, TrainConfig, write_json_atomic
from shared.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ADJ = "big small red blue old young happy sad".split()
NOUN = "cat dog bird man woman child house tree car boat".split()
VERB = "sees likes finds wants takes".split()


def grammar_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = ["the", rng.choice(ADJ), rng.choice(NOUN), rng.choice(VERB), "the", rng.choice(NOUN)]
        if rng.random() < 0.5:
            s += ["and", "the", rng.choice(ADJ), rng.choice(NOUN)]
        out.append(" ".join(s + [rng.choice([".", "!"])]))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    files = {}
    for name, n, seed in (("train", 320, 0), ("valid", 48, 1), ("test", 40, 2)):
        files[name] = root / f"{name}.txt"
        files[name].write_text("\n".join(grammar_sentences(n, seed)) + "\n")
    return SimpleNamespace(root=root, cache=root / "cache", **files)


def train(corpus, name: str, model: str, *extra: str) -> Path:
    out = corpus.root / name
    argv = ["--preset", "tiny", "--model", model, "--train-files", str(corpus.train), "--valid-files",
            str(corpus.valid), "--test-files", str(corpus.test), "--max-tokens", "12", "--output-dir", str(out),
            "--cache-dir", str(corpus.cache), *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the toy corpus cannot fill 20k pieces
        script("train_text").main(argv)
    return out


@pytest.fixture(scope="module")
def biva_run(corpus):
    return train(corpus, "biva", "biva-lstm", "--max-steps", "40", "--eval-every", "20")


@pytest.fixture(scope="module")
def lm_run(corpus):
    return train(corpus, "lm", "lstm-lm", "--max-steps", "10", "--eval-every", "10")


@pytest.fixture(scope="module")
def vae_run(corpus):
    return train(corpus, "vae", "rnn-vae", "--max-steps", "10", "--eval-every", "10", "--kl-warmup-steps", "5")


def test_training_writes_a_complete_text_run(biva_run, corpus):
    for name in ("config.json", "model.safetensors", "tokenizer.model", "metrics.jsonl"):
        assert (biva_run / name).is_file(), name
    config = json.loads((biva_run / "config.json").read_text())
    assert config["modality"] == "text" and config["model"]["model"] == "biva-lstm"
    stats = config["extra"]["data_stats"]["splits"]
    assert stats["train"]["kept"] == 320 and stats["test"]["kept"] == 40
    assert stats["test"]["tokens"] == sum(len(s.split()) + 1 for s in corpus.test.read_text().splitlines())
    samples = (biva_run / "samples" / "step_40.txt").read_text().splitlines()
    assert len(samples) == 20 and (biva_run / "samples" / "step_20.txt").is_file()
    records = [json.loads(line) for line in (biva_run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in valid] == [20, 40] and len(valid[-1]["kl_per_group"]) == 5
    assert valid[-1]["free_bits_budget"] == 2.0  # the tiny preset's budget, over the 5 groups
    train_loss = [r["loss"] for r in records if r.get("split") == "train"]
    assert train_loss[-1] < train_loss[0]


def test_resume_continues_with_the_runs_tokenizer(corpus, vae_run, capsys):
    tokenizer = (vae_run / "tokenizer.model").read_bytes()
    code, _, err = run_script("train_text", ["--output-dir", str(vae_run), "--resume", "--max-steps", "14",
                                             "--eval-every", "14"], capsys)
    assert code == 0, err
    assert (vae_run / "tokenizer.model").read_bytes() == tokenizer
    steps = [json.loads(line)["step"] for line in (vae_run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 14
    code, _, err = run_script("train_text", ["--output-dir", str(vae_run), "--resume", "--model", "biva"], capsys)
    assert code == 2 and "differs from the resumed run" in err and len(err.strip().splitlines()) == 1


def test_report_json_and_table(biva_run, corpus, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, err = run_script("report_text", ["--run", str(biva_run), "--iw-samples", "40", "--json", str(out_json)],
                                capsys)
    assert code == 0, err
    report = json.loads((biva_run / "report-test.json").read_text())
    assert report == json.loads(out_json.read_text())
    for key in ("num_params", "iw_samples", "nll", "nll_elbo", "kl", "ppl", "ppl_elbo", "mutual_info",
                "num_sentences", "num_tokens"):
        assert math.isfinite(report[key]), key
    assert report["num_sentences"] == 40
    assert report["num_tokens"] == sum(len(s.split()) + 1 for s in corpus.test.read_text().splitlines())
    assert report["ppl"] == pytest.approx(math.exp(report["nll"] * 40 / report["num_tokens"]), rel=1e-9)
    assert report["ppl_elbo"] == pytest.approx(math.exp(report["nll_elbo"] * 40 / report["num_tokens"]), rel=1e-9)
    assert report["nll"] <= report["nll_elbo"] + 0.05
    assert report["nll"] == report["nll_iw"] and report["iw_samples"] == 40
    groups = report["kl_per_group"]
    assert [(g["level"], g["kind"]) for g in groups] == [(3, "top"), (2, "bu"), (2, "td"), (1, "bu"), (1, "td")]
    assert sum(g["kl"] for g in groups) == pytest.approx(report["kl"], rel=1e-6)
    au = report["active_units"]
    assert set(au) == {"total", "per_group", "units", "units_per_group"} and len(au["per_group"]) == 5
    assert all(0 <= a <= u for a, u in zip(au["per_group"], au["units_per_group"])) and au["units"] == sum(au["units_per_group"])
    assert 0.0 - 0.5 <= report["mutual_info"] <= math.log(64) + 0.5
    assert (biva_run / "kl-per-group-test.png").stat().st_size > 1000
    assert report["weights"] == "ema" and report["noise_seed"] == report["seed"] == 0 and report["subset"] is None
    assert "| biva-lstm |" in out and f"{report['nll_elbo']:.2f}" in out


def test_report_of_the_language_model_has_null_latent_keys_and_compare_tables_runs(biva_run, lm_run, vae_run, capsys):
    assert run_script("report_text", ["--run", str(lm_run), "--split", "valid"], capsys)[0] == 0
    lm = json.loads((lm_run / "report-valid.json").read_text())
    assert lm["kl"] is None and lm["kl_per_group"] is None and lm["active_units"] is None and lm["mutual_info"] is None
    assert lm["nll"] == lm["nll_elbo"] and lm["num_sentences"] == 48
    assert run_script("report_text", ["--run", str(vae_run), "--split", "valid", "--iw-samples", "8",
                                      "--max-sentences", "20"], capsys)[0] == 0
    vae = json.loads((vae_run / "report-valid.json").read_text())
    assert vae["num_sentences"] == 20 and len(vae["kl_per_group"]) == 1 and vae["kl_per_group"][0]["kind"] == "top"
    assert vae["subset"] == {"size": 20, "of": 48, "seed": 0, "stratified": False} and vae["weights"] == "ema"
    code, out, err = run_script("compare_text", [str(lm_run), str(vae_run), "--split", "valid"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4 and "| lm | lstm-lm |" in lines[2] and "| vae | rnn-vae |" in lines[3]
    assert f"{vae['ppl']:.2f}" in lines[3]
    code, _, err = run_script("compare_text", [str(lm_run), str(biva_run), "--split", "train"], capsys)
    assert code == 2 and "report_text.py" in err


def test_sampling_is_reproducible_per_sentence(biva_run, capsys):
    sample = script("sample_text").main
    five = sample(["--run", str(biva_run), "--num", "5", "--seed", "3", "--device", "cpu"])
    assert len(five) == 5
    assert sample(["--run", str(biva_run), "--num", "3", "--seed", "3", "--device", "cpu"]) == five[:3]
    assert sample(["--run", str(biva_run), "--num", "5", "--seed", "4", "--device", "cpu"]) != five
    for flags in (["--greedy"], ["--beam", "3"], ["--top-p", "0.5", "--temperature", "0.7"],
                  ["--latent-temperature", "0.5"]):
        sentences = sample(["--run", str(biva_run), "--num", "4", "--device", "cpu", *flags])
        assert len(sentences) == 4 and all(isinstance(s, str) for s in sentences)
        assert all(w in set(ADJ + NOUN + VERB + ["the", "and", ".", "!", "<unk>"]) for s in sentences for w in s.split())
    code, _, err = run_script("sample_text", ["--run", str(biva_run), "--greedy", "--beam", "2"], capsys)
    assert code == 2 and "not allowed with" in err


def test_reconstruct_skips_and_counts_sentences_too_long(biva_run, tmp_path, capsys):
    path = tmp_path / "in.txt"
    long = " ".join(["the big cat"] * 5)  # 15 pieces, more than the model's 12
    path.write_text(f"the big cat sees the dog .\n{long}\n\nthe old man likes the red car !\n")
    code, out, err = run_script("reconstruct_text", ["--run", str(biva_run), "--input", str(path), "--device", "cpu"],
                                capsys)
    assert code == 0, err
    assert out.count("> ") == 2 and out.count("< ") == 2 and long not in out
    assert "15 pieces" in err and "skipped 1 of 3" in err
    code, out, err = run_script("reconstruct_text", ["--run", str(biva_run), "--input", str(path), "--from-level", "2",
                                                     "--beam", "2", "--device", "cpu"], capsys)
    assert code == 0 and out.count("< ") == 2
    code, _, err = run_script("reconstruct_text", ["--run", str(biva_run), "--input", str(path), "--from-level", "3"],
                              capsys)
    assert code == 2 and "--from-level" in err
    code, out, err = run_script("reconstruct_text", ["--run", str(biva_run), "--input", str(path), "--posterior-mean",
                                                     "--device", "cpu"], capsys)
    assert code == 0 and out.count("< ") == 2
    code, _, err = run_script("reconstruct_text", ["--run", str(biva_run), "--input", str(path), "--posterior-mean",
                                                   "--from-level", "1"], capsys)
    assert code == 2 and "takes no --from-level" in err


def test_reconstruct_takes_num_sentences_of_the_runs_own_split(biva_run, corpus, tmp_path, capsys):
    def inputs(out):
        return [line[2:] for line in out.splitlines() if line.startswith("> ")]

    argv = ["--run", str(biva_run), "--split", "test", "--num", "3", "--device", "cpu"]
    code, out, err = run_script("reconstruct_text", argv, capsys)
    assert code == 0, err
    test = corpus.test.read_text().splitlines()
    chosen = inputs(out)
    assert len(chosen) == 3 and all(s in test for s in chosen) and out.count("< ") == 3
    assert run_script("reconstruct_text", argv, capsys)[1] == out  # seeded: the same sentences, the same output
    code, other, _ = run_script("reconstruct_text", argv + ["--seed", "1"], capsys)
    assert code == 0 and inputs(other) != chosen
    path = tmp_path / "chosen.txt"  # the same as giving those sentences with --input
    path.write_text("\n".join(chosen) + "\n")
    assert run_script("reconstruct_text", ["--run", str(biva_run), "--input", str(path), "--device", "cpu"],
                      capsys)[1] == out
    code, out, err = run_script("reconstruct_text", ["--run", str(biva_run), "--split", "valid", "--num", "1000",
                                                     "--device", "cpu"], capsys)
    assert code == 0 and sorted(inputs(out)) == sorted(corpus.valid.read_text().splitlines())  # all 48
    for bad, message in ((["--num", "3"], "--num counts sentences of --split"),
                         (["--split", "test", "--input", str(path)], "not allowed with")):
        code, _, err = run_script("reconstruct_text", ["--run", str(biva_run), *bad], capsys)
        assert code == 2 and message in err, err


@pytest.mark.parametrize("content, message", [(" ".join(["the cat"] * 7) + "\n", "no usable sentence"),
                                              ("\n  \n", "has no sentence")])
def test_reconstruct_with_no_usable_sentence_is_one_clear_error(biva_run, tmp_path, capsys, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    code, out, err = run_script("reconstruct_text", ["--run", str(biva_run), "--input", str(path)], capsys)
    assert code == 2 and message in err.splitlines()[-1] and err.splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err


def test_interpolation_walks_between_two_sentences(biva_run, vae_run, lm_run, capsys):
    first, second = "the big cat sees the dog .", "the old man likes the red car and the happy child !"
    for run in (biva_run, vae_run):
        sentences = script("interpolate_text").main(["--run", str(run), first, second, "--steps", "5", "--device", "cpu"])
        assert len(sentences) == 5
    code, out, err = run_script("interpolate_text", ["--run", str(biva_run), first, "the zebra runs ."], capsys)
    assert code == 0 and "zebra" in err.splitlines()[0] and len(out.splitlines()) == 8  # read as <unk>, with a warning
    code, _, err = run_script("interpolate_text", ["--run", str(lm_run), first, second], capsys)
    assert code == 2 and "no latent variables" in err


def test_an_image_run_or_a_non_run_is_refused_by_every_text_script(tmp_path, capsys):
    image_run = tmp_path / "image_run"
    image_run.mkdir()
    write_json_atomic(image_run / "config.json", RunConfig("image", "tiny", {}, {}, TrainConfig()).to_json())
    before = sorted(p.name for p in image_run.iterdir())
    for name, argv in (("report_text", []), ("sample_text", []), ("interpolate_text", ["a", "b"])):
        code, _, err = run_script(name, ["--run", str(image_run), *argv], capsys)
        assert code == 2 and "image run, not a text run" in err, (name, err)
    code, _, err = run_script("train_text", ["--output-dir", str(image_run), "--resume"], capsys)
    assert code == 2 and "image run" in err
    assert sorted(p.name for p in image_run.iterdir()) == before
    code, _, err = run_script("report_text", ["--run", str(tmp_path / "missing")], capsys)
    assert code == 2 and "not a directory" in err


def test_bad_training_flags_fail_fast(corpus, capsys):
    cases = [(["--model", "lstm-lm", "--kl-schedule", "warmup"], "no latent variables"),
             (["--train-files", str(corpus.root / "nope.txt")], "is not a file"),
             (["--kl-schedule", "free-bits", "--kl-warmup-steps", "5"], "needs --kl-schedule warmup"),
             (["--batch-size", "0"], "positive integer")]
    for argv, message in cases:
        code, _, err = run_script("train_text", argv, capsys)
        assert code == 2 and message in err, (argv, err)


@pytest.mark.parametrize("name", ["train_text", "sample_text", "reconstruct_text", "interpolate_text", "report_text",
                                  "encode_text", "prepare_text"])
def test_flags_are_checked_before_torch_is_imported(name):
    probe = ("import runpy, sys\n"
             f"sys.argv = ['{name}.py', '--batch-size', '0', '--run', '/nonexistent']\n"
             "try:\n"
             f"    runpy.run_path('{ROOT / 'scripts' / name}.py', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('torch' in sys.modules, e.code)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "2"], result.stderr


def test_empty_training_file_is_a_user_error_and_leaves_no_run(corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "run"
    code, _, err = run_script("train_text", ["--preset", "tiny", "--train-files", str(empty), "--output-dir", str(out),
                                             "--cache-dir", str(corpus.cache)], capsys)
    assert code == 2 and "no usable sentence" in err
    assert not (out / "config.json").exists() and not (out / "tokenizer.model").exists()


def test_kl_warmup_hook_follows_the_optimiser_steps():
    from biva_text.model import build_text_model
    from biva_text.presets import get_preset

    from biva_text.train import attach_kl_warmup as attach
    model = build_text_model(get_preset("tiny", "rnn-vae", vocab_size=20, kl_warmup_steps=4).model)
    optimizer = torch.optim.Adamax(model.parameters())
    trainer = SimpleNamespace(raw_model=model, optimizer=optimizer, state=SimpleNamespace(step=0))
    attach(trainer, 4)
    seen = []
    for _ in range(6):
        seen.append(float(model.kl_weight))
        optimizer.step()  # the engine counts the step after the optimiser's
        trainer.state.step += 1
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    resumed = SimpleNamespace(raw_model=model, optimizer=torch.optim.Adamax(model.parameters()),
                              state=SimpleNamespace(step=2))
    attach(resumed, 4)
    assert float(model.kl_weight) == 0.5


def test_report_on_another_machine_takes_the_runs_text_from_new_paths(biva_run, corpus, tmp_path, capsys):
    """A run copied where its recorded text files are not: report_text names the flag to pass; with
    --train/--valid/--test-files pointing at copies it reports the same figures; other text is refused."""
    moved = tmp_path / "copied-run"
    shutil.copytree(biva_run, moved)
    config = json.loads((moved / "config.json").read_text())
    for key in ("train_files", "valid_files", "test_files"):
        config["data"][key] = [str(tmp_path / "elsewhere" / Path(f).name) for f in config["data"][key]]
    config["extra"]["cache_dir"] = str(tmp_path / "cache")  # nothing cached on the new machine
    (moved / "config.json").write_text(json.dumps(config))
    common = ["--run", str(moved), "--iw-samples", "5", "--mi-batches", "1"]
    code, _, err = run_script("report_text", common, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--train-files" in err and "not on this machine" in err
    here = tmp_path / "here"
    here.mkdir()
    for name in ("train", "valid", "test"):
        shutil.copy(getattr(corpus, name), here / f"{name}.txt")
    files = ["--train-files", str(here / "train.txt"), "--valid-files", str(here / "valid.txt"),
             "--test-files", str(here / "test.txt")]
    code, _, err = run_script("report_text", [*common, *files], capsys)
    assert code == 0, err
    code, _, err = run_script("report_text", ["--run", str(biva_run), "--iw-samples", "5", "--mi-batches", "1",
                                              "--json", str(tmp_path / "original.json")], capsys)
    assert code == 0, err
    a, b = json.loads((moved / "report-test.json").read_text()), json.loads((tmp_path / "original.json").read_text())
    for key in ("nll", "nll_elbo", "kl", "ppl", "num_sentences", "num_tokens"):
        assert a[key] == b[key], key
    (here / "test.txt").write_text("\n".join(corpus.test.read_text().splitlines()[:-3]) + "\n")  # other text
    code, _, err = run_script("report_text", [*common, *files], capsys)
    assert code == 2 and "other text than the run's" in err


def test_device_cuda_without_a_gpu_is_one_line_for_every_run_script(biva_run, monkeypatch, capsys):
    """One --device resolver (shared.cli.pick_device) for every script: auto picks what is there, and
    cuda asked for where no GPU is visible is one error line, exit 2, not a torch traceback."""
    from shared.cli import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == pick_device(None) == "cpu" and pick_device("cpu") == "cpu"
    for argv in (["--run", str(biva_run)], ["--run", str(biva_run), "--num", "2"]):
        name = "report_text" if len(argv) == 2 else "sample_text"
        code, _, err = run_script(name, [*argv, "--device", "cuda"], capsys)
        assert code == 2 and err.strip().splitlines() == [
            "error: --device cuda was asked for but no CUDA device is visible; use --device cpu"], (name, err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda" and pick_device("cuda:1") == "cuda:1"


def test_a_run_started_from_python_prints_its_own_resume_command(corpus, monkeypatch, capsys):
    """A benchmark calls train_text.main(argv) in-process; a SIGTERM must name train_text.py and those
    flags (not the benchmark's command line), and that command must finish the run."""
    out = corpus.root / "stopped"
    argv = ["--preset", "tiny", "--train-files", str(corpus.train), "--valid-files", str(corpus.valid),
            "--test-files", str(corpus.test), "--max-tokens", "12", "--output-dir", str(out), "--cache-dir",
            str(corpus.cache), "--max-steps", "6", "--eval-every", "6"]
    monkeypatch.setenv("BIVA_FAULTS", "sigterm@3")
    code, _, err = run_script("train_text", argv, capsys)
    assert code == 143, err
    said = [line for line in err.splitlines() if "resume with: " in line]
    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[0] == "python" and Path(command[1]).resolve() == Path(__file__).resolve().parents[1] / "scripts" / "train_text.py"
    assert command[2:] == argv + ["--resume"]
    monkeypatch.delenv("BIVA_FAULTS")
    code, _, err = run_script("train_text", command[2:], capsys)
    assert code == 0, err
    assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("model, events", [("lstm-lm", False), ("biva-lstm", True)])
def test_the_free_bits_schedule_runs_only_for_models_with_latents(corpus, model, events):
    """Every evaluation a plateau (a 1000-nat threshold, patience 1): biva-lstm's budget drops and is logged;
    the language model has no KL to schedule and logs no budget change."""
    out = train(corpus, f"plateau-{model}", model, "--max-steps", "4", "--eval-every", "1",
                "--free-bits-patience", "1", "--free-bits-threshold", "1000")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "free_bits" for r in records) == events


@pytest.mark.slow
def test_text_quality_benchmark_trains_each_model_for_minutes_on_given_splits(corpus, tmp_path, capsys):
    """The prepared GPU text-quality check (benchmarks/text_quality.py --minutes M --data DIR), on the CPU at the
    tiny preset: the run ends on time, not on its (unbounded) steps, is reported on the test split,
    and a second call reuses the finished run and its report."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_text_quality", ROOT / "benchmarks" / "text_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, summary = tmp_path / "tq", tmp_path / "tq.json"
    argv = ["--preset", "tiny", "--models", "biva-lstm", "--minutes", "0.04", "--data", str(corpus.root),
            "--iw-samples", "2", "--threads", "1", "--out-dir", str(out), "--json", str(summary)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the toy corpus cannot fill 20k pieces
        with pytest.raises(SystemExit):  # the overlap check cannot pass on a 3-second model
            bench.main(argv)
    said = capsys.readouterr()
    assert "training biva-lstm (biva-lstm) for 0.04 minutes" in said.err
    assert "--max-minutes 0.04: the time was used up at step" in said.err
    result = json.loads(summary.read_text())
    assert result["settings"]["minutes"] == 0.04 and result["settings"]["preset"] == "tiny"
    assert result["settings"]["data"] == str(corpus.root) and result["settings"]["device"] == "cpu"
    run = out / "biva-lstm"
    config = json.loads((run / "config.json").read_text())["train"]
    assert config["max_minutes"] == 0.04 and config["max_steps"] == bench.UNBOUNDED_STEPS
    report = result["reports"]["biva-lstm"]
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert report["step"] == steps[-1] > 0 and report["iw_samples"] == 2
    state = json.loads((run / "checkpoints" / f"step_{steps[-1]}" / "trainer_state.json").read_text())
    assert 0.04 * 60 <= state["train_seconds"] < 60  # ended by the clock, soon after the limit
    assert "Table 7 shape, " + str(corpus.root) + " test split, preset tiny, 0.04 minutes each" in said.out
    figure = tmp_path / "tq.png"  # beside the JSON: KL against overlap and perplexity
    assert f"wrote {figure}" in said.out and figure.read_bytes().startswith(b"\x89PNG")
    figure.unlink()
    assert not bench.plot_trade_off({"lstm-lm": result["reports"]["biva-lstm"] | {"kl": None}}, figure, "")
    assert not figure.exists()  # nothing to plot without latents

    with pytest.raises(SystemExit):
        bench.main(argv)
    again = capsys.readouterr()
    assert "training biva-lstm" not in again.err and json.loads(summary.read_text())["reports"] == result["reports"]
    with pytest.raises(UserError, match="lacks train.txt"):
        bench.main([*argv[:7], str(tmp_path), *argv[8:]])
