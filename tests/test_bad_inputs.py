"""Bad inputs across all scripts end as docs/reference.md says: exit status 2, one line on stderr that names
the problem (and the fix), no traceback, and every existing file byte-for-byte unchanged.

The scripts run as subprocesses, as users see them. Flag and run-directory errors fail before torch
is imported (a fraction of a second each); only the data errors (marked slow below) load torch.
"""
import re
import shutil

import pytest
from core_utils import ArrayDataset, build, stripes, tiny_image_config, tiny_run
from script_utils import image_folder, run_script, script_env, snapshot, text_files
from PIL import Image

from shared.config import RunConfig
from shared.engine import Trainer
from shared.run_dir import write_run_config


def _train_in_process(out, variant):
    cfg = tiny_image_config(variant)
    run = tiny_run(cfg, max_steps=2, eval_every=2, save_every=2, log_every=2)
    out.mkdir(parents=True)
    write_run_config(out, run)
    Trainer(run, build(cfg), ArrayDataset(stripes(32)), ArrayDataset(stripes(5, seed=1)), out).fit()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases point at, made once; each case checks that it changed none of it."""
    w = tmp_path_factory.mktemp("world")
    image_folder(w / "images", n_train=20, n_test=4)
    files = text_files(w / "text", n_train=40, n_valid=5, n_test=5)
    (w / "afile").write_text("a regular file\n")
    (w / "empty_dir").mkdir()
    (w / "foreign").mkdir()
    (w / "foreign" / "notes.txt").write_text("not a run\n")
    _train_in_process(w / "image_run", "biva")  # the "test" preset of the core tests
    _train_in_process(w / "other_model_run", "lvae")
    # A run whose latest checkpoint was written by another model (copied in from the lvae run).
    shutil.copytree(w / "image_run", w / "mixed_run")
    shutil.copytree(w / "other_model_run" / "checkpoints" / "step_2", w / "mixed_run" / "checkpoints" / "step_4")
    text_run = RunConfig(modality="text", preset="tiny", model={"model": "biva-lstm"}, data={})
    (w / "text_run").mkdir()
    write_run_config(w / "text_run", text_run)
    (w / "broken_run").mkdir()
    (w / "broken_run" / "config.json").write_text("{ this is not json")
    # Bad data.
    (w / "empty_images" / "train").mkdir(parents=True)
    shutil.copytree(w / "images", w / "garbage_images")
    (w / "garbage_images" / "train" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    shutil.copytree(w / "images", w / "mixed_images")
    Image.new("L", (12, 12)).save(w / "mixed_images" / "train" / "000.png")
    (w / "empty.txt").write_text("")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (w / "report_dir").mkdir()
    return w, files


def image(w, *args):
    return ["train_image.py", "--data-dir", w / "images", "--cache-dir", w / "cache", "--preset", "tiny", *args]


def text(w, files, *args):
    return ["train_text.py", "--preset", "tiny", "--train-files", files["train"], "--valid-files", files["valid"],
            "--test-files", files["test"], "--vocab-size", "40", "--cache-dir", w / "cache", *args]


# (id, arguments given the world, what the one line must name)
CASES = [
    # --- train_image: numbers of the wrong type or range, unknown choices and flags
    ("max-steps-zero", lambda w, f: image(w, "--max-steps", "0"), r"--max-steps.*positive integer"),
    ("max-steps-word", lambda w, f: image(w, "--max-steps", "ten"), r"--max-steps.*'ten'"),
    ("batch-size-negative", lambda w, f: image(w, "--batch-size", "-8"), r"--batch-size"),
    ("grad-accum-zero", lambda w, f: image(w, "--grad-accum", "0"), r"--grad-accum"),
    ("lr-zero", lambda w, f: image(w, "--lr", "0"), r"--lr.*positive number"),
    ("lr-nan", lambda w, f: image(w, "--lr", "nan"), r"--lr"),
    ("eval-every-fraction", lambda w, f: image(w, "--eval-every", "2.5"), r"--eval-every"),
    ("keep-checkpoints-zero", lambda w, f: image(w, "--keep-checkpoints", "0"), r"--keep-checkpoints"),
    ("seed-negative", lambda w, f: image(w, "--seed", "-1"), r"--seed"),
    ("ema-decay-above-one", lambda w, f: image(w, "--ema-decay", "1.5"), r"--ema-decay.*\[0, 1\]"),
    ("free-bits-negative", lambda w, f: image(w, "--free-bits", "-1"), r"--free-bits"),
    ("free-bits-factor-two", lambda w, f: image(w, "--free-bits-factor", "2"), r"--free-bits-factor"),
    ("skip-threshold-negative", lambda w, f: image(w, "--skip-threshold", "-1"), r"--skip-threshold"),
    ("max-skips-word", lambda w, f: image(w, "--max-skips", "many"), r"--max-skips"),
    ("levels-zero", lambda w, f: image(w, "--levels", "0"), r"--levels"),
    ("unknown-preset", lambda w, f: image(w, "--preset", "huge"), r"--preset.*huge"),
    ("unknown-model", lambda w, f: image(w, "--model", "vae"), r"--model.*vae"),
    ("unknown-precision", lambda w, f: image(w, "--mixed-precision", "fp8"), r"--mixed-precision"),
    ("unknown-likelihood", lambda w, f: image(w, "--likelihood", "gaussian"), r"--likelihood"),
    ("unknown-dataset", lambda w, f: image(w, "--dataset", "imagenet"), r"--dataset"),
    ("unknown-flag", lambda w, f: image(w, "--learning-rate", "0.1"), r"--learning-rate"),
    ("labels-per-class-zero", lambda w, f: image(w, "--labels-per-class", "0"), r"--labels-per-class.*positive integer"),
    ("classifier-weight-without-labels", lambda w, f: image(w, "--classifier-weight", "0.5"),
     r"--classifier-weight needs --labels-per-class"),
    # --- train_image: paths and run directories
    ("data-dir-missing", lambda w, f: ["train_image.py", "--data-dir", w / "nowhere"], r"--data-dir .*nowhere"),
    ("data-dir-below-file", lambda w, f: ["train_image.py", "--data-dir", w / "afile" / "images"], r"--data-dir"),
    ("data-dir-is-file", lambda w, f: ["train_image.py", "--data-dir", w / "afile"], r"--data-dir .*afile"),
    ("output-dir-below-file", lambda w, f: image(w, "--output-dir", w / "afile" / "run"), r"afile.*is a file"),
    ("output-dir-is-file", lambda w, f: image(w, "--output-dir", w / "afile"), r"afile is a file"),
    ("output-dir-holds-a-run", lambda w, f: image(w, "--output-dir", w / "image_run"), r"already holds a run.*--resume"),
    ("resume-without-output-dir", lambda w, f: image(w, "--resume"), r"--resume needs --output-dir"),
    ("resume-missing-dir", lambda w, f: image(w, "--resume", "--output-dir", w / "nowhere"), r"cannot resume.*does not exist"),
    ("resume-empty-dir", lambda w, f: image(w, "--resume", "--output-dir", w / "empty_dir"), r"cannot resume.*no run"),
    ("resume-foreign-dir", lambda w, f: image(w, "--resume", "--output-dir", w / "foreign"), r"cannot resume.*no run"),
    ("resume-broken-config", lambda w, f: image(w, "--resume", "--output-dir", w / "broken_run"), r"config\.json is not valid JSON"),
    ("resume-text-run", lambda w, f: image(w, "--resume", "--output-dir", w / "text_run"), r"is a text run, not an image run"),
    ("resume-other-preset", lambda w, f: image(w, "--resume", "--output-dir", w / "image_run"), r"--preset tiny differs.*preset test"),
    ("resume-checkpoint-of-other-model",
     lambda w, f: ["train_image.py", "--data-dir", w / "images", "--resume", "--output-dir", w / "mixed_run"],
     r"step_4 was written by a different model"),
    # --- train_image: bad data (slow: torch is loaded before the data are read)
    pytest.param("empty-image-folder", lambda w, f: ["train_image.py", "--data-dir", w / "empty_images", "--preset", "tiny",
                                                     "--cache-dir", w / "cache", "--output-dir", w / "out1"],
                 r"no images", marks=pytest.mark.slow),
    pytest.param("not-an-image", lambda w, f: ["train_image.py", "--data-dir", w / "garbage_images", "--preset", "tiny",
                                               "--cache-dir", w / "cache", "--output-dir", w / "out2"],
                 r"000\.png", marks=pytest.mark.slow),
    pytest.param("mixed-image-sizes", lambda w, f: ["train_image.py", "--data-dir", w / "mixed_images", "--preset", "tiny",
                                                    "--cache-dir", w / "cache", "--output-dir", w / "out3"],
                 r"12", marks=pytest.mark.slow),
    pytest.param("labels-of-an-unlabelled-folder", lambda w, f: image(w, "--labels-per-class", "2", "--output-dir", w / "out6"),
                 r"--labels-per-class needs labels: .*images has none", marks=pytest.mark.slow),
    # --- train_text
    ("text-train-file-missing", lambda w, f: ["train_text.py", "--train-files", w / "missing.txt"], r"--train-files .*missing\.txt"),
    ("text-train-file-is-dir", lambda w, f: ["train_text.py", "--train-files", w / "empty_dir"], r"--train-files"),
    ("text-vocab-size-tiny", lambda w, f: text(w, f, "--vocab-size", "3"), r"--vocab-size"),
    ("text-max-tokens-zero", lambda w, f: text(w, f, "--max-tokens", "0"), r"--max-tokens"),
    ("text-unknown-tokenizer", lambda w, f: text(w, f, "--tokenizer", "bpe"), r"--tokenizer"),
    ("text-unknown-model", lambda w, f: text(w, f, "--model", "transformer"), r"--model"),
    ("text-warmup-without-schedule", lambda w, f: text(w, f, "--kl-warmup-steps", "10", "--kl-schedule", "free-bits"),
     r"--kl-warmup-steps"),
    ("text-output-dir-holds-a-run", lambda w, f: text(w, f, "--output-dir", w / "image_run"), r"already holds a run"),
    ("text-resume-image-run", lambda w, f: text(w, f, "--resume", "--output-dir", w / "image_run"), r"is an image run, not a text run"),
    pytest.param("text-binary-file", lambda w, f: ["train_text.py", "--preset", "tiny", "--train-files", w / "binary.txt",
                                                   "--cache-dir", w / "cache", "--output-dir", w / "out4"],
                 r"binary\.txt holds binary data", marks=pytest.mark.slow),
    pytest.param("text-empty-file", lambda w, f: ["train_text.py", "--preset", "tiny", "--train-files", w / "empty.txt",
                                                  "--cache-dir", w / "cache", "--output-dir", w / "out5"],
                 r"empty\.txt", marks=pytest.mark.slow),
    # --- image samplers, reconstructions, reports and comparisons
    ("sample-image-missing-run", lambda w, f: ["sample_image.py", "--run", w / "nowhere"], r"nowhere"),
    ("sample-image-not-a-run", lambda w, f: ["sample_image.py", "--run", w / "foreign"], r"not a run directory"),
    ("sample-image-text-run", lambda w, f: ["sample_image.py", "--run", w / "text_run"], r"text run"),
    ("sample-image-num-zero", lambda w, f: ["sample_image.py", "--run", w / "image_run", "--num", "0"], r"--num"),
    ("sample-image-temperature", lambda w, f: ["sample_image.py", "--run", w / "image_run", "--latent-temperature", "-1"],
     r"--latent-temperature"),
    ("reconstruct-image-level", lambda w, f: ["reconstruct_image.py", "--run", w / "image_run", "--from-level", "-1"],
     r"--from-level"),
    ("reconstruct-image-split", lambda w, f: ["reconstruct_image.py", "--run", w / "image_run", "--split", "dev"], r"--split"),
    ("sample-image-scale-zero", lambda w, f: ["sample_image.py", "--run", w / "image_run", "--scale", "0"],
     r"--scale.*a positive integer or 'auto'"),
    ("reconstruct-image-scale-word", lambda w, f: ["reconstruct_image.py", "--run", w / "image_run", "--scale", "big"],
     r"--scale.*'big'"),
    ("report-image-iw-samples", lambda w, f: ["report_image.py", "--run", w / "image_run", "--iw-samples", "x"], r"--iw-samples"),
    ("report-image-run-below-file", lambda w, f: ["report_image.py", "--run", w / "afile" / "run"], r"afile"),
    ("report-image-ood-dataset", lambda w, f: ["report_image.py", "--run", w / "image_run", "--ood-dataset", "nope"],
     r"--ood-dataset"),
    ("compare-image-missing-run", lambda w, f: ["compare_image.py", w / "nowhere"], r"nowhere"),
    ("compare-image-no-report", lambda w, f: ["compare_image.py", w / "image_run"], r"report"),
    # --- text samplers, reconstructions, reports and comparisons
    ("sample-text-missing-run", lambda w, f: ["sample_text.py", "--run", w / "nowhere"], r"nowhere"),
    ("sample-text-top-p-zero", lambda w, f: ["sample_text.py", "--run", w / "text_run", "--top-p", "0"], r"--top-p"),
    ("sample-text-temperature-zero", lambda w, f: ["sample_text.py", "--run", w / "text_run", "--temperature", "0"],
     r"--temperature"),
    ("sample-text-beam-zero", lambda w, f: ["sample_text.py", "--run", w / "text_run", "--beam", "0"], r"--beam"),
    pytest.param("sample-text-image-run", lambda w, f: ["sample_text.py", "--run", w / "image_run"], r"image run",
                 marks=pytest.mark.slow),
    ("report-text-json-is-dir", lambda w, f: ["report_text.py", "--run", w / "text_run", "--json", w / "report_dir"],
     r"--json"),
    ("report-text-run-is-file", lambda w, f: ["report_text.py", "--run", w / "afile"], r"afile"),
    ("reconstruct-text-input-missing", lambda w, f: ["reconstruct_text.py", "--run", w / "text_run", "--input",
                                                     w / "missing.txt"], r"--input"),
    ("interpolate-text-one-step", lambda w, f: ["interpolate_text.py", "--run", w / "text_run", "a cat", "a dog",
                                                "--steps", "1"], r"--steps"),
    ("compare-text-no-report", lambda w, f: ["compare_text.py", w / "text_run"], r"report"),
]


def _case_id(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name,args,names", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_clear_line(world, name, args, names):
    w, files = world
    args = args(w, files)
    before = snapshot(w)
    p = run_script(*args, env=script_env())
    after = snapshot(w)
    err = p.stderr.strip()
    assert p.returncode == 2, f"{name}: exit {p.returncode}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr
    assert len(err.splitlines()) == 1, f"{name}: {p.stderr}"
    assert err.startswith("error: ") and re.search(names, err), f"{name}: {err}"
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"{name} changed {changed}"
    new = [k for k in after if k not in before and not k.startswith("cache/")]
    assert not new, f"{name} left {new}"


# ------------------------------------------------------------ every numeric flag of every script
SCRIPTS = ["train_image.py", "sample_image.py", "reconstruct_image.py", "report_image.py", "compare_image.py",
           "train_text.py", "sample_text.py", "reconstruct_text.py", "report_text.py", "interpolate_text.py",
           "compare_text.py", "prepare_text.py", "encode_text.py"]


def _parser_of(script):
    """The script's argument parser, caught as its parse_args is called (in process: no torch)."""
    import importlib.util

    from script_utils import SCRIPTS as SCRIPT_DIR

    import shared.cli

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        raise Caught(self)

    spec = importlib.util.spec_from_file_location(f"script_{script[:-3]}", SCRIPT_DIR / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = shared.cli.ArgumentParser.parse_args
    shared.cli.ArgumentParser.parse_args = catch
    try:
        module.parse_args([])
    except Caught as caught:
        return caught.args[0]
    finally:
        shared.cli.ArgumentParser.parse_args = original
    raise AssertionError(f"{script} does not parse with shared.cli.ArgumentParser")


def _out_of_range(kind):
    from shared import cli

    return {cli.positive_int: "0", cli.nonneg_int: "-1", cli.positive_float: "0", cli.nonneg_float: "-0.5",
            cli.fraction: "1.5", cli.open_fraction: "0", cli.auto_or_positive_int: "0"}.get(kind)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_refuses_bad_values(script, capsys):
    """A word where a number belongs, and (for the shared number types) a number out of range, for every
    numeric flag: status 2 and one line naming the flag."""
    parser = _parser_of(script)
    flags = [(a.option_strings[-1], a.type) for a in parser._actions
             if a.option_strings and (a.type in (int, float) or _out_of_range(a.type) is not None
                                      or getattr(a.type, "__name__", "") == "parse")]
    assert flags or script.startswith("compare_"), script
    for flag, kind in flags:
        for value in filter(None, ["abc", _out_of_range(kind)]):
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args([flag, value])
            err = capsys.readouterr().err.strip()
            assert exit_.value.code == 2, (script, flag, value)
            assert len(err.splitlines()) == 1 and re.search(re.escape(flag.split("-", 2)[-1]), err), (script, flag, err)
