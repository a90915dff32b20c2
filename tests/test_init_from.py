"""--init-from (fine-tuning, docs/design.md §5): a new run that starts from another run's exported weights,
with the same model config, its own optimiser, step and free-bits schedule, recorded in config.json."""
import json
import shutil

import pytest
import torch

from script_utils import image_folder, metrics, run_main, text_files, text_flags
from shared.engine import Trainer

COMMON = ["--report-to", "none", "--log-every", 2]


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    flags = text_flags(text_files(root / "data"), root / "cache")
    return root, flags


@pytest.fixture(scope="module")
def image_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    flags = ["--data-dir", image_folder(root / "data"), "--cache-dir", root / "cache", "--preset", "tiny"]
    return root, flags


def train_source(name, root, flags, capsys):
    """A 4-step source run; its validation record at step 4 scores the exported (EMA) weights of step 4."""
    src = root / "src"
    if not src.exists():
        code, _, err = run_main(name, [*flags, *COMMON, "--output-dir", src, "--max-steps", 4, "--eval-every", 4,
                                       "--batch-size", 16], capsys)
        assert code == 0, err
    record = [r for r in metrics(src) if r.get("split") == "valid"][-1]
    assert record["step"] == 4
    return src, record["elbo"]


def elbo_at_step_0(name, argv, capsys, monkeypatch):
    """The validation ELBO of a new run's EMA model before any update: ``fit`` only validates."""
    seen = []

    def validate_only(trainer):
        record = trainer.validate(final=True, log=False)
        seen.append((trainer.state.step, record["elbo"]))
        return {"step": trainer.state.step, "valid": record, "skipped_total": 0}

    monkeypatch.setattr(Trainer, "fit", validate_only)
    code, _, err = run_main(name, argv, capsys)
    assert code == 0, err
    [(step, elbo)] = seen
    assert step == 0
    return elbo


@pytest.mark.parametrize("name", ["train_text", "train_image"])
def test_new_run_reproduces_the_source_elbo_at_step_0(name, text_source, image_source, tmp_path, capsys, monkeypatch):
    root, flags = text_source if name == "train_text" else image_source
    src, source_elbo = train_source(name, root, flags, capsys)
    run = tmp_path / "ft"
    elbo = elbo_at_step_0(name, [*flags, *COMMON, "--output-dir", run, "--init-from", src, "--free-bits", 0], capsys,
                          monkeypatch)
    assert elbo == pytest.approx(source_elbo, abs=1e-4)  # same weights, same evaluation noise
    config = json.loads((run / "config.json").read_text())
    assert config["init_from"] == {"run": str(src), "path": str(src.resolve()), "step": 4}
    assert config["train"]["free_bits"] == 0.0  # its own schedule
    # Without --init-from the same run starts elsewhere: the comparison above can fail.
    fresh = elbo_at_step_0(name, [*flags, *COMMON, "--output-dir", tmp_path / "fresh"], capsys, monkeypatch)
    assert abs(fresh - source_elbo) > 0.1
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["init_from"] is None


@pytest.mark.parametrize("name, other", [("train_text", ["--preset", "small"]), ("train_image", ["--model", "lvae"])])
def test_refuses_a_source_with_another_model(name, other, text_source, image_source, tmp_path, capsys):
    root, flags = text_source if name == "train_text" else image_source
    src, _ = train_source(name, root, flags, capsys)
    flags = [f for f in flags if f not in ("--preset", "tiny")]  # the source's preset is the default
    run = tmp_path / "ft"
    code, out, err = run_main(name, [*flags, *COMMON, "--output-dir", run, "--init-from", src, *other], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: --init-from {src} has another model config") and "differ" in err
    assert ("ladder.channels" if name == "train_text" else "ladder.bu_latents") in err
    assert not run.exists()  # nothing written


def test_text_refuses_another_tokenizer(text_source, tmp_path, capsys):
    root, flags = text_source
    src, _ = train_source("train_text", root, flags, capsys)
    flags = [str(f) for f in flags]
    flags[flags.index("--vocab-size") + 1] = "50"
    code, _, err = run_main("train_text", [*flags, *COMMON, "--output-dir", tmp_path / "ft", "--init-from", src], capsys)
    assert code == 2 and "--vocab-size 50 differs from the --init-from run's 40" in err
    assert not (tmp_path / "ft").exists()


def test_resume_continues_from_the_checkpoint_not_the_source(text_source, tmp_path, capsys):
    root, flags = text_source
    src, _ = train_source("train_text", root, flags, capsys)
    source = tmp_path / "source"  # a copy we can take away
    shutil.copytree(src, source)
    run = tmp_path / "ft"
    argv = [*flags, *COMMON, "--output-dir", run, "--init-from", source, "--eval-every", 2, "--save-every", 2]
    code, _, err = run_main("train_text", [*argv, "--max-steps", 2], capsys)
    assert code == 0, err
    assert (run / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()  # the source's pieces
    shutil.rmtree(source)  # re-applying --init-from on --resume would now fail
    code, _, err = run_main("train_text", [*argv, "--max-steps", 4, "--resume"], capsys)  # the resume command
    assert code == 0, err
    assert "resuming from" in err and "step 2" in err
    assert [r["step"] for r in metrics(run) if r.get("split") == "valid"] == [2, 4]
    assert json.loads((run / "config.json").read_text())["init_from"]["step"] == 4
    code, _, err = run_main("train_text", [*flags, *COMMON, "--output-dir", run, "--resume", "--max-steps", 6,
                                           "--init-from", src], capsys)
    assert code == 2 and "differs from the resumed run's" in err


def weights_at_step_0(argv, capsys, monkeypatch) -> dict:
    """The model's weights when a new text run starts (``fit`` replaced: nothing trains)."""
    seen = []

    def capture(trainer):
        seen.append({k: v.clone() for k, v in trainer.raw_model.state_dict().items()})
        return {"step": 0, "valid": trainer.validate(final=True, log=False), "skipped_total": 0}

    monkeypatch.setattr(Trainer, "fit", capture)
    code, _, err = run_main("train_text", argv, capsys)
    monkeypatch.undo()
    assert code == 0, err
    return seen[0]


def test_init_reset_gives_the_named_part_fresh_weights_and_the_rest_the_sources(text_source, tmp_path, capsys,
                                                                                   monkeypatch):
    """Li et al. (2019)'s recipe: the source's encoder, a new decoder. The decoder starts where a run without
    --init-from starts (same seed), everything else from the source's exported weights."""
    from safetensors.torch import load_file

    root, flags = text_source
    src, _ = train_source("train_text", root, flags, capsys)
    source = load_file(str(src / "model.safetensors"))
    run = tmp_path / "ft"
    argv = [*flags, *COMMON, "--output-dir", run, "--init-from", src, "--init-reset", "decoder"]
    got = weights_at_step_0(argv, capsys, monkeypatch)
    fresh = weights_at_step_0([*flags, *COMMON, "--output-dir", tmp_path / "fresh"], capsys, monkeypatch)
    decoder = [k for k in got if k.startswith("decoder.")]
    assert decoder and len(decoder) < len(got)
    for k, v in got.items():
        want = fresh[k] if k.startswith("decoder.") else source[k]
        assert torch.equal(v, want), k
    assert any(not torch.equal(source[k], fresh[k]) for k in decoder)  # the test can tell them apart
    assert json.loads((run / "config.json").read_text())["init_from"]["reset"] == ["decoder"]
    # The printed resume command repeats the flag: it is accepted; another part is not.
    code, _, err = run_main("train_text", [*argv, "--resume", "--max-steps", 1, "--eval-every", 1], capsys)
    assert code == 0, err
    code, _, err = run_main("train_text", [*flags, *COMMON, "--output-dir", run, "--init-from", src, "--init-reset",
                                           "ladder", "--resume", "--max-steps", 2], capsys)
    assert code == 2 and "--init-reset ladder differs from the resumed run's decoder" in err


def test_init_reset_refuses_an_unknown_part_or_no_source(text_source, tmp_path, capsys):
    root, flags = text_source
    src, _ = train_source("train_text", root, flags, capsys)
    code, _, err = run_main("train_text", [*flags, *COMMON, "--output-dir", tmp_path / "a", "--init-from", src,
                                           "--init-reset", "encoderr"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--init-reset encoderr: not a part of this model; its parts are" in err and "decoder" in err
    assert not (tmp_path / "a" / "config.json").exists()
    code, _, err = run_main("train_text", [*flags, *COMMON, "--output-dir", tmp_path / "b", "--init-reset",
                                           "decoder"], capsys)
    assert code == 2 and "pass --init-from RUN too" in err and not (tmp_path / "b").exists()


def test_image_init_reset_names_the_parts(image_source, tmp_path, capsys):
    root, flags = image_source
    src, _ = train_source("train_image", root, flags, capsys)
    code, _, err = run_main("train_image", [*flags, *COMMON, "--output-dir", tmp_path / "a", "--init-from", src,
                                            "--init-reset", "decoder"], capsys)
    assert code == 2 and "--init-reset decoder: not a part of this model; its parts are" in err and "ladder" in err
    assert not (tmp_path / "a" / "config.json").exists()
    code, _, err = run_main("train_image", [*flags, *COMMON, "--output-dir", tmp_path / "b", "--init-from", src,
                                            "--init-reset", "ladder", "--max-steps", 1, "--eval-every", 1], capsys)
    assert code == 0 and "fresh random weights for ladder" in err, err
